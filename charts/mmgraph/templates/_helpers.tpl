{{- define "mmgraph.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mmgraph.serviceAccountName" -}}
{{- default (include "mmgraph.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "mmgraph.labels" -}}
app.kubernetes.io/name: mmgraph-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mmgraph.selector" -}}
app.kubernetes.io/name: mmgraph-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The rules the operator needs, nothing more: read graphs, write their status, own the child kinds. */}}
{{- define "mmgraph.rules" -}}
- apiGroups: [mmgraph.io]
  resources: [multimodalgraphs]
  verbs: [get, list, watch]
- apiGroups: [mmgraph.io]
  resources: [multimodalgraphs/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# each graph's peer credential: created once, never read (RBAC cannot limit reads by label; list/watch are reads)
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
{{- end -}}
