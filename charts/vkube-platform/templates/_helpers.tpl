{{- define "vkube-platform.name" -}}vkube-platform{{- end -}}

{{- define "vkube-platform.selectorLabels" -}}
app.kubernetes.io/name: vkube-platform
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vkube-platform.labels" -}}
{{ include "vkube-platform.selectorLabels" . }}
app.kubernetes.io/managed-by: vkube
app.kubernetes.io/component: platform
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Cluster-scoped names carry the release's namespace: two installs do not collide. */}}
{{- define "vkube-platform.clusterRoleName" -}}
{{- printf "vkube-platform:%s:%s" .Release.Namespace .Release.Name -}}
{{- end -}}
