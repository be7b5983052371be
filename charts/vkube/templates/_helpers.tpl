{{/*
The virtual cluster's name: the release name, a DNS label. At most 52 characters so the
StatefulSet's pod revision label (NAME-<10 characters>) stays a valid label value.
*/}}
{{- define "vkube.name" -}}
{{- $n := .Release.Name -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $n) -}}
{{- fail (printf "the release name %q is the virtual cluster's name and must be a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)" $n) -}}
{{- end -}}
{{- if gt (len $n) 52 -}}
{{- fail (printf "the release name %q is the virtual cluster's name and must be at most 52 characters" $n) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/* Labels that find this cluster's pod (immutable: StatefulSet selector, Service selector). */}}
{{- define "vkube.selectorLabels" -}}
vkube.dev/control-plane: {{ include "vkube.name" . }}
app.kubernetes.io/name: vkube
app.kubernetes.io/instance: {{ include "vkube.name" . }}
{{- end -}}

{{/* On every object: vkube's own marks (vkube/src/names.rs `labels`) and the usual ones. */}}
{{- define "vkube.labels" -}}
{{ include "vkube.selectorLabels" . }}
app.kubernetes.io/managed-by: vkube
app.kubernetes.io/component: control-plane
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Cluster-scoped objects are shared by every namespace: named after both. */}}
{{- define "vkube.clusterRoleName" -}}
{{- printf "vkube:%s:%s" .Release.Namespace (include "vkube.name" .) -}}
{{- end -}}

{{- define "vkube.serviceAccountName" -}}
{{- printf "vkube-%s" (include "vkube.name" .) -}}
{{- end -}}

{{- define "vkube.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{/* Where `vkube prepare` writes certificates, admission.yaml and controller-manager.kubeconfig. */}}
{{- define "vkube.certDir" -}}/pki{{- end -}}

{{- define "vkube.serviceCIDR" -}}
{{- required "serviceCIDR is required: the host's Service IP range, e.g. --set serviceCIDR=10.96.0.0/16 (`vkube create` sets it)" .Values.serviceCIDR -}}
{{- end -}}

{{/* A map as key=value pairs, comma-separated (sorted, as range sorts map keys). */}}
{{- define "vkube.pairs" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
