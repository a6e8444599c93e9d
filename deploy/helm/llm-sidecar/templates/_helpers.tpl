{{/* Chart name, overridable. */}}
{{- define "llm-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, with the chart name unless the release name has it. */}}
{{- define "llm-sidecar.fullname" -}}
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

{{- define "llm-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "llm-sidecar.labels" -}}
helm.sh/chart: {{ include "llm-sidecar.chart" . }}
{{ include "llm-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-sidecar
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The webhook's pods. component=injector is what the webhook's objectSelector excludes. */}}
{{- define "llm-sidecar.webhookSelectorLabels" -}}
{{ include "llm-sidecar.selectorLabels" . }}
app.kubernetes.io/component: injector
{{- end }}

{{- define "llm-sidecar.redisSelectorLabels" -}}
{{ include "llm-sidecar.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "llm-sidecar.webhookName" -}}
{{- printf "%s-webhook" (include "llm-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-sidecar.serviceAccountName" -}}
{{- if .Values.webhook.serviceAccount.create }}
{{- default (include "llm-sidecar.webhookName" .) .Values.webhook.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.webhook.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.tlsSecretName" -}}
{{- printf "%s-webhook-tls" (include "llm-sidecar.fullname" .) }}
{{- end }}

{{- define "llm-sidecar.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* "true" when the sidecar is injected as a native sidecar (initContainer, restartPolicy Always). */}}
{{- define "llm-sidecar.native" -}}
{{- $v := toString .Values.injection.nativeSidecar }}
{{- if eq $v "auto" }}
{{- semverCompare ">=1.29-0" .Capabilities.KubeVersion.Version }}
{{- else }}
{{- eq $v "true" }}
{{- end }}
{{- end }}

{{/* "true" when cert-manager issues the webhook's certificate. */}}
{{- define "llm-sidecar.certManager" -}}
{{- $v := toString .Values.certManager.enabled }}
{{- if eq $v "auto" }}
{{- .Capabilities.APIVersions.Has "cert-manager.io/v1" }}
{{- else }}
{{- eq $v "true" }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the upstream key; empty when agents keep their own keys. */}}
{{- define "llm-sidecar.upstreamSecretName" -}}
{{- if .Values.upstream.apiKey.existingSecret }}
{{- .Values.upstream.apiKey.existingSecret }}
{{- else if .Values.upstream.apiKey.value }}
{{- printf "%s-upstream" (include "llm-sidecar.fullname" .) }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.upstreamSecretKey" -}}
{{- if .Values.upstream.apiKey.existingSecret }}
{{- .Values.upstream.apiKey.existingSecretKey }}
{{- else }}
{{- "api-key" }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the Redis URL; empty without Redis. */}}
{{- define "llm-sidecar.redisSecretName" -}}
{{- if .Values.redis.existingSecret.name }}
{{- .Values.redis.existingSecret.name }}
{{- else if or .Values.redis.url .Values.redis.deploy }}
{{- printf "%s-redis" (include "llm-sidecar.fullname" .) }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.redisSecretKey" -}}
{{- if .Values.redis.existingSecret.name }}
{{- .Values.redis.existingSecret.key }}
{{- else }}
{{- "url" }}
{{- end }}
{{- end }}

{{/*
The sidecar's Prometheus port as a string, empty when off. Helm drops keys whose
value is null, hence dig.
*/}}
{{- define "llm-sidecar.metricsPort" -}}
{{- with dig "prometheusPort" nil .Values.telemetry }}
{{- int . }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.redisHost" -}}
{{- printf "%s-redis.%s.svc" (include "llm-sidecar.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
Recursive merge of .src into .dst (a dict, changed in place): mappings merge key
by key, anything else (lists, false, 0, "") replaces. Sprig's mergeOverwrite
would keep a default true where the user wrote false.
*/}}
{{- define "llm-sidecar.merge" -}}
{{- $dst := .dst }}
{{- range $k, $v := .src }}
{{- if and (kindIs "map" $v) (kindIs "map" (get $dst $k)) }}
{{- include "llm-sidecar.merge" (dict "dst" (get $dst $k) "src" $v) }}
{{- else }}
{{- $_ := set $dst $k $v }}
{{- end }}
{{- end }}
{{- end }}

{{/* The sidecar's config.yaml: chart defaults with .Values.config merged over them. */}}
{{- define "llm-sidecar.sidecarConfig" -}}
{{- $telemetry := dict "enabled" .Values.telemetry.enabled "service_name" .Values.telemetry.serviceName }}
{{- with include "llm-sidecar.metricsPort" . }}
{{- $_ := set $telemetry "prometheus_port" (atoi .) }}
{{- end }}
{{- $cfg := dict
  "server" (dict "host" "127.0.0.1" "port" (int .Values.injection.port))
  "upstream" (dict "base_url" .Values.upstream.baseUrl)
  "logging" (dict "level" "info" "format" "json")
  "telemetry" $telemetry }}
{{- include "llm-sidecar.merge" (dict "dst" $cfg "src" (deepCopy .Values.config)) }}
{{- toYaml $cfg }}
{{- end }}

{{/*
The sidecar's env (k8s EnvVar list): secrets only through secretKeyRef, so no
key or password ever lands in a ConfigMap.
*/}}
{{- define "llm-sidecar.sidecarEnv" -}}
{{- $env := list }}
{{- $upstreamSecret := include "llm-sidecar.upstreamSecretName" . }}
{{- if $upstreamSecret }}
{{- $env = append $env (dict "name" "SIDECAR_UPSTREAM__API_KEY" "valueFrom" (dict "secretKeyRef" (dict "name" $upstreamSecret "key" (include "llm-sidecar.upstreamSecretKey" .)))) }}
{{- end }}
{{- $redisSecret := include "llm-sidecar.redisSecretName" . }}
{{- if $redisSecret }}
{{- $ref := dict "secretKeyRef" (dict "name" $redisSecret "key" (include "llm-sidecar.redisSecretKey" .)) }}
{{- range $feature := list "ratelimit" "cache" "routing" }}
{{- if get $.Values.redis.use $feature }}
{{- $env = append $env (dict "name" (printf "SIDECAR_%s__REDIS_URL" (upper $feature)) "valueFrom" $ref) }}
{{- end }}
{{- end }}
{{- if and .Values.redis.cluster .Values.redis.use.ratelimit }}
{{- $env = append $env (dict "name" "SIDECAR_RATELIMIT__REDIS_CLUSTER" "value" "true") }}
{{- end }}
{{- end }}
{{- with .Values.telemetry.otlp.endpoint }}
{{- $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_ENDPOINT" "value" .) }}
{{- $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_PROTOCOL" "value" $.Values.telemetry.otlp.protocol) }}
{{- end }}
{{- with .Values.telemetry.otlp.headersSecret.name }}
{{- $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_HEADERS" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $.Values.telemetry.otlp.headersSecret.key))) }}
{{- end }}
{{- $sampler := .Values.telemetry.traces.sampler }}
{{- $env = append $env (dict "name" "OTEL_TRACES_SAMPLER" "value" $sampler) }}
{{- if hasSuffix "traceidratio" $sampler }}
{{- $env = append $env (dict "name" "OTEL_TRACES_SAMPLER_ARG" "value" (toString .Values.telemetry.traces.ratio)) }}
{{- end }}
{{- with .Values.telemetry.resourceAttributes }}
{{- $attrs := list }}
{{- range $k, $v := . }}
{{- $attrs = append $attrs (printf "%s=%v" $k $v) }}
{{- end }}
{{- $env = append $env (dict "name" "OTEL_RESOURCE_ATTRIBUTES" "value" (join "," $attrs)) }}
{{- end }}
{{- with dig "metricExportIntervalMs" nil .Values.telemetry }}
{{- $env = append $env (dict "name" "OTEL_METRIC_EXPORT_INTERVAL" "value" (toString (int .))) }}
{{- end }}
{{- if not .Values.telemetry.enabled }}
{{- $env = append $env (dict "name" "OTEL_SDK_DISABLED" "value" "true") }}
{{- end }}
{{- $env = concat $env .Values.sidecar.extraEnv }}
{{- toYaml $env }}
{{- end }}

{{/* injector.yaml, in the shape the webhook's loader reads (see the k8s contract). */}}
{{- define "llm-sidecar.injectorConfig" -}}
{{- $metricsPort := dict "port" nil }}
{{- with include "llm-sidecar.metricsPort" . }}
{{- $_ := set $metricsPort "port" (atoi .) }}
{{- end }}
{{- $sidecar := dict
  "name" .Values.injection.containerName
  "image" (include "llm-sidecar.image" .)
  "imagePullPolicy" .Values.image.pullPolicy
  "native" (eq (include "llm-sidecar.native" .) "true")
  "port" (int .Values.injection.port)
  "healthPort" (int .Values.injection.healthPort)
  "metricsPort" $metricsPort.port
  "configMap" (printf "%s-config" (include "llm-sidecar.fullname" .))
  "env" (include "llm-sidecar.sidecarEnv" . | fromYamlArray)
  "resources" .Values.sidecar.resources
  "securityContext" .Values.sidecar.securityContext }}
{{- toYaml (dict "sidecar" $sidecar "baseUrlEnv" .Values.injection.baseUrlEnv) }}
{{- end }}

{{/* Fail early on values the schema cannot express. */}}
{{- define "llm-sidecar.validate" -}}
{{- if has .Release.Namespace (list "kube-system" "kube-public" "kube-node-lease") }}
{{- fail (printf "llm-sidecar: refusing to install into %s: the webhook never injects system namespaces; install into the agents' namespace" .Release.Namespace) }}
{{- end }}
{{- $redisSources := 0 }}
{{- if .Values.redis.url }}{{ $redisSources = add1 $redisSources }}{{ end }}
{{- if .Values.redis.existingSecret.name }}{{ $redisSources = add1 $redisSources }}{{ end }}
{{- if .Values.redis.deploy }}{{ $redisSources = add1 $redisSources }}{{ end }}
{{- if gt $redisSources 1 }}
{{- fail "llm-sidecar: set only one of redis.url, redis.existingSecret.name and redis.deploy" }}
{{- end }}
{{- if and .Values.redis.cluster (or .Values.redis.use.cache .Values.redis.use.routing) }}
{{- fail "llm-sidecar: redis.cluster: only rate limits support Redis Cluster (the cache and budgets read keys of different slots in one command); set redis.use.cache=false and redis.use.routing=false, or use a standalone or Sentinel Redis" }}
{{- end }}
{{- if and .Values.redis.deploy .Values.redis.cluster }}
{{- fail "llm-sidecar: redis.deploy runs a single Redis, not a cluster: unset redis.cluster" }}
{{- end }}
{{- if and .Values.upstream.apiKey.value .Values.upstream.apiKey.existingSecret }}
{{- fail "llm-sidecar: set only one of upstream.apiKey.value and upstream.apiKey.existingSecret" }}
{{- end }}
{{- /* config.yaml is a ConfigMap: anything secret in it would be readable by anyone who can read ConfigMaps. */}}
{{- $cfg := .Values.config }}
{{- if and (kindIs "map" (get $cfg "upstream")) (get (get $cfg "upstream") "api_key") }}
{{- fail "llm-sidecar: config.upstream.api_key would put the key in a ConfigMap: set upstream.apiKey.existingSecret (or upstream.apiKey.value) instead" }}
{{- end }}
{{- if kindIs "map" (get $cfg "upstreams") }}
{{- range $name, $u := get $cfg "upstreams" }}
{{- if and (kindIs "map" $u) (get $u "api_key") }}
{{- fail (printf "llm-sidecar: config.upstreams.%s.api_key would put the key in a ConfigMap: set api_key_env and pass the variable with sidecar.extraEnv (secretKeyRef)" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $section := list "ratelimit" "cache" "routing" }}
{{- if and (kindIs "map" (get $cfg $section)) (get (get $cfg $section) "redis_url") }}
{{- fail (printf "llm-sidecar: config.%s.redis_url: set redis.url or redis.existingSecret instead (the URL may hold a password and goes through a Secret)" $section) }}
{{- end }}
{{- end }}
{{- $ports := list (int .Values.injection.port) (int .Values.injection.healthPort) }}
{{- with include "llm-sidecar.metricsPort" . }}
{{- $ports = append $ports (atoi .) }}
{{- end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail "llm-sidecar: injection.port, injection.healthPort and telemetry.prometheusPort must differ" }}
{{- end }}
{{- end }}
