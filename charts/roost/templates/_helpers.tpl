{{/*
The chart name, or .Values.nameOverride: the value of app.kubernetes.io/name.
*/}}
{{- define "roost.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name for objects: .Values.fullnameOverride, else the release name when it
already contains the chart name, else "<release>-<chart>".
*/}}
{{- define "roost.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "roost.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name + instance only (selectors are immutable). Components add
app.kubernetes.io/component through roost.componentSelectorLabels.
*/}}
{{- define "roost.selectorLabels" -}}
app.kubernetes.io/name: {{ include "roost.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object: the selector labels plus version, part-of, managed-by and chart.
*/}}
{{- define "roost.labels" -}}
{{ include "roost.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: roost
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "roost.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of one component's objects: "<fullname>-<component>". Call with (list $ "mlflow").
*/}}
{{- define "roost.componentName" -}}
{{- $ctx := index . 0 }}
{{- printf "%s-%s" (include "roost.fullname" $ctx) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of one component (the pods of one workload). Call with (list $ "mlflow").
*/}}
{{- define "roost.componentSelectorLabels" -}}
{{ include "roost.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
All labels of one component's objects. Call with (list $ "mlflow").
*/}}
{{- define "roost.componentLabels" -}}
{{ include "roost.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
ServiceAccount name of a component: its serviceAccount.name, else "<fullname>-<component>"
when the chart creates it, else "default". Call with (list $ "mlflow" .Values.mlflow.serviceAccount).
*/}}
{{- define "roost.serviceAccountName" -}}
{{- $ctx := index . 0 }}
{{- $sa := index . 2 }}
{{- if $sa.create }}
{{- default (include "roost.componentName" (list $ctx (index . 1))) $sa.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- default "default" $sa.name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
An image reference: "<registry>/<repository>:<tag>", the tag defaulting to images.tag and
then to the chart's appVersion. Call with (list $ .Values.mlflow.image).
*/}}
{{- define "roost.image" -}}
{{- $ctx := index . 0 }}
{{- $image := index . 1 }}
{{- $registry := $image.registry | default $ctx.Values.images.registry }}
{{- $tag := $image.tag | default $ctx.Values.images.tag | default $ctx.Chart.AppVersion }}
{{- if $registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) $image.repository $tag }}
{{- else }}
{{- printf "%s:%s" $image.repository $tag }}
{{- end }}
{{- end }}

{{/*
imagePullPolicy of an image: its own, else images.pullPolicy. Call with (list $ image).
*/}}
{{- define "roost.pullPolicy" -}}
{{- (index . 1).pullPolicy | default (index . 0).Values.images.pullPolicy }}
{{- end }}

{{/*
imagePullSecrets of a pod spec, indented. Call with (list $ <indent>).
*/}}
{{- define "roost.imagePullSecrets" -}}
{{- $indent := int (index . 1) }}
{{- with (index . 0).Values.images.pullSecrets }}
{{- "imagePullSecrets:" | nindent $indent }}
{{- range . }}
{{- printf "- name: %s" . | nindent (add $indent 2 | int) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Pod-level securityContext of every roost pod: non-root, a numeric user, RuntimeDefault seccomp.
*/}}
{{- define "roost.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container securityContext of every roost container: read-only root, no privilege escalation,
no capabilities, RuntimeDefault seccomp.
*/}}
{{- define "roost.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Writable scratch space for a read-only root filesystem: /tmp and HOME as emptyDirs.
*/}}
{{- define "roost.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.securityContext.scratchSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.securityContext.scratchSizeLimit }}
{{- end }}

{{- define "roost.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/roost
{{- end }}

{{/*
A projected, short-lived API token for the few pods that call the Kubernetes API
(automountServiceAccountToken stays false everywhere).
*/}}
{{- define "roost.apiTokenVolume" -}}
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3600
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end }}

{{- define "roost.apiTokenMount" -}}
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end }}

{{/*
MLflow's in-cluster tracking URI.
*/}}
{{- define "roost.mlflowUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc.%s:%d" (include "roost.componentName" (list . "mlflow")) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.service.port) }}
{{- else }}
{{- required "mlflow.externalUri is required when mlflow.enabled is false" .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{/*
The S3 endpoint the pods use: s3.endpoint, else the bundled MinIO, else "" (AWS S3).
*/}}
{{- define "roost.s3Endpoint" -}}
{{- if .Values.s3.endpoint }}
{{- .Values.s3.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc.%s:%d" (include "roost.componentName" (list . "minio")) .Release.Namespace .Values.clusterDomain (int .Values.minio.service.port) }}
{{- end }}
{{- end }}

{{/*
The "host:port" form of the S3 endpoint, for KServe's serving.kserve.io/s3-endpoint annotation.
*/}}
{{- define "roost.s3EndpointHost" -}}
{{- include "roost.s3Endpoint" . | trimPrefix "http://" | trimPrefix "https://" }}
{{- end }}

{{/*
The Secret with S3 keys (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or "" with IRSA.
*/}}
{{- define "roost.s3Secret" -}}
{{- if .Values.s3.existingSecret }}
{{- .Values.s3.existingSecret }}
{{- else if .Values.minio.enabled }}
{{- include "roost.componentName" (list . "minio") }}
{{- end }}
{{- end }}

{{/*
S3 settings every S3 client in roost's pods reads (boto3, MLflow), plus the keys when a
Secret holds them (MinIO); with IRSA the pod identity webhook adds the credentials.
*/}}
{{- define "roost.s3Env" -}}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- $endpoint := include "roost.s3Endpoint" . }}
{{- if $endpoint }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ $endpoint | quote }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ $endpoint | quote }}
{{- end }}
{{- $secret := include "roost.s3Secret" . }}
{{- if $secret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}

{{/*
The S3 URI the MLflow server stores artifacts under (--artifacts-destination).
*/}}
{{- define "roost.artifactsDestination" -}}
{{- printf "s3://%s/%s" .Values.s3.bucket (trimSuffix "/" .Values.mlflow.artifactsPrefix) }}
{{- end }}

{{/*
A ServiceAccount. Call with (list $ "component" .Values.<component>.serviceAccount).
*/}}
{{- define "roost.serviceAccount" -}}
{{- $ctx := index . 0 }}
{{- $component := index . 1 }}
{{- $sa := index . 2 }}
{{- if $sa.create }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "roost.serviceAccountName" (list $ctx $component $sa) }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "roost.componentLabels" (list $ctx $component) | nindent 4 }}
  {{- with $sa.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- end }}
{{- end }}

{{/*
KServe's S3 annotations (storage initializer): on the MinIO Secret and the serving
ServiceAccount. AWS S3 over HTTPS unless an endpoint is configured or MinIO is bundled.
*/}}
{{- define "roost.kserveS3Annotations" -}}
{{- $endpoint := include "roost.s3Endpoint" . }}
{{- $https := or (not $endpoint) (hasPrefix "https://" $endpoint) }}
serving.kserve.io/s3-endpoint: {{ ternary (printf "s3.%s.amazonaws.com" .Values.s3.region) (include "roost.s3EndpointHost" .) (not $endpoint) | quote }}
serving.kserve.io/s3-usehttps: {{ ternary "1" "0" $https | quote }}
serving.kserve.io/s3-verifyssl: {{ ternary "1" "0" $https | quote }}
serving.kserve.io/s3-region: {{ .Values.s3.region | quote }}
serving.kserve.io/s3-useanoncredential: "false"
{{- end }}

{{/*
Name of the roost ServingRuntime; the gRPC variant is "<name>-grpc".
*/}}
{{- define "roost.runtimeName" -}}
{{- include "roost.componentName" (list . "predictor") }}
{{- end }}

{{/*
The InferenceService for one protocol. Call with (dict "ctx" $ "grpc" false "storageUri" "...").
The same text is the template `roost deploy` fills in (ConfigMap <fullname>-templates).
*/}}
{{- define "roost.inferenceService" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values.serving }}
{{- $isvc := $v.inferenceService }}
{{- $torchserve := eq $v.runtime "torchserve" }}
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {{ ternary (printf "%s-grpc" $isvc.name) $isvc.name .grpc }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "roost.componentLabels" (list $ctx "serving") | nindent 4 }}
  annotations:
    serving.kserve.io/deploymentMode: Knative
    # Tags the traffic targets prev (champion) / latest (challenger): with Knative's
    # tag-header-based-routing, `Knative-Serving-Tag: prev|latest` pins a side (docs/rollout.md).
    serving.kserve.io/enable-tag-routing: "true"
    roost.io/runtime: {{ $v.runtime }}
    roost.io/protocol: {{ ternary "grpc" "rest" .grpc }}
spec:
  predictor:
    minReplicas: {{ $isvc.minReplicas }}
    maxReplicas: {{ $isvc.maxReplicas }}
    scaleMetric: concurrency
    scaleTarget: {{ $isvc.scaleTarget }}
    {{- if and (not .grpc) (not (kindIs "invalid" $isvc.canaryTrafficPercent)) }}
    canaryTrafficPercent: {{ $isvc.canaryTrafficPercent }}
    {{- end }}
    serviceAccountName: {{ include "roost.serviceAccountName" (list $ctx "serving" $v.serviceAccount) }}
    automountServiceAccountToken: false
    securityContext:
      runAsNonRoot: true
      {{- if $torchserve }}
      runAsUser: {{ $v.torchserve.runAsUser }}
      {{- else }}
      runAsUser: {{ $ctx.Values.securityContext.runAsUser }}
      runAsGroup: {{ $ctx.Values.securityContext.runAsGroup }}
      {{- end }}
      seccompProfile:
        type: RuntimeDefault
    {{- include "roost.imagePullSecrets" (list $ctx 4) }}
    {{- with (include "roost.monitorLogUrl" $ctx) }}
    logger:
      mode: {{ $ctx.Values.monitor.logger.mode }}
      url: {{ . | quote }}
    {{- end }}
    {{- if $torchserve }}
    volumes:
      - name: tmp
        emptyDir:
          sizeLimit: {{ $ctx.Values.securityContext.scratchSizeLimit }}
      - name: logs
        emptyDir:
          sizeLimit: {{ $ctx.Values.securityContext.scratchSizeLimit }}
    {{- end }}
    model:
      {{- if $torchserve }}
      modelFormat:
        name: pytorch
      runtime: kserve-torchserve
      protocolVersion: {{ $v.torchserve.protocolVersion }}
      {{- else }}
      modelFormat:
        name: {{ $v.modelFormat }}
      runtime: {{ ternary (printf "%s-grpc" (include "roost.runtimeName" $ctx)) (include "roost.runtimeName" $ctx) .grpc }}
      protocolVersion: {{ ternary "grpc-v2" "v2" .grpc }}
      {{- end }}
      {{- with .storageUri }}
      storageUri: {{ . | quote }}
      {{- end }}
      env:
        {{- if $torchserve }}
        - name: LOG_LOCATION
          value: /home/model-server/logs
        - name: METRICS_LOCATION
          value: /home/model-server/logs
        - name: TEMP
          value: /tmp
        {{- else }}
        - name: ROOST_SERVING__MAX_BATCH_SIZE
          value: {{ $v.batching.maxBatchSize | quote }}
        - name: ROOST_SERVING__MAX_BATCH_WAIT_MS
          value: {{ $v.batching.maxBatchWaitMs | quote }}
        {{- if not (kindIs "invalid" $v.batching.intraOpThreads) }}
        - name: ROOST_SERVING__INTRA_OP_THREADS
          value: {{ $v.batching.intraOpThreads | quote }}
        {{- end }}
        {{- end }}
        {{- with $isvc.modelVersion }}
        - name: ROOST_SERVING__MODEL_VERSION
          value: {{ . | quote }}
        {{- end }}
      resources:
        {{- toYaml $isvc.resources | nindent 8 }}
      {{- if $torchserve }}
      securityContext:
        runAsNonRoot: true
        runAsUser: {{ $v.torchserve.runAsUser }}
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop:
            - ALL
        seccompProfile:
          type: RuntimeDefault
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: logs
          mountPath: /home/model-server/logs
      {{- end }}
{{- end }}

{{/*
The training Job. Call with (dict "ctx" $ "name" "..." "hook" false). `roost train --on k8s`
starts from the same text (ConfigMap <fullname>-templates), renames it and adds its settings.
*/}}
{{- define "roost.trainingJob" -}}
{{- $ctx := .ctx }}
{{- $t := $ctx.Values.training }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "roost.componentLabels" (list $ctx "training") | nindent 4 }}
  {{- if .hook }}
  annotations:
    helm.sh/hook: post-install,post-upgrade
    helm.sh/hook-weight: "5"
    helm.sh/hook-delete-policy: before-hook-creation
  {{- end }}
spec:
  backoffLimit: {{ $t.backoffLimit }}
  activeDeadlineSeconds: {{ $t.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $t.ttlSecondsAfterFinished }}
  podFailurePolicy:
    rules:
      # Exit 2 is bad input (a setting, the data): a retry would fail the same way.
      - action: FailJob
        onExitCodes:
          containerName: train
          operator: In
          values: [2]
      # A pod evicted or preempted does not count against backoffLimit.
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
  template:
    metadata:
      labels:
        {{- include "roost.componentLabels" (list $ctx "training") | nindent 8 }}
        roost.io/mlflow-access: "true"
        roost.io/s3-access: "true"
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "roost.serviceAccountName" (list $ctx "training" $t.serviceAccount) }}
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
        - name: train
          image: {{ include "roost.image" (list $ctx $t.image) | quote }}
          imagePullPolicy: {{ include "roost.pullPolicy" (list $ctx $t.image) }}
          args:
            - train
            {{- /* training.args are the hook's; `roost train --on k8s` passes its own settings */}}
            {{- if .hook }}
            {{- range $t.args }}
            - {{ . | quote }}
            {{- end }}
            {{- end }}
          env:
            - name: ROOST_JOB_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.labels['batch.kubernetes.io/job-name']
            - name: MLFLOW_TRACKING_URI
              value: {{ include "roost.mlflowUri" $ctx | quote }}
            - name: ROOST_TRACKING__EXPERIMENT
              value: {{ $t.experiment | quote }}
            - name: ROOST_TRAIN__CHECKPOINT_DIR
              value: {{ printf "s3://%s/%s/$(ROOST_JOB_NAME)" $ctx.Values.s3.bucket (trimSuffix "/" $ctx.Values.s3.checkpointsPrefix) | quote }}
            - name: ROOST_TRAIN__DEVICE
              value: {{ ternary "cuda" "cpu" $t.gpu.enabled }}
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
Where KServe's logger agent sends payload events: monitor.logger.url, else the receiver's
Service when the chart runs it; empty: no spec.predictor.logger.
*/}}
{{- define "roost.monitorLogUrl" -}}
{{- $m := .Values.monitor }}
{{- if $m.logger.enabled }}
{{- if $m.logger.url }}
{{- $m.logger.url }}
{{- else if $m.enabled }}
{{- printf "http://%s.%s.svc.%s:%v/" (include "roost.componentName" (list . "monitor")) .Release.Namespace .Values.clusterDomain $m.service.port }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The rollout controller's mode: rollout.controller.mode, else shadow-then-canary when KServe's
logger sends the champion's traffic to the chart's own receiver (which the shadow replays),
else canary. A shadow mode without that receiver fails the render.
*/}}
{{- define "roost.rolloutMode" -}}
{{- $m := .Values.monitor }}
{{- $receiver := and $m.enabled $m.logger.enabled (not $m.logger.url) }}
{{- $mode := .Values.rollout.controller.mode | default (ternary "shadow-then-canary" "canary" $receiver) }}
{{- if and (hasPrefix "shadow" $mode) (not $receiver) }}
{{- fail (printf "rollout.controller.mode=%s replays the champion's payload log: it needs monitor.enabled and monitor.logger.enabled with monitor.logger.url empty (the chart's receiver)" $mode) }}
{{- end }}
{{- $mode }}
{{- end }}

{{/* The chart's payload receiver Service URL. */}}
{{- define "roost.monitorServiceUrl" -}}
{{- printf "http://%s.%s.svc.%s:%v" (include "roost.componentName" (list . "monitor")) .Release.Namespace .Values.clusterDomain .Values.monitor.service.port }}
{{- end }}
