{{/*
Labels of every object: kustomize's app.kubernetes.io/part-of, then commonLabels.
*/}}
{{- define "phabmesh.labels" -}}
{{- toYaml (merge (dict) .Values.commonLabels (dict "app.kubernetes.io/part-of" "phabmesh")) }}
{{- end }}

{{/*
metadata of an object: its name, the release namespace when namespaced, labels and
commonAnnotations. Called with (list $ "name") or (list $ "name" "cluster") for a
cluster-scoped object.
*/}}
{{- define "phabmesh.metadata" -}}
{{- $ := index . 0 -}}
name: {{ index . 1 }}
{{- if ne (len .) 3 }}
namespace: {{ $.Release.Namespace }}
{{- end }}
labels:
  {{- include "phabmesh.labels" $ | nindent 2 }}
{{- with $.Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Labels of a pod template: its app.kubernetes.io/name (the selectors'), then the labels of
every object.
*/}}
{{- define "phabmesh.podLabels" -}}
{{- $ := index . 0 -}}
{{- toYaml (merge (dict "app.kubernetes.io/name" (index . 1)) $.Values.commonLabels (dict "app.kubernetes.io/part-of" "phabmesh")) }}
{{- end }}

{{- define "phabmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "phabmesh.imagePullPolicy" -}}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/*
A pod spec's pull secrets and scheduling, for (list $ .Values.operator "phabmesh-operator")
or the gateway's: its priority class, node selector, tolerations, topology spread, and its
affinity (by default, replicas preferably on different nodes).
*/}}
{{- define "phabmesh.podScheduling" -}}
{{- $ := index . 0 -}}
{{- $component := index . 1 -}}
{{- with $component.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $component.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
affinity:
{{- if $component.affinity }}
  {{- toYaml $component.affinity | nindent 2 }}
{{- else }}
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels: {app.kubernetes.io/name: {{ index . 2 }}}
{{- end }}
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $component.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $component.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
