{{/* Chart name. */}}
{{- define "volmig.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix: <release>-volmig, or the release name when it already says volmig. */}}
{{- define "volmig.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "volmig.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every resource carries. */}}
{{- define "volmig.labels" -}}
helm.sh/chart: {{ include "volmig.chart" . }}
app.kubernetes.io/name: {{ include "volmig.name" . }}
app.kubernetes.io/instance: {{ include "volmig.instance" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: volmig
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The release's app.kubernetes.io/instance: the operator dials only the agents carrying it (--instance). */}}
{{- define "volmig.instance" -}}
{{- .Release.Name -}}
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "operator"). */}}
{{- define "volmig.selectorLabels" -}}
app.kubernetes.io/name: {{ include "volmig.name" .ctx }}
app.kubernetes.io/instance: {{ include "volmig.instance" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Values two components must agree on. Templates read them only through these
helpers (scripts/check-chart fails when one reads .Values for them directly),
so the operator's flags and the agents' mounts, ports and certificates
cannot drift apart.
*/}}
{{/* kubelet's root directory: the agents mount it at the same path; the operator (--kubelet-dir) builds target device paths under it. */}}
{{- define "volmig.kubeletDir" -}}
{{- .Values.agent.kubeletDir | trimSuffix "/" -}}
{{- end -}}

{{/* The agents' gRPC port: the agent's --grpc and containerPort, the operator's --agent-port. */}}
{{- define "volmig.agentPort" -}}
{{- .Values.agent.grpcPort -}}
{{- end -}}

{{/* The DNS name in the agent certificate: the operator checks it (--agent-tls-name) and issues it. */}}
{{- define "volmig.agentTlsName" -}}
{{- .Values.tls.agentName -}}
{{- end -}}

{{/* Where both pods mount their TLS files (ca.pem, <role>.pem, <role>-key.pem). */}}
{{- define "volmig.tlsDir" -}}
/etc/volmig/tls
{{- end -}}

{{/* The holder pods' image: the operator's --holder-image and its admission policy's rule. */}}
{{- define "volmig.holderImage" -}}
{{- .Values.operator.holderImage -}}
{{- end -}}

{{/* The Lease of leader election: the operator's --lease-name and its Role's resourceNames. */}}
{{- define "volmig.leaseName" -}}
{{- .Values.operator.leaseName -}}
{{- end -}}

{{- define "volmig.operator.fullname" -}}
{{- printf "%s-operator" (include "volmig.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "volmig.agent.fullname" -}}
{{- printf "%s-agent" (include "volmig.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "volmig.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "volmig.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "volmig.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "volmig.agent.fullname" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The images. volmig publishes none, so there is no default repository (a
default name this project does not control could pull anyone's image into a
privileged DaemonSet): values.schema.json refuses an empty one, and so does
this (for --skip-schema-validation).
*/}}
{{- define "volmig.operator.image" -}}
{{- $repo := required "operator.image.repository is required: volmig publishes no images; build images/operator.Dockerfile and set the name you pushed (see the README's Kubernetes section)" .Values.operator.image.repository -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "volmig.agent.image" -}}
{{- $repo := required "agent.image.repository is required: volmig publishes no images; build images/agent.Dockerfile and set the name you pushed (see the README's Kubernetes section)" .Values.agent.image.repository -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.agent.image.tag) -}}
{{- end -}}

{{/*
The Secret the operator issues the certificates into (ca.pem, ca-key.pem,
agent.pem, agent-key.pem, master.pem, master-key.pem) and renews: the
operator's --tls-secret, the pods' tls volume. Nothing here generates
certificates, so rendering the chart twice gives the same output.
*/}}
{{- define "volmig.tlsSecretName" -}}
{{- printf "%s-tls" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* cert-manager Secrets: one per certificate, keys tls.crt, tls.key, ca.crt. */}}
{{- define "volmig.agentCertSecretName" -}}
{{- printf "%s-agent-tls" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "volmig.masterCertSecretName" -}}
{{- printf "%s-master-tls" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The operator's flags that say which pods are this release's agents: the
agent pods' selector labels (name, instance; component node-agent is the
operator's own), from the same helpers as the DaemonSet's.
*/}}
{{- define "volmig.agentLabelArgs" -}}
- --app-name={{ include "volmig.name" . }}
- --instance={{ include "volmig.instance" . }}
{{- end -}}

{{/*
The pod volume "tls" with exactly the files one side needs, under the names
the binaries read: (dict "ctx" $ "role" "agent"|"master").
The agent gets ca.pem, agent.pem, agent-key.pem; the operator ca.pem,
master.pem, master-key.pem. Neither sees the other's key, nor the CA key. A
projected volume of an optional Secret: the pods start before the Secret
exists (the operator creates it), kubelet fills the files in once it does
and updates them when the certificates are renewed, and the binaries wait
for them and read them again for every connection. The operator runs as
non-root with fsGroup, so its files are group-readable (0440); the agent
runs as root (0400).
*/}}
{{- define "volmig.tlsVolume" -}}
{{- $ctx := .ctx -}}
- name: tls
  projected:
    defaultMode: {{ if eq .role "agent" }}0400{{ else }}0440{{ end }}
    sources:
      - secret:
{{- if $ctx.Values.certManager.enabled }}
          name: {{ if eq .role "agent" }}{{ include "volmig.agentCertSecretName" $ctx }}{{ else }}{{ include "volmig.masterCertSecretName" $ctx }}{{ end }}
          optional: true
          items:
            - key: ca.crt
              path: ca.pem
            - key: tls.crt
              path: {{ .role }}.pem
            - key: tls.key
              path: {{ .role }}-key.pem
{{- else }}
          name: {{ include "volmig.tlsSecretName" $ctx }}
          optional: true
          items:
            - key: ca.pem
              path: ca.pem
            - key: {{ .role }}.pem
              path: {{ .role }}.pem
            - key: {{ .role }}-key.pem
              path: {{ .role }}-key.pem
{{- end }}
{{- end -}}

{{/*
The CSI driver: its name, the controller's names, the node plugin's socket
directory under kubelet's plugins (the agent serves it, node-driver-registrar
registers it).
*/}}
{{- define "volmig.csi.driverName" -}}csi.volmig.io{{- end -}}

{{- define "volmig.csi.fullname" -}}
{{- printf "%s-csi-controller" (include "volmig.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "volmig.csi.serviceAccountName" -}}
{{- if .Values.csi.controller.serviceAccount.create -}}
{{- default (include "volmig.csi.fullname" .) .Values.csi.controller.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.csi.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "volmig.csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (include "volmig.kubeletDir" .) (include "volmig.csi.driverName" .) -}}
{{- end -}}
