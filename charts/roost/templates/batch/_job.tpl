{{/*
The batch Indexed Job (`roost batch --on k8s`): completion index -> shard of the input files.
`roost batch --on k8s` fills in completions, parallelism and the container's args; each pod
scores its shard (ROOST_BATCH__SHARD_INDEX from the completion index) and resumes a retry
from the chunks already recorded under the output prefix. Call with (dict "ctx" $ "name" "...").
*/}}
{{- define "roost.batchJob" -}}
{{- $ctx := .ctx }}
{{- $b := $ctx.Values.batch }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "roost.componentLabels" (list $ctx "batch") | nindent 4 }}
spec:
  completionMode: Indexed
  completions: {{ $b.shards }}
  parallelism: {{ $b.parallelism }}
  {{- /* Retries per shard: a retried pod resumes its shard; a failed shard fails the Job. */}}
  backoffLimitPerIndex: {{ $b.backoffLimitPerIndex }}
  activeDeadlineSeconds: {{ $b.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $b.ttlSecondsAfterFinished }}
  podFailurePolicy:
    rules:
      # Exit 2/3 are bad input (input, columns, model): a retry would fail the same way.
      - action: FailJob
        onExitCodes:
          containerName: batch
          operator: In
          values: [2, 3]
      # A pod evicted or preempted does not count against the retries.
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
  template:
    metadata:
      labels:
        {{- include "roost.componentLabels" (list $ctx "batch") | nindent 8 }}
        roost.io/mlflow-access: "true"
        roost.io/s3-access: "true"
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "roost.serviceAccountName" (list $ctx "batch" $b.serviceAccount) }}
      automountServiceAccountToken: false
      securityContext:
        {{- include "roost.podSecurityContext" $ctx | nindent 8 }}
      {{- include "roost.imagePullSecrets" (list $ctx 6) }}
      containers:
        - name: batch
          image: {{ include "roost.image" (list $ctx $b.image) | quote }}
          imagePullPolicy: {{ include "roost.pullPolicy" (list $ctx $b.image) }}
          args:
            - batch
          env:
            - name: ROOST_BATCH__SHARD_INDEX
              valueFrom:
                fieldRef:
                  fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
            - name: ROOST_BATCH__CHUNK_ROWS
              value: {{ $b.chunkRows | quote }}
            - name: ROOST_BATCH__MAX_ERROR_RATE
              value: {{ $b.maxErrorRate | quote }}
            - name: ROOST_BATCH__EXPERIMENT
              value: {{ $b.experiment | quote }}
            - name: MLFLOW_TRACKING_URI
              value: {{ include "roost.mlflowUri" $ctx | quote }}
            - name: ROOST_STATE_DIR
              value: /tmp/roost
            - name: HOME
              value: /home/roost
            - name: TMPDIR
              value: /tmp
            - name: COLUMNS
              value: "160"
            - name: PYTHONUNBUFFERED
              value: "1"
            {{- include "roost.s3Env" $ctx | nindent 12 }}
            {{- with $b.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            requests:
              {{- toYaml $b.resources.requests | nindent 14 }}
            limits:
              {{- toYaml $b.resources.limits | nindent 14 }}
          securityContext:
            {{- include "roost.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            {{- include "roost.scratchMounts" $ctx | nindent 12 }}
      volumes:
        {{- include "roost.scratchVolumes" $ctx | nindent 8 }}
{{- end }}
