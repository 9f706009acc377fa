{{- define "enclave.fullname" -}}
{{- printf "%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "enclave.labels" -}}
app.kubernetes.io/name: enclave
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "enclave.selector" -}}
app.kubernetes.io/name: enclave
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "enclave.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "enclave.fullname" .)) -}}
{{- end -}}

{{/* Environment shared by the API and the fine-tuning job: config file and secrets. */}}
{{- define "enclave.env" -}}
- name: ENCLAVE_CONFIG
  value: /etc/enclave/enclave.yaml
- name: ENCLAVE_DATABASE_URL
  valueFrom: {secretKeyRef: {name: {{ include "enclave.secretName" . }}, key: database-url, optional: true}}
- name: ENCLAVE_SECURITY__API_KEY_SECRET
  valueFrom: {secretKeyRef: {name: {{ include "enclave.secretName" . }}, key: api-key-secret}}
- name: ENCLAVE_METRICS__BEARER_TOKEN
  valueFrom: {secretKeyRef: {name: {{ include "enclave.secretName" . }}, key: metrics-token}}
- name: ENCLAVE_GENERATION__OPENAI_API_KEY
  valueFrom: {secretKeyRef: {name: {{ include "enclave.secretName" . }}, key: openai-api-key, optional: true}}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end -}}

{{- define "enclave.volumes" -}}
- name: config
  configMap: {name: {{ include "enclave.fullname" . }}-config}
- name: data
  persistentVolumeClaim: {claimName: {{ include "enclave.fullname" . }}-data}
- name: models
  persistentVolumeClaim: {claimName: {{ include "enclave.fullname" . }}-models}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "enclave.volumeMounts" -}}
- {name: config, mountPath: /etc/enclave, readOnly: true}
- {name: data, mountPath: {{ .Values.config.data_dir }}}
- {name: models, mountPath: {{ .Values.config.models_dir }}}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{- define "enclave.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "enclave.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}
