{{/*
Chart name, truncated to the DNS label limit.
*/}}
{{- define "distbank.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: fullnameOverride, or <release>-<chart> (just <release> when it already
contains the chart name). Also the StatefulSet name, so pods are <fullname>-<ordinal>.
*/}}
{{- define "distbank.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "distbank.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Names of the other objects. */}}
{{- define "distbank.headlessName" -}}
{{- printf "%s-headless" (include "distbank.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "distbank.inputConfigMapName" -}}
{{- printf "%s-input" (include "distbank.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "distbank.outputConfigMapName" -}}
{{- default (printf "%s-output" .Release.Name | trunc 63 | trimSuffix "-") .Values.replay.outputConfigMap -}}
{{- end -}}

{{- define "distbank.replayName" -}}
{{- printf "%s-replay" (include "distbank.fullname" .) | trunc 54 | trimSuffix "-" -}}
{{- end -}}

{{- define "distbank.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "distbank.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "distbank.replayServiceAccountName" -}}
{{- if .Values.replay.rbac.create -}}
{{- default (include "distbank.replayName" .) .Values.replay.serviceAccount.name -}}
{{- else -}}
{{- required "replay.serviceAccount.name is required when replay.rbac.create is false (it must be able to get/create/patch the output ConfigMap)" .Values.replay.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Standard labels (bitnami common.labels.standard). Never used in selectors.
*/}}
{{- define "distbank.labels" -}}
helm.sh/chart: {{ include "distbank.chart" . }}
{{ include "distbank.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | replace "@" "_" | replace ":" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distbank
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Selector labels: name + instance only (immutable in StatefulSet/Job selectors). Components add
app.kubernetes.io/component.
*/}}
{{- define "distbank.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distbank.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Usage: include "distbank.componentLabels" (dict "ctx" $ "component" "branch") */}}
{{- define "distbank.componentLabels" -}}
{{ include "distbank.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "distbank.componentSelectorLabels" -}}
{{ include "distbank.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* metadata.annotations content from commonAnnotations plus extras; empty when there are none. */}}
{{- define "distbank.annotations" -}}
{{- $all := merge (dict) (.extra | default dict) (.ctx.Values.commonAnnotations | default dict) -}}
{{- if $all }}
{{- toYaml $all }}
{{- end }}
{{- end -}}

{{- define "distbank.image" -}}
{{- $repo := required "image.repository is required" .Values.image.repository -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (required "image.tag is required (a fixed tag, not latest)" .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/*
The input.json text: .Values.input (a JSON string from --set-file, or a YAML list), else the
bundled files/input.json.
*/}}
{{- define "distbank.inputJson" -}}
{{- if kindIs "slice" .Values.input -}}
{{- toPrettyJson .Values.input -}}
{{- else if .Values.input -}}
{{- .Values.input -}}
{{- else -}}
{{- .Files.Get "files/input.json" -}}
{{- end -}}
{{- end -}}

{{/*
Validates the input and prints the number of branches N. Fails the render with a clear message
when the input is not a JSON array of objects, has no branches, branch ids are not exactly 1..N
(each once), or a customer id has no branch of the same id.
*/}}
{{- define "distbank.branchCount" -}}
{{- $raw := include "distbank.inputJson" . -}}
{{- if gt (len $raw) 1000000 -}}
{{- fail (printf "input: %d bytes does not fit in a ConfigMap (limit about 1 MB)" (len $raw)) -}}
{{- end -}}
{{- $items := fromJsonArray $raw -}}
{{- $ids := dict -}}
{{- $customers := list -}}
{{- range $i, $item := $items -}}
{{- if not (kindIs "map" $item) -}}
{{- fail (printf "input: not a JSON array of branch/customer objects (item %d: %v)" $i $item) -}}
{{- end -}}
{{- if eq (toString (get $item "type")) "branch" -}}
{{- if not (hasKey $item "id") -}}
{{- fail (printf "input: branch at index %d has no id" $i) -}}
{{- end -}}
{{- $id := get $item "id" -}}
{{- if or (not (kindIs "float64" $id)) (ne (float64 (int64 $id)) $id) -}}
{{- fail (printf "input: branch at index %d has id %s; branch ids must be the integers 1..N" $i (toJson $id)) -}}
{{- end -}}
{{- $key := toString (int64 $id) -}}
{{- if hasKey $ids $key -}}
{{- fail (printf "input: branch id %s appears more than once; branch ids must be 1..N, each once" $key) -}}
{{- end -}}
{{- $_ := set $ids $key true -}}
{{- else if eq (toString (get $item "type")) "customer" -}}
{{- $customers = append $customers (get $item "id") -}}
{{- end -}}
{{- end -}}
{{- $n := len $ids -}}
{{- if eq $n 0 -}}
{{- fail "input: no branches (items with \"type\": \"branch\"); the StatefulSet needs at least one" -}}
{{- end -}}
{{- range $i := until $n -}}
{{- if not (hasKey $ids (toString (add1 $i))) -}}
{{- fail (printf "input: branch ids must be exactly 1..%d (one pod per branch, branch id = ordinal + 1); %d is missing, found %s" $n (add1 $i) (keys $ids | sortAlpha | join ",")) -}}
{{- end -}}
{{- end -}}
{{- range $c := $customers -}}
{{- if not (hasKey $ids (toString $c)) -}}
{{- fail (printf "input: customer %s has no branch with the same id (customer N talks to branch N; branches are 1..%d)" (toJson $c) $n) -}}
{{- end -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/* FQDN template of the branches; $(POD_NAMESPACE) is expanded by the kubelet from the env. */}}
{{- define "distbank.branchHostTemplate" -}}
{{- printf "%s-{ordinal}.%s.$(POD_NAMESPACE).svc.%s" (include "distbank.fullname" .) (include "distbank.headlessName" .) .Values.clusterDomain -}}
{{- end -}}

{{- define "distbank.customerAddrTemplate" -}}
{{- printf "%s://%s:%d" (ternary "https" "http" .Values.tls.customer.enabled) (include "distbank.branchHostTemplate" .) (int .Values.branch.ports.grpc) -}}
{{- end -}}

{{/* The port the kubelet probes: the plaintext health port when the customer API has TLS. */}}
{{- define "distbank.probePort" -}}
{{- ternary .Values.tls.healthPort .Values.branch.ports.grpc .Values.tls.customer.enabled | int -}}
{{- end -}}

{{/* The Secret of one TLS side, or a clear error. Usage: include "distbank.tlsSecret" (dict "ctx" . "side" "peer") */}}
{{- define "distbank.tlsSecret" -}}
{{- $side := index .ctx.Values.tls .side -}}
{{- required (printf "tls.%s.enabled needs tls.%s.secretName: a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt" .side .side) $side.secretName -}}
{{- end -}}

{{/* Mounts the customer CA for a client of the customer API (replay Job, helm test). */}}
{{- define "distbank.customerCaMount" -}}
{{- if .Values.tls.customer.enabled }}
- name: customer-ca
  mountPath: /etc/distbank-tls/customer
  readOnly: true
{{- end }}
{{- end -}}
{{- define "distbank.customerCaVolume" -}}
{{- if .Values.tls.customer.enabled }}
- name: customer-ca
  secret:
    secretName: {{ include "distbank.tlsSecret" (dict "ctx" . "side" "customer") }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end -}}
{{- define "distbank.customerCaEnv" -}}
{{- if .Values.tls.customer.enabled }}
- name: DISTBANK_TLS_CA
  value: /etc/distbank-tls/customer/ca.crt
{{- end }}
{{- end -}}

{{- define "distbank.peerTemplate" -}}
{{- printf "%s:%d" (include "distbank.branchHostTemplate" .) (int .Values.branch.ports.peer) -}}
{{- end -}}

{{/* Downward-API env shared by all containers (must precede any $(VAR) reference). */}}
{{- define "distbank.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/* The OTLP endpoint pods export traces to: tracing.otlpEndpoint, else the bundled Jaeger's. */}}
{{- define "distbank.otlpEndpoint" -}}
{{- if .Values.tracing.otlpEndpoint -}}
{{- .Values.tracing.otlpEndpoint -}}
{{- else if .Values.jaeger.enabled -}}
{{- printf "http://%s:4317" (include "distbank.jaegerName" .) -}}
{{- end -}}
{{- end -}}

{{- define "distbank.jaegerName" -}}
{{- printf "%s-jaeger" (include "distbank.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* OpenTelemetry variables (only when traces are exported). Usage: include "distbank.otelEnv" (dict "ctx" $ "service" "name") */}}
{{- define "distbank.otelEnv" -}}
{{- with include "distbank.otlpEndpoint" .ctx }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $.service | quote }}
{{- with $.ctx.Values.tracing.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- with $.ctx.Values.tracing.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- with $.ctx.Values.tracing.resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A native gRPC probe. Usage: include "distbank.grpcProbe" (dict "probe" .Values.branch.readinessProbe "port" 50051) */}}
{{- define "distbank.grpcProbe" -}}
grpc:
  port: {{ int .port }}
  {{- with .probe.service }}
  service: {{ . | quote }}
  {{- end }}
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
successThreshold: {{ .probe.successThreshold }}
{{- end -}}

{{- define "distbank.podAntiAffinity" -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "distbank.componentSelectorLabels" (dict "ctx" . "component" "branch") | fromYaml)) -}}
{{- if eq .Values.branch.podAntiAffinityPreset "hard" -}}
{{- toYaml (dict "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term))) -}}
{{- else if eq .Values.branch.podAntiAffinityPreset "soft" -}}
{{- toYaml (dict "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 1 "podAffinityTerm" $term)))) -}}
{{- end -}}
{{- end -}}

{{/*
Inline checkov skips for the image settings, each with its reason, only where they apply:
a side-loaded image (kind load / minikube image load) has no registry digest and needs
IfNotPresent. Prints a YAML map (possibly empty).
*/}}
{{/* The Jaeger image: repository@digest when a digest is set, else repository:tag. */}}
{{- define "distbank.jaegerImage" -}}
{{- if .Values.jaeger.image.digest -}}
{{- printf "%s@%s" .Values.jaeger.image.repository .Values.jaeger.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.jaeger.image.repository .Values.jaeger.image.tag -}}
{{- end -}}
{{- end -}}

{{- define "distbank.imageCheckovSkips" -}}
{{- $s := dict -}}
{{- if not .Values.image.digest -}}
{{- $_ := set $s "checkov.io/skip1" "CKV_K8S_43=The default image is built locally and side-loaded (kind load docker-image), so it has no registry digest; set image.digest to pin one." -}}
{{- end -}}
{{- if ne .Values.image.pullPolicy "Always" -}}
{{- $_ := set $s "checkov.io/skip2" "CKV_K8S_15=IfNotPresent is required for side-loaded images (Always fails with ErrImagePull on kind); the tag is fixed, never latest." -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}

{{/*
Name of the replay Job: <fullname>-replay-<first 8 hex of sha256(spec)>. Usage:
include "distbank.replayJobName" (dict "ctx" $ "spec" $spec)
*/}}
{{- define "distbank.replayJobName" -}}
{{- printf "%s-%s" (include "distbank.replayName" .ctx) (.spec | sha256sum | trunc 8) -}}
{{- end -}}

{{/*
spec of the replay Job (without the Job's own metadata). Usage:
include "distbank.replayJobSpec" (dict "ctx" $ "n" <branch count>)
*/}}
{{- define "distbank.replayJobSpec" -}}
{{- $ := .ctx -}}
backoffLimit: {{ $.Values.replay.backoffLimit }}
activeDeadlineSeconds: {{ $.Values.replay.activeDeadlineSeconds }}
ttlSecondsAfterFinished: {{ $.Values.replay.ttlSecondsAfterFinished }}
podFailurePolicy:
  rules:
    # Exit code 2 = bad input or usage: retrying cannot help.
    - action: FailJob
      onExitCodes:
        containerName: replay
        operator: In
        values: [2]
    # A node drain or preemption is not the replay's fault: do not count it against backoffLimit.
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
template:
  metadata:
    # No version/chart labels here: the pod template of a Job is immutable.
    labels:
      {{- include "distbank.componentSelectorLabels" (dict "ctx" $ "component" "replay") | nindent 6 }}
      {{- with $.Values.replay.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    annotations:
      checksum/input: {{ include "distbank.inputJson" $ | sha256sum }}
      {{- with $.Values.replay.podAnnotations }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "distbank.replayServiceAccountName" $ }}
    # The only pod that talks to the Kubernetes API (to upload output.json).
    automountServiceAccountToken: true
    enableServiceLinks: false
    {{- with $.Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- toYaml $.Values.replay.podSecurityContext | nindent 6 }}
    {{- with $.Values.replay.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $.Values.replay.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $.Values.replay.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: replay
        image: {{ include "distbank.image" $ | quote }}
        imagePullPolicy: {{ $.Values.image.pullPolicy }}
        # Waits (in-process, with progress logs) until all {{ .n }} branches report SERVING,
        # replays the customers, writes output.json and uploads it to the output ConfigMap.
        args:
          - replay
          - /etc/distbank/input.json
          - --branch-addr={{ include "distbank.customerAddrTemplate" $ }}
          - --wait-timeout={{ $.Values.replay.waitTimeout }}
          - --retry-budget={{ $.Values.replay.retryBudget }}
          - --output=/tmp/output.json
          - --upload-configmap={{ include "distbank.outputConfigMapName" $ }}
          {{- with $.Values.replay.extraArgs }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        env:
          {{- include "distbank.podEnv" $ | nindent 10 }}
          - name: DISTBANK_ID_OFFSET
            value: {{ $.Values.branch.idOffset | quote }}
          - name: DISTBANK_LOG_FORMAT
            value: {{ $.Values.replay.logFormat | quote }}
          {{- with include "distbank.otelEnv" (dict "ctx" $ "service" (include "distbank.fullname" $)) | trim }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- with $.Values.replay.rustLog }}
          - name: RUST_LOG
            value: {{ . | quote }}
          {{- end }}
          {{- with include "distbank.customerCaEnv" $ | trim }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- with $.Values.replay.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        resources:
          {{- toYaml $.Values.replay.resources | nindent 10 }}
        securityContext:
          {{- toYaml $.Values.replay.containerSecurityContext | nindent 10 }}
        volumeMounts:
          - name: input
            mountPath: /etc/distbank
            readOnly: true
          - name: tmp
            mountPath: /tmp
          {{- with include "distbank.customerCaMount" $ | trim }}
          {{- . | nindent 10 }}
          {{- end }}
    volumes:
      {{- with include "distbank.customerCaVolume" $ | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      - name: input
        configMap:
          name: {{ include "distbank.inputConfigMapName" $ }}
      - name: tmp
        emptyDir:
          sizeLimit: 64Mi
{{- end -}}
