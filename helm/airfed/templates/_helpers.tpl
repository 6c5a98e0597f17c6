{{/*
Names. Object names derive from the full name (the release name, or "<release>-airfed"), so the
names a job spec refers to are predictable: with a release named "airfed", silo "us" gets the
ServiceAccount "airfed-silo-us" and the Secret "airfed-store-us".
*/}}
{{- define "airfed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "airfed.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "airfed.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "root" $ "component" "...") */}}
{{- define "airfed.labels" -}}
{{- $root := .root -}}
helm.sh/chart: {{ include "airfed.chart" $root }}
app.kubernetes.io/name: {{ include "airfed.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: airfed
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "airfed.mlflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "airfed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mlflow
{{- end }}

{{- define "airfed.airflowServiceAccountNamespace" -}}
{{- default .Values.airflow.namespace .Values.airflow.serviceAccount.namespace }}
{{- end }}

{{- define "airfed.serverServiceAccountName" -}}
{{- default (printf "%s-server" (include "airfed.fullname" .)) .Values.jobNamespace.serviceAccount.name }}
{{- end }}

{{- define "airfed.dagsConfigMapName" -}}
{{- default (printf "%s-dags" (include "airfed.fullname" .)) .Values.dags.configMapName }}
{{- end }}

{{- define "airfed.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "airfed.fullname" .) }}
{{- end }}

{{- define "airfed.mlflow.serviceAccountName" -}}
{{- default (include "airfed.mlflow.fullname" .) .Values.mlflow.serviceAccount.name }}
{{- end }}

{{- define "airfed.mlflow.secretName" -}}
{{- default (include "airfed.mlflow.fullname" .) .Values.mlflow.existingSecret }}
{{- end }}

{{- define "airfed.mlflow.artifactsDestination" -}}
{{- default (printf "%s/_mlflow" (trimSuffix "/" .Values.store.url)) .Values.mlflow.artifactsDestination }}
{{- end }}

{{- define "airfed.mlflow.trackingUri" -}}
{{- printf "http://%s.%s.svc:%v" (include "airfed.mlflow.fullname" .) .Values.jobNamespace.name .Values.mlflow.service.port }}
{{- end }}

{{/*
Store credentials of one namespace: (dict "creds" <storeCredentials> "default" <secret name> "where" <text>)
-> JSON {"name": <Secret name>, "create": bool, "given": bool}. "given" is false when neither an
existing Secret nor both values are set: the Secret keeps its default name and must be created
by hand (or the pods use a cloud identity instead). Half a key pair is an error.
*/}}
{{- define "airfed.storeSecret" -}}
{{- $c := .creds | default dict -}}
{{- $id := $c.accessKeyId | default "" -}}
{{- $key := $c.secretAccessKey | default "" -}}
{{- if and $c.existingSecret (or $id $key) -}}
{{- fail (printf "%s: give storeCredentials.existingSecret or accessKeyId/secretAccessKey, not both" .where) -}}
{{- end -}}
{{- if or (and $id (not $key)) (and $key (not $id)) -}}
{{- fail (printf "%s: storeCredentials needs both accessKeyId and secretAccessKey (or existingSecret)" .where) -}}
{{- end -}}
{{- $both := and (not (empty $id)) (not (empty $key)) -}}
{{- if $c.existingSecret -}}
{{- dict "name" $c.existingSecret "create" false "given" true | toJson -}}
{{- else -}}
{{- dict "name" .default "create" $both "given" $both | toJson -}}
{{- end -}}
{{- end }}

{{/*
The silos with every default filled in: JSON {"items": [...]}, each item
{name, namespace, createNamespace, namespaceLabels, namespaceAnnotations, serviceAccount:
{create, name, annotations}, secret: {name, create, given}, creds: {...}, placement fields}.
*/}}
{{- define "airfed.silos" -}}
{{- $root := . -}}
{{- $full := include "airfed.fullname" . -}}
{{- $items := list -}}
{{- $seen := dict -}}
{{- range $i, $s := .Values.silos -}}
{{- if hasKey $seen $s.name -}}
{{- fail (printf "silos: duplicate silo name %q" $s.name) -}}
{{- end -}}
{{- $_ := set $seen $s.name true -}}
{{- $sa := $s.serviceAccount | default dict -}}
{{- $where := printf "silos[%d] (%s)" $i $s.name -}}
{{- $secret := include "airfed.storeSecret" (dict "creds" $s.storeCredentials "default" (printf "%s-store-%s" $full $s.name) "where" $where) | fromJson -}}
{{- $item := dict
      "name" $s.name
      "namespace" (default (printf "%s-%s" $full $s.name) $s.namespace)
      "createNamespace" (ternary true ($s.createNamespace | default false) (not (hasKey $s "createNamespace")))
      "namespaceLabels" ($s.namespaceLabels | default dict)
      "namespaceAnnotations" ($s.namespaceAnnotations | default dict)
      "serviceAccount" (dict
          "create" (ternary true ($sa.create | default false) (not (hasKey $sa "create")))
          "name" (default (printf "%s-silo-%s" $full $s.name) $sa.name)
          "annotations" ($sa.annotations | default dict))
      "secret" $secret
      "creds" ($s.storeCredentials | default dict)
      "kubernetesConnId" ($s.kubernetesConnId | default "")
      "nodeSelector" ($s.nodeSelector | default dict)
      "tolerations" ($s.tolerations | default list)
      "resources" ($s.resources | default dict)
      "imagePullSecrets" ($s.imagePullSecrets | default list) -}}
{{- $items = append $items $item -}}
{{- end -}}
{{- dict "items" $items | toJson -}}
{{- end }}

{{/*
Every namespace the FL side uses (the job namespace first, then each silo's), once each:
JSON {"items": [{name, create, labels, annotations}]}. A namespace shared by several silos is
created if any of them asks for it; its labels/annotations are merged.
*/}}
{{- define "airfed.namespaces" -}}
{{- $order := list .Values.jobNamespace.name -}}
{{- $byName := dict .Values.jobNamespace.name (dict "name" .Values.jobNamespace.name "create" .Values.jobNamespace.create "labels" (.Values.jobNamespace.labels | default dict | deepCopy) "annotations" (.Values.jobNamespace.annotations | default dict | deepCopy)) -}}
{{- range (include "airfed.silos" . | fromJson).items -}}
{{- if hasKey $byName .namespace -}}
{{- $ns := get $byName .namespace -}}
{{- $_ := set $ns "create" (or $ns.create .createNamespace) -}}
{{- $_ := set $ns "labels" (merge $ns.labels .namespaceLabels) -}}
{{- $_ := set $ns "annotations" (merge $ns.annotations .namespaceAnnotations) -}}
{{- else -}}
{{- $order = append $order .namespace -}}
{{- $_ := set $byName .namespace (dict "name" .namespace "create" .createNamespace "labels" .namespaceLabels "annotations" .namespaceAnnotations) -}}
{{- end -}}
{{- end -}}
{{- $items := list -}}
{{- range $order -}}
{{- $items = append $items (get $byName .) -}}
{{- end -}}
{{- dict "items" $items | toJson -}}
{{- end }}
