{{/* Names. The RayCluster's name prefixes KubeRay's pod and Service names, hence the shorter limit. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.raycluster" -}}{{ include "tandem.fullname" . }}{{- end -}}
{{- define "tandem.registryService" -}}{{ include "tandem.fullname" . }}-registry{{- end -}}
{{- define "tandem.routerName" -}}{{ include "tandem.fullname" . }}-router{{- end -}}
{{- define "tandem.redisName" -}}{{ include "tandem.fullname" . }}-redis{{- end -}}
{{- define "tandem.autoscalerName" -}}{{ include "tandem.fullname" . }}-autoscaler{{- end -}}

{{/* Selector labels of a component: `include "tandem.selectorLabels" (list . "router")` */}}
{{- define "tandem.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "tandem.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tandem.labels" -}}
{{- $root := index . 0 -}}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: tandem
helm.sh/chart: {{ include "tandem.chart" $root }}
{{- end -}}

{{/* The router pods' label selector, as the autoscaler's --router-selector. */}}
{{- define "tandem.routerSelector" -}}
app.kubernetes.io/name={{ include "tandem.name" . }},app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=router
{{- end -}}

{{- define "tandem.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "cuda" "cpu" (eq .Values.accelerator.type "nvidia"))) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "tandem.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "tandem.podSecurityContext" -}}
{{- with .Values.podSecurityContext }}
securityContext:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "tandem.containerSecurityContext" -}}
{{- with .Values.containerSecurityContext }}
securityContext:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Checks that the schema cannot express; each fails the install with a message naming the values. */}}
{{- define "tandem.validate" -}}
{{- range $role := list "prefill" "decode" -}}
{{- $p := index $.Values $role -}}
{{- if or (gt (int $p.minReplicas) (int $p.replicas)) (gt (int $p.replicas) (int $p.maxReplicas)) -}}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas, got %d, %d, %d" $role (int $p.minReplicas) (int $p.replicas) (int $p.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- $e := .Values.engine -}}
{{- if and (eq (toString $e.attentionBackend) "triton") (ne .Values.accelerator.type "nvidia") -}}
{{- fail (printf "engine.attentionBackend: triton needs accelerator.type=nvidia (the CPU image has no triton), got accelerator.type=%s; use auto or sdpa" .Values.accelerator.type) -}}
{{- end -}}
{{- with $e.cudagraphCaptureSizes -}}
{{- $maxSeqs := ternary 64 (int $e.maxNumSeqs) (kindIs "invalid" $e.maxNumSeqs) -}}
{{- range . -}}
{{- if gt (int .) $maxSeqs -}}
{{- fail (printf "engine.cudagraphCaptureSizes: each must be at most engine.maxNumSeqs (%d; 64 when null), got %d" $maxSeqs (int .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.url) -}}
{{- fail "redis: tandem needs a Redis: set redis.enabled=true (bundled) or redis.url (external)" -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.redis.url -}}
{{- fail "redis: set redis.enabled=true (bundled) or redis.url (external), not both" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.secretName: required with tls.enabled" -}}
{{- end -}}
{{- if and .Values.internalTls.enabled (or (not .Values.internalTls.secretName) (not .Values.internalTls.serverName)) -}}
{{- fail "internalTls.secretName and internalTls.serverName: required with internalTls.enabled (pods are dialled by IP; the certificate needs serverName as a DNS SAN)" -}}
{{- end -}}
{{- if and (not .Values.auth.apiKeysSecret) (not .Values.auth.allowUnauthenticated) (ne .Values.router.service.type "ClusterIP") -}}
{{- fail (printf "auth.apiKeysSecret: required with router.service.type=%s (the routers would serve without API keys outside the cluster); set auth.allowUnauthenticated=true to do so anyway" .Values.router.service.type) -}}
{{- end -}}
{{- if eq (int .Values.router.service.grpcPort) (int .Values.router.service.httpPort) -}}
{{- fail (printf "router.service.grpcPort and router.service.httpPort: must differ, got %d for both" (int .Values.router.service.grpcPort)) -}}
{{- end -}}
{{- $pdb := .Values.router.podDisruptionBudget -}}
{{- if and $pdb.enabled (not (kindIs "string" $pdb.minAvailable)) (ge (int $pdb.minAvailable) (int .Values.router.replicas)) (gt (int .Values.router.replicas) 1) -}}
{{- fail (printf "router.podDisruptionBudget.minAvailable: must be below router.replicas (%d), got %d: no router could ever be evicted and node drains would block" (int .Values.router.replicas) (int $pdb.minAvailable)) -}}
{{- end -}}
{{- if and .Values.autoscaler.enabled (not (kindIs "invalid" .Values.autoscaler.gpuBudget)) (eq .Values.accelerator.type "nvidia") -}}
{{- $floor := add (mul (int .Values.prefill.minReplicas) (int .Values.prefill.parallelism.tensor)) (mul (int .Values.decode.minReplicas) (int .Values.decode.parallelism.tensor)) -}}
{{- if lt (int .Values.autoscaler.gpuBudget) (int $floor) -}}
{{- fail (printf "autoscaler.gpuBudget: the pools' minReplicas need %d GPUs, got %d" (int $floor) (int .Values.autoscaler.gpuBudget)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Redis password env (from a Secret) and TANDEM_REDIS_URL built from it: no secret in the pod spec. */}}
{{- define "tandem.redisEnv" -}}
{{- $secret := .Values.redis.auth.existingSecret | default (include "tandem.redisName" .) -}}
{{- if or .Values.redis.enabled .Values.redis.auth.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.redis.auth.secretKey }}
{{- end }}
- name: TANDEM_REDIS_URL
{{- if .Values.redis.enabled }}
  value: "redis://:$(REDIS_PASSWORD)@{{ include "tandem.redisName" . }}:6379/0"
{{- else if .Values.redis.auth.existingSecret }}
  value: {{ regexReplaceAll "^(rediss?://)" .Values.redis.url "${1}:$(REDIS_PASSWORD)@" | quote }}
{{- else }}
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- end -}}

{{/* Volumes and mounts every tandem pod has: a writable /tmp (the root filesystem is read-only), the model. */}}
{{- define "tandem.commonVolumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.model.volume }}
- name: model
{{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- if .Values.internalTls.enabled }}
- name: internal-tls
  secret:
    secretName: {{ .Values.internalTls.secretName }}
{{- end }}
{{- end -}}

{{- define "tandem.commonMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.internalTls.enabled }}
- name: internal-tls
  mountPath: /etc/tandem/internal-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "tandem.commonEnv" -}}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{- define "tandem.internalTlsArgs" -}}
{{- if .Values.internalTls.enabled -}}
--internal-tls-certfile /etc/tandem/internal-tls/tls.crt --internal-tls-keyfile /etc/tandem/internal-tls/tls.key --internal-tls-ca-certs /etc/tandem/internal-tls/ca.crt --internal-tls-server-name {{ .Values.internalTls.serverName }}
{{- end -}}
{{- end -}}

{{- define "tandem.gpusPerWorker" -}}
{{- if eq .Values.accelerator.type "nvidia" }}{{ max (int .Values.prefill.parallelism.tensor) (int .Values.decode.parallelism.tensor) }}{{ else }}0{{ end -}}
{{- end -}}

{{/* tandem controller's engine and pool flags (cluster/controller_cli.py). */}}
{{- define "tandem.controllerArgs" -}}
{{- $e := .Values.engine -}}
--ray-address auto --registry-port 50100 --pool-resources --follow-nodes --redis-url "$TANDEM_REDIS_URL"
{{- printf " --drain-timeout-s %d" (int .Values.head.drainTimeoutSeconds) }}
{{- with .Values.model.path }} --model {{ . | squote }}{{ end }}
{{- printf " --tensor-parallel-size %d" (int .Values.prefill.parallelism.tensor) }}
{{- if ne (int .Values.prefill.parallelism.tensor) (int .Values.decode.parallelism.tensor) }}
{{- printf " --decode-tensor-parallel-size %d" (int .Values.decode.parallelism.tensor) }}
{{- end }}
{{- if eq .Values.accelerator.type "nvidia" }} --num-gpus-per-worker 1{{ end }}
{{- printf " --num-cpus-per-worker %v" $e.numCpusPerWorker }} --kv-transport tcp --kv-offload {{ $e.kvOffload }}
{{- if not (kindIs "invalid" $e.maxModelLen) }} --max-model-len {{ int $e.maxModelLen }}{{ end }}
{{- if not (kindIs "invalid" $e.maxNumSeqs) }} --max-num-seqs {{ int $e.maxNumSeqs }}{{ end }}
{{- if not (kindIs "invalid" $e.maxNumBatchedTokens) }} --max-num-batched-tokens {{ int $e.maxNumBatchedTokens }}{{ end }}
{{- if not (kindIs "invalid" $e.enableChunkedPrefill) }} {{ ternary "--enable-chunked-prefill" "--no-enable-chunked-prefill" $e.enableChunkedPrefill }}{{ end }}
{{- if not (kindIs "invalid" $e.kvCacheMemoryBytes) }} --kv-cache-memory-bytes {{ int64 $e.kvCacheMemoryBytes }}{{ end }}
{{- if not (kindIs "invalid" $e.schedulingPolicy) }} --scheduling-policy {{ $e.schedulingPolicy }}{{ end }}
{{- if not (kindIs "invalid" $e.attentionBackend) }} --attention-backend {{ $e.attentionBackend }}{{ end }}
{{- if $e.enforceEager }} --enforce-eager{{ end }}
{{- with $e.cudagraphCaptureSizes }} --cudagraph-capture-sizes {{ range $i, $n := . }}{{ if $i }},{{ end }}{{ int $n }}{{ end }}{{ end }}
{{- if not (kindIs "invalid" $e.torchThreads) }} --torch-threads {{ int $e.torchThreads }}{{ end }}
{{- with (include "tandem.internalTlsArgs" .) }} {{ . }}{{ end }} --log-level {{ $e.logLevel }}
{{- end -}}
