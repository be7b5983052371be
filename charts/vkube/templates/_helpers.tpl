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

{{/* Where `vkube run` writes certificates, admission.yaml and controller-manager.kubeconfig. */}}
{{- define "vkube.certDir" -}}/pki{{- end -}}

{{/*
The host's Service IP range: the value if given, else the first IPv4 range of the host's
ServiceCIDR objects ("kubernetes" first), looked up at install time with the installer's own
credentials. `helm lint` cannot look up (and sets neither IsInstall nor IsUpgrade): it renders a
placeholder. `helm template` cannot either: it fails and says how to give the value.
*/}}
{{- define "vkube.serviceCIDR" -}}
{{- if .Values.serviceCIDR -}}
{{- .Values.serviceCIDR -}}
{{- else -}}
{{- $found := "" -}}
{{- $list := lookup "networking.k8s.io/v1" "ServiceCIDR" "" "" -}}
{{- range $pass := list "kubernetes" "" -}}
{{- range ($list.items | default list) -}}
{{- if and (not $found) (or (eq $pass "") (eq .metadata.name $pass)) -}}
{{- range (.spec.cidrs | default list) -}}
{{- if and (not $found) (not (contains ":" .)) -}}
{{- $found = . -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $found -}}
{{- $found -}}
{{- else if or .Release.IsInstall .Release.IsUpgrade -}}
{{- fail "serviceCIDR: the host's Service IP range could not be looked up (no IPv4 ServiceCIDR object readable on the host, or `helm template` / --dry-run=client, which cannot look up): give it, e.g. --set serviceCIDR=$(kubectl get servicecidr kubernetes -o jsonpath='{.spec.cidrs[0]}')" -}}
{{- else -}}
looked-up-at-install
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A map as key=value pairs, comma-separated (sorted, as range sorts map keys). */}}
{{- define "vkube.pairs" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
