{{/* Chart name, truncated to the 63-character DNS label limit. */}}
{{- define "temper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-<chart>, or just <release> when it already contains the chart name. */}}
{{- define "temper.fullname" -}}
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

{{- define "temper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "temper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "temper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "temper.labels" -}}
helm.sh/chart: {{ include "temper.chart" . }}
{{ include "temper.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: temper
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "temper.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "temper.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "temper.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "temper.leaseName" -}}
{{- default (printf "%s-leader" (include "temper.fullname" .)) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{- define "temper.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
Rules the operator needs inside every namespace it reconciles. Shared by the ClusterRole
(cluster-wide mode) and the per-namespace Roles, so both modes grant exactly the same verbs.
Keep in sync with the RBAC sections of docs/operator.md and docs/continual.md.
*/}}
{{- define "temper.namespacedRules" -}}
# Runs: watched; each continual cycle runs as a child PostTrainingRun, pruned to the run's
# historyLimit (create, delete). The operator writes runs only through the status subresource.
- apiGroups: ["temper.dev"]
  resources: ["posttrainingruns"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Adapters: each published stage output is created in the catalog; the retention finalizer is
# patched on.
- apiGroups: ["temper.dev"]
  resources: ["adapters"]
  verbs: ["get", "list", "watch", "patch", "create"]
# Status is only ever merge-patched (never read through the subresource or replaced).
- apiGroups: ["temper.dev"]
  resources: ["posttrainingruns/status", "adapters/status"]
  verbs: ["patch"]
# Jobs and child runs carry an owner reference with blockOwnerDeletion, which clusters with
# OwnerReferencesPermissionEnforcement only accept from those who may update the owner's finalizers.
- apiGroups: ["temper.dev"]
  resources: ["posttrainingruns/finalizers"]
  verbs: ["update"]
# One Job per stage attempt; patch to suspend/resume. A suspended Kueue run's Job is deleted
# (Kueue would readmit a merely suspended one); otherwise deletion is left to the GC.
# Jobs, pods and Services are only listed and watched (into caches), never read one by one.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Trainer pods' termination messages carry each stage's result; disruptions are read from them.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Headless Services for multi-node (torchrun) rendezvous.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create"]
{{- if .Values.networkPolicy.trainer.enabled }}
# One NetworkPolicy per run for its trainer pods, created with its first Job (owned by the run).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create"]
{{- end }}
# Events are posted through core/v1 (the operator's and kopf's), each a new object.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if not (include "temper.clusterWide" .) }}
{{ include "temper.tenantRules" . }}
{{- else }}
# Alias ConfigMaps are watched everywhere (written only where a tenant Role allows it).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- end }}

{{/*
Rules that reach a tenant's secrets or change what others read: in namespaced mode part of each
Role; in cluster-wide mode only in the namespaces temper serves (rbac.servedNamespaces and the
rbac.servedNamespaceLabel namespaces), never cluster-wide, so kube-system's stay out of reach.
*/}}
{{- define "temper.tenantRules" -}}
# Storage credentials, read to fetch progress and verify manifests. Never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Promotion aliases are published as ConfigMaps that serving systems read.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "update"]
{{- end }}

{{/* The namespaces a cluster-wide operator serves: rbac.servedNamespaces, then those labelled. */}}
{{- define "temper.servedNamespaces" -}}
{{- $out := list }}
{{- range .Values.rbac.servedNamespaces }}{{ $out = append $out . }}{{ end }}
{{- with .Values.rbac.servedNamespaceLabel }}
{{- $found := lookup "v1" "Namespace" "" "" }}
{{- range (($found).items | default list) }}
{{- if and (eq (get (.metadata.labels | default dict) $.Values.rbac.servedNamespaceLabel) "true") (ne ((.status).phase) "Terminating") }}{{ $out = append $out .metadata.name }}{{ end }}
{{- end }}
{{- end }}
{{- toJson ($out | uniq | sortAlpha) }}
{{- end }}

{{/* Storage endpoints a run or Adapter may name, as a CEL list: policy.allowedStorageEndpoints plus storage.endpoint. */}}
{{- define "temper.allowedEndpoints" -}}
{{- $endpoints := list }}
{{- range .Values.policy.allowedStorageEndpoints }}{{ $endpoints = append $endpoints (trimSuffix "/" .) }}{{ end }}
{{- with .Values.storage.endpoint }}{{ $endpoints = append $endpoints (trimSuffix "/" .) }}{{ end }}
{{- toJson $endpoints }}
{{- end }}

{{/* The platform policy as the operator reads it (TEMPER_POLICY, operator/temper/policy.py). */}}
{{- define "temper.policyJson" -}}
{{- $p := omit .Values.policy "admission" }}
{{- $_ := set $p "defaultTrainerImage" (include "temper.imageRef" (list .Values.trainer.image .)) }}
{{- $_ := set $p "defaultStorageEndpoint" .Values.storage.endpoint }}
{{- toJson $p }}
{{- end }}

{{/* The per-run trainer NetworkPolicy settings as the operator reads them (operator/temper/builders/network.py). */}}
{{- define "temper.trainerNetworkJson" -}}
{{- $np := .Values.networkPolicy }}
{{- toJson (dict "enabled" $np.trainer.enabled "metricsFrom" $np.metricsFrom "storage" $np.egress.storage "hub" $np.trainer.hub "dnsNamespaceLabels" $np.egress.dns.namespaceLabels "dnsPodLabels" $np.egress.dns.podLabels) }}
{{- end }}
