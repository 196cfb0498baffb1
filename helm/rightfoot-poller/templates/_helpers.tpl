{{/*
Chart name, truncated to the 63 characters Kubernetes allows in a DNS label.
*/}}
{{- define "rightfoot-poller.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters. The release name is used as is
when it already contains the chart name.
*/}}
{{- define "rightfoot-poller.fullname" -}}
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
Chart name and version, as used by the chart label.
*/}}
{{- define "rightfoot-poller.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "rightfoot-poller.labels" -}}
helm.sh/chart: {{ include "rightfoot-poller.chart" . }}
{{ include "rightfoot-poller.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rightfoot-poller
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (never add the version here).
*/}}
{{- define "rightfoot-poller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rightfoot-poller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the service account to use.
*/}}
{{- define "rightfoot-poller.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rightfoot-poller.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the credentials: the existing one, or the chart's.
*/}}
{{- define "rightfoot-poller.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "rightfoot-poller.fullname" . }}
{{- end }}
{{- end }}

{{/*
Container image reference; a digest wins over the tag.
*/}}
{{- define "rightfoot-poller.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
True ("true") when Kafka uses SASL, so a SASL password must be delivered.
*/}}
{{- define "rightfoot-poller.kafkaSasl" -}}
{{- if hasPrefix "SASL" (.Values.config.kafka.security_protocol | default "PLAINTEXT") }}true{{- end }}
{{- end }}

{{/*
True ("true") when the schema registry uses basic auth (config.schema_registry.username),
so its password must be delivered.
*/}}
{{- define "rightfoot-poller.schemaRegistryAuth" -}}
{{- $registry := .Values.config.schema_registry | default dict }}
{{- if $registry.username }}true{{- end }}
{{- end }}

{{/*
The service configuration (config.yaml): .Values.config without empty values, plus the
paths of the files this chart mounts (TLS material, API CA bundle).
*/}}
{{- define "rightfoot-poller.config" -}}
{{- $config := dict }}
{{- range $key, $value := .Values.config }}
{{- if kindIs "map" $value }}
{{- $section := dict }}
{{- range $k, $v := $value }}
{{- if not (or (kindIs "invalid" $v) (and (kindIs "string" $v) (eq $v ""))) }}
{{- $_ := set $section $k $v }}
{{- end }}
{{- end }}
{{- $_ := set $config $key $section }}
{{- else if not (or (kindIs "invalid" $value) (and (kindIs "string" $value) (eq $value ""))) }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- end }}
{{- $kafka := get $config "kafka" | default dict }}
{{- if .Values.kafkaTls.enabled }}
{{- $dir := .Values.kafkaTls.mountPath }}
{{- if .Values.kafkaTls.caKey }}{{ $_ := set $kafka "ssl_cafile" (printf "%s/%s" $dir .Values.kafkaTls.caKey) }}{{ end }}
{{- if .Values.kafkaTls.certKey }}{{ $_ := set $kafka "ssl_certfile" (printf "%s/%s" $dir .Values.kafkaTls.certKey) }}{{ end }}
{{- if .Values.kafkaTls.keyKey }}{{ $_ := set $kafka "ssl_keyfile" (printf "%s/%s" $dir .Values.kafkaTls.keyKey) }}{{ end }}
{{- end }}
{{- $_ := set $config "kafka" $kafka }}
{{- if .Values.schemaRegistryTls.enabled }}
{{- $registry := get $config "schema_registry" | default dict }}
{{- $dir := .Values.schemaRegistryTls.mountPath }}
{{- if .Values.schemaRegistryTls.caKey }}{{ $_ := set $registry "ssl_cafile" (printf "%s/%s" $dir .Values.schemaRegistryTls.caKey) }}{{ end }}
{{- if .Values.schemaRegistryTls.certKey }}{{ $_ := set $registry "ssl_certfile" (printf "%s/%s" $dir .Values.schemaRegistryTls.certKey) }}{{ end }}
{{- if .Values.schemaRegistryTls.keyKey }}{{ $_ := set $registry "ssl_keyfile" (printf "%s/%s" $dir .Values.schemaRegistryTls.keyKey) }}{{ end }}
{{- $_ := set $config "schema_registry" $registry }}
{{- end }}
{{- if .Values.apiCaBundle.enabled }}
{{- $rightfoot := get $config "rightfoot" | default dict }}
{{- $_ := set $rightfoot "ca_bundle" (printf "%s/%s" .Values.apiCaBundle.mountPath .Values.apiCaBundle.key) }}
{{- $_ := set $config "rightfoot" $rightfoot }}
{{- end }}
{{- toYaml $config }}
{{- end }}
