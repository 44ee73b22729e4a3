{{- define "flywheel.name" -}}flywheel-operator{{- end -}}

{{- define "flywheel.labels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flywheel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image: its override, else REGISTRY/NAME:TAG (the tag defaults to the chart's appVersion). */}}
{{- define "flywheel.image" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}{{- $override := index . 2 -}}{{- $suffix := index . 3 -}}
{{- if $override -}}{{ $override }}
{{- else -}}{{ printf "%s/%s:%s%s" (trimSuffix "/" $root.Values.image.registry) $name ($root.Values.image.tag | default $root.Chart.AppVersion) $suffix }}
{{- end -}}
{{- end -}}
