{{/* The chart's name, "gpu-plugin" unless overridden. */}}
{{- define "gpu-plugin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name when it already contains the chart's name, else release-chart. */}}
{{- define "gpu-plugin.fullname" -}}
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

{{/* Labels that select the DaemonSet's pods; never change them after an install. */}}
{{- define "gpu-plugin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-plugin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object. The Helm-only ones (chart, managed-by) are left out of the static manifest
by its generator, which drops exactly the lines that carry these two keys.
*/}}
{{- define "gpu-plugin.labels" -}}
{{ include "gpu-plugin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: gpu-plugin
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gpu-plugin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpu-plugin.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gpu-plugin.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "gpu-plugin.configMapName" -}}
{{- default (printf "%s-config" (include "gpu-plugin.fullname" .)) .Values.config.existingConfigMap }}
{{- end }}

{{/* Whether a web config is in use, and the Secret that holds it. */}}
{{- define "gpu-plugin.webConfigEnabled" -}}
{{- if or .Values.webConfig.config .Values.webConfig.existingSecret }}true{{ end }}
{{- end }}

{{- define "gpu-plugin.webConfigSecretName" -}}
{{- default (printf "%s-web-config" (include "gpu-plugin.fullname" .)) .Values.webConfig.existingSecret }}
{{- end }}

{{- define "gpu-plugin.scheme" -}}
{{- if .Values.webConfig.tls }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* failOnInitError as "true", "false" or "" (unset), whether given as a string or a boolean. */}}
{{- define "gpu-plugin.failOnInitError" -}}
{{- if not (kindIs "invalid" .Values.failOnInitError) }}{{ toString .Values.failOnInitError }}{{ end }}
{{- end }}

{{/*
Whether the driver root is mounted at /driver-root: with a driver container (driverRoot not "/"),
with a cdi-* device list strategy (in deviceListStrategy or on an uncommented line of the inline
config), whose CDI spec lists the driver's libraries and binaries found there, and with DRA, whose
per-claim CDI specs list them too.
*/}}
{{- define "gpu-plugin.mountDriverRoot" -}}
{{- if or (ne .Values.driverRoot "/") (contains "cdi-" (toString .Values.deviceListStrategy)) (regexMatch "(?m)^[^#\n]*cdi-(annotations|cri)" (toString .Values.config.inline)) (include "gpu-plugin.draOn" .) }}true{{ end }}
{{- end }}

{{/* Whether the daemon serves DRA: dra.mode dra or split. */}}
{{- define "gpu-plugin.draOn" -}}
{{- if has (toString .Values.dra.mode) (list "dra" "split") }}true{{ end }}
{{- end }}

{{/* The DRA devices (dra.devices) comma-joined: GPU_PLUGIN_DRA_DEVICES. */}}
{{- define "gpu-plugin.draDevices" -}}
{{- join "," .Values.dra.devices }}
{{- end }}

{{/* dra.kubeletRegistrarDirectoryPath and dra.kubeletPluginsDirectoryPath, cleaned: host and container paths. */}}
{{- define "gpu-plugin.draRegistrarDir" -}}
{{- clean (toString .Values.dra.kubeletRegistrarDirectoryPath) }}
{{- end }}

{{- define "gpu-plugin.draPluginsDir" -}}
{{- clean (toString .Values.dra.kubeletPluginsDirectoryPath) }}
{{- end }}

{{/*
Whether a config file the chart holds shares GPUs through MPS: a sharing.mps section that is not null
(as the daemon reads it: an empty one counts) in the sharing value, config.inline, or any file of
config.map, each parsed as YAML, so commented-out sections do not count. A file in
config.existingConfigMap is out of the chart's sight: mps.enabled stands for it.
*/}}
{{- define "gpu-plugin.mpsInConfig" -}}
{{- $files := list }}
{{- if not .Values.config.existingConfigMap }}
{{- if .Values.config.map }}
{{- $files = values .Values.config.map }}
{{- else }}
{{- $files = list (toString .Values.config.inline) (toYaml (dict "sharing" .Values.sharing)) }}
{{- end }}
{{- end }}
{{- $found := false }}
{{- range $files }}
{{- $sharing := get (fromYaml (toString .)) "sharing" }}
{{- if and (kindIs "map" $sharing) (hasKey $sharing "mps") (not (kindIs "invalid" (get $sharing "mps"))) }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- if $found }}true{{ end }}
{{- end }}

{{/* Whether MPS is on: mps.enabled, or a sharing.mps section in a config the chart holds. */}}
{{- define "gpu-plugin.mpsWanted" -}}
{{- if or .Values.mps.enabled (include "gpu-plugin.mpsInConfig" .) }}true{{ end }}
{{- end }}

{{/* mps.root, cleaned ("" when unset): MPS_ROOT, and the host path mounted at the same path. */}}
{{- define "gpu-plugin.mpsRoot" -}}
{{- with .Values.mps.root }}{{ clean . }}{{ end }}
{{- end }}

{{/* Whether the MPS mounts (mps.root, and its shm at /dev/shm) are rendered. */}}
{{- define "gpu-plugin.mpsMounts" -}}
{{- if and (include "gpu-plugin.mpsWanted" .) (include "gpu-plugin.mpsRoot" .) }}true{{ end }}
{{- end }}

{{/* Whether the MIG strategy set here makes NVML list MIG devices. */}}
{{- define "gpu-plugin.migEnabled" -}}
{{- if has .Values.migStrategy (list "single" "mixed") }}true{{ end }}
{{- end }}

{{/*
The probes: GET /healthz and /readyz, over HTTPS when the web config turns TLS on (the kubelet does
not verify the certificate). With basic auth every path needs a password the kubelet does not have,
so both probes only open a TCP connection.
*/}}
{{- define "gpu-plugin.probe" -}}
{{- if .root.Values.webConfig.basicAuth }}
tcpSocket:
  port: metrics
{{- else }}
httpGet:
  path: {{ .path }}
  port: metrics
  scheme: {{ include "gpu-plugin.scheme" .root }}
{{- end }}
{{- end }}

{{/* Input checks: each names the values at fault and the fix. */}}
{{- define "gpu-plugin.validate" -}}
{{- if and .Values.migStrategy (not (has .Values.migStrategy (list "none" "single" "mixed"))) }}
{{- fail (printf "migStrategy %q: want none, single, mixed, or empty to let the config file decide" .Values.migStrategy) }}
{{- end }}
{{- $fail := include "gpu-plugin.failOnInitError" . }}
{{- if and $fail (not (has $fail (list "true" "false"))) }}
{{- fail (printf "failOnInitError %q: want true, false, or empty to let the config file decide" $fail) }}
{{- end }}
{{- if and .Values.sharing .Values.config.existingConfigMap }}
{{- fail "sharing is set but config.existingConfigMap is used: put the sharing section into that ConfigMap's file, or drop config.existingConfigMap" }}
{{- end }}
{{- if and .Values.sharing (regexMatch "(?m)^sharing:" .Values.config.inline) }}
{{- fail "sharing is set and config.inline has its own sharing: section: keep one of them" }}
{{- end }}
{{- if and .Values.webConfig.config .Values.webConfig.existingSecret }}
{{- fail "webConfig.config and webConfig.existingSecret are both set: keep one of them" }}
{{- end }}
{{- if and (contains "tls_server_config" .Values.webConfig.config) (not .Values.webConfig.tls) }}
{{- fail "webConfig.config has tls_server_config: set webConfig.tls=true so that probes and the ServiceMonitor use HTTPS" }}
{{- end }}
{{- if and (contains "basic_auth_users" .Values.webConfig.config) (not .Values.webConfig.basicAuth) }}
{{- fail "webConfig.config has basic_auth_users: set webConfig.basicAuth=true so that the probes stop asking for /healthz without a password" }}
{{- end }}
{{- if and .Values.config.map .Values.config.existingConfigMap }}
{{- fail "config.map and config.existingConfigMap are both set: keep one (for per-node configs in your own ConfigMap, pass --config-dir in extraArgs)" }}
{{- end }}
{{- if and .Values.config.map .Values.sharing }}
{{- fail "sharing is set with config.map: put a sharing section into the named configs that need it" }}
{{- end }}
{{- if and .Values.config.default (not (hasKey .Values.config.map .Values.config.default)) }}
{{- fail (printf "config.default %q is not a key of config.map" .Values.config.default) }}
{{- end }}
{{- if and .Values.perPodUsage.dcgmSeries (not .Values.perPodUsage.enabled) }}
{{- fail "perPodUsage.dcgmSeries needs perPodUsage.enabled=true: the per-pod series come from per-pod accounting" }}
{{- end }}
{{- if and .Values.perPodUsage.virtualGPUs (not .Values.perPodUsage.enabled) }}
{{- fail "perPodUsage.virtualGPUs needs perPodUsage.enabled=true: the per-pod FB_USED and GPU_UTIL values come from per-pod accounting" }}
{{- end }}
{{- if and .Values.nodeHealth.taint (not .Values.nodeHealth.condition) }}
{{- fail "nodeHealth.taint needs nodeHealth.condition=true: the taint is written with the condition, under the same permissions" }}
{{- end }}
{{- if and (include "gpu-plugin.mpsWanted" .) (not .Values.mps.root) }}
{{- $why := "a config the chart holds has a sharing.mps section" }}
{{- if .Values.mps.enabled }}{{ $why = "mps.enabled=true" }}{{ end }}
{{- fail (printf "mps.root is empty while MPS is on (%s): set mps.root to the host directory for the MPS control daemons, e.g. /run/nvidia/mps" $why) }}
{{- end }}
{{- if and (include "gpu-plugin.mpsWanted" .) (eq (include "gpu-plugin.mpsRoot" .) "/") }}
{{- fail "mps.root is \"/\": it is mounted into the container at the same path, so it must be a directory of its own, e.g. /run/nvidia/mps" }}
{{- end }}
{{- if not (has (toString .Values.dra.mode) (list "device-plugin" "dra" "split")) }}
{{- fail (printf "dra.mode %q: want device-plugin, dra or split" (toString .Values.dra.mode)) }}
{{- end }}
{{- $draDevices := include "gpu-plugin.draDevices" . }}
{{- if and (eq .Values.dra.mode "split") (not $draDevices) }}
{{- fail "dra.mode is split but dra.devices is empty: list the GPU UUIDs, MIG UUIDs or GPU indexes that DRA gets (the rest stay with the device plugin), or use dra.mode=dra for all of them" }}
{{- end }}
{{- if and $draDevices (ne .Values.dra.mode "split") }}
{{- fail (printf "dra.devices is set but dra.mode is %s: the device list splits devices between DRA and the device plugin, so set dra.mode=split, or drop dra.devices" .Values.dra.mode) }}
{{- end }}
{{- if include "gpu-plugin.draOn" . }}
{{- if not (.Capabilities.APIVersions.Has "resource.k8s.io/v1") }}
{{- fail (printf "dra.mode=%s needs the resource.k8s.io/v1 API (Kubernetes 1.34 or newer), which this cluster does not serve (helm template without a cluster: add --api-versions resource.k8s.io/v1)" .Values.dra.mode) }}
{{- end }}
{{- $reg := include "gpu-plugin.draRegistrarDir" . }}
{{- $plugins := include "gpu-plugin.draPluginsDir" . }}
{{- if or (not (isAbs $reg)) (eq $reg "/") (not (isAbs $plugins)) (eq $plugins "/") }}
{{- fail (printf "dra.kubeletRegistrarDirectoryPath %q and dra.kubeletPluginsDirectoryPath %q must be absolute directories of their own (the kubelet's plugins_registry and plugins)" $reg $plugins) }}
{{- end }}
{{- if eq $reg $plugins }}
{{- fail (printf "dra.kubeletRegistrarDirectoryPath and dra.kubeletPluginsDirectoryPath are both %s: the kubelet registers every socket in the registrar directory, so keep the DRA socket in the plugins directory" $reg) }}
{{- end }}
{{- range list $reg $plugins }}
{{- if has . (list "/var/lib/kubelet/device-plugins" "/var/lib/kubelet/pod-resources" "/var/run/cdi" "/host-dev" "/driver-root" "/etc/kubernetes/node-feature-discovery/features.d" "/etc/gpu-plugin/config" "/dev/shm") }}
{{- fail (printf "dra.kubeletRegistrarDirectoryPath or dra.kubeletPluginsDirectoryPath is %s, which the DaemonSet already mounts for something else" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (or .Values.webConfig.tls .Values.webConfig.basicAuth) (not (include "gpu-plugin.webConfigEnabled" .)) }}
{{- fail "webConfig.tls or webConfig.basicAuth is set without a web config: set webConfig.config or webConfig.existingSecret" }}
{{- end }}
{{- end }}
