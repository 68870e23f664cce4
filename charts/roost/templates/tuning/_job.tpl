{{/*
The tuning worker Job (`roost tune --on k8s` renames it and sets parallelism and the study's
settings): `parallelism` pods run `roost tune-worker` against the Optuna RDB storage until the
study has its trials. No completions: the Job succeeds once a worker exits 0 and all have ended.
The storage URL reaches the pod only through a Secret: the bundled PostgreSQL's password as
PGPASSWORD (libpq reads it; the URL holds none), or a whole URL from tuning.storage.existingSecret.
*/}}
{{- define "roost.tuningJob" -}}
{{- $ctx := .ctx }}
{{- $t := $ctx.Values.tuning }}
{{- if and (not $ctx.Values.postgresql.enabled) (not $t.storage.existingSecret) }}
{{- fail "tuning.storage.existingSecret is required when postgresql.enabled is false (or set tuning.enabled=false)" }}
{{- end }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "roost.componentLabels" (list $ctx "tuning") | nindent 4 }}
spec:
  parallelism: {{ $t.parallelism }}
  backoffLimit: {{ $t.backoffLimit }}
  activeDeadlineSeconds: {{ $t.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $t.ttlSecondsAfterFinished }}
  podFailurePolicy:
    rules:
      # Exit 2 is bad input (a setting, the space, the data): a retry would fail the same way.
      - action: FailJob
        onExitCodes:
          containerName: tune
          operator: In
          values: [2]
      # An evicted, preempted or deleted pod does not count against backoffLimit; its trial
      # goes stale and Optuna's retry callback queues it again.
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
  template:
    metadata:
      labels:
        {{- include "roost.componentLabels" (list $ctx "tuning") | nindent 8 }}
        roost.io/mlflow-access: "true"
        roost.io/s3-access: "true"
        roost.io/postgresql-access: "true"
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "roost.serviceAccountName" (list $ctx "training" $ctx.Values.training.serviceAccount) }}
      automountServiceAccountToken: false
      securityContext:
        {{- include "roost.podSecurityContext" $ctx | nindent 8 }}
      {{- include "roost.imagePullSecrets" (list $ctx 6) }}
      {{- if $t.gpu.enabled }}
      {{- with $t.gpu.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $t.gpu.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- end }}
      containers:
        - name: tune
          image: {{ include "roost.image" (list $ctx $t.image) | quote }}
          imagePullPolicy: {{ include "roost.pullPolicy" (list $ctx $t.image) }}
          args: ["tune-worker", "--summarize"]
          env:
            - name: MLFLOW_TRACKING_URI
              value: {{ include "roost.mlflowUri" $ctx | quote }}
            - name: ROOST_TRACKING__EXPERIMENT
              value: {{ $ctx.Values.training.experiment | quote }}
            - name: ROOST_TRAIN__DEVICE
              value: {{ ternary "cuda" "cpu" $t.gpu.enabled }}
            {{- if $t.storage.existingSecret }}
            - name: ROOST_TUNE__STORAGE
              valueFrom:
                secretKeyRef:
                  name: {{ $t.storage.existingSecret }}
                  key: {{ $t.storage.existingSecretKey }}
            {{- else }}
            - name: PGPASSWORD
              valueFrom:
                secretKeyRef:
                  name: {{ $ctx.Values.postgresql.existingSecret | default (include "roost.componentName" (list $ctx "postgresql")) }}
                  key: password
            - name: ROOST_TUNE__STORAGE
              value: {{ include "roost.tuningStorageUrl" $ctx | quote }}
            {{- end }}
            - name: ROOST_STATE_DIR
              value: /tmp/roost
            - name: HOME
              value: /home/roost
            - name: TMPDIR
              value: /tmp
            - name: PYTHONUNBUFFERED
              value: "1"
            {{- include "roost.s3Env" $ctx | nindent 12 }}
            {{- with $t.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            requests:
              {{- toYaml $t.resources.requests | nindent 14 }}
            limits:
              {{- toYaml $t.resources.limits | nindent 14 }}
              {{- if $t.gpu.enabled }}
              nvidia.com/gpu: {{ $t.gpu.count }}
              {{- end }}
          securityContext:
            {{- include "roost.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            {{- include "roost.scratchMounts" $ctx | nindent 12 }}
      volumes:
        {{- include "roost.scratchVolumes" $ctx | nindent 8 }}
{{- end }}

{{/*
The Optuna storage URL on the bundled PostgreSQL, without a password (PGPASSWORD supplies it).
*/}}
{{- define "roost.tuningStorageUrl" -}}
{{- printf "postgresql+psycopg2://%s@%s.%s.svc.%s:5432/%s" .Values.postgresql.username (include "roost.componentName" (list . "postgresql")) .Release.Namespace .Values.clusterDomain .Values.tuning.storage.database }}
{{- end }}
