//! What the operator may do with pods, beyond RBAC. Holder pods live in the
//! workloads' namespaces (a pod can only use a claim of its own namespace),
//! so creating them takes a cluster-wide grant, which RBAC cannot narrow to
//! "pods like a holder". The chart adds a ValidatingAdmissionPolicy (from
//! Kubernetes 1.30) that holds the operator's ServiceAccount (and the CSI
//! controller's, whose holders attach published volumes) to exactly what
//! [`crate::reconcile::resolve::holder_pod`] and
//! [`crate::csi::controller::attachment_holder`] create: one container of the
//! holder image, claims as its only volumes, no service account token, no
//! host namespaces, nothing privileged; and lets it change or delete only
//! holder pods. The policy's template is generated from this file
//! ([`template`]; a test fails when the chart's copy is stale) and the tests
//! evaluate its rules (CEL) against the holder pod the reconciler builds and
//! against pods it must refuse.

/// Where the chart's copy of [`template`] is.
pub const TEMPLATE: &str = "charts/volmig/templates/holder-pod-policy.yaml";

/// Stands for the holder image (`--holder-image`) in [`VALIDATIONS`].
pub const IMAGE: &str = "HOLDER_IMAGE";

/// Stand for the usernames of the operator's and the CSI controller's
/// ServiceAccounts in [`MATCH`].
pub const OPERATOR_USER: &str = "OPERATOR_USER";
pub const CSI_USER: &str = "CSI_USER";

/// Whom the policy holds (CEL): the operator (holders of migration
/// targets, in the workloads' namespaces) and the CSI controller (holders
/// of published volumes, in volmig's namespace).
pub const MATCH: &str = "request.userInfo.username in ['OPERATOR_USER', 'CSI_USER']";

/// The policy's variables: (name, CEL).
pub const VARIABLES: &[(&str, &str)] = &[
    // the pod as it is (created, updated) or was (deleted)
    ("pod", "request.operation == 'DELETE' ? oldObject : object"),
    ("create", "request.operation == 'CREATE'"),
];

/// The rules: (CEL, message). `HOLDER_IMAGE` is the holder image.
pub const VALIDATIONS: &[(&str, &str)] = &[
    (
        "has(variables.pod.metadata.labels) && 'app.kubernetes.io/component' in variables.pod.metadata.labels && variables.pod.metadata.labels['app.kubernetes.io/component'] == 'target-holder' && 'app.kubernetes.io/managed-by' in variables.pod.metadata.labels && variables.pod.metadata.labels['app.kubernetes.io/managed-by'] == 'volmig'",
        "the volmig operator creates, changes and deletes only its holder pods (app.kubernetes.io/component=target-holder, app.kubernetes.io/managed-by=volmig)",
    ),
    (
        "request.operation != 'UPDATE' || (has(oldObject.metadata.labels) && 'app.kubernetes.io/component' in oldObject.metadata.labels && oldObject.metadata.labels['app.kubernetes.io/component'] == 'target-holder')",
        "the volmig operator changes only its holder pods",
    ),
    (
        "!variables.create || (object.spec.containers.size() == 1 && object.spec.containers.all(c, c.image == 'HOLDER_IMAGE'))",
        "a holder pod runs one container, of the holder image",
    ),
    (
        "!variables.create || ((!has(object.spec.initContainers) || object.spec.initContainers.size() == 0) && (!has(object.spec.ephemeralContainers) || object.spec.ephemeralContainers.size() == 0))",
        "a holder pod has no init or ephemeral containers",
    ),
    (
        "!variables.create || (has(object.spec.volumes) && object.spec.volumes.all(v, has(v.persistentVolumeClaim)))",
        "a holder pod's only volumes are claims",
    ),
    (
        "!variables.create || (has(object.spec.automountServiceAccountToken) && object.spec.automountServiceAccountToken == false)",
        "a holder pod gets no service account token",
    ),
    (
        "!variables.create || !((has(object.spec.hostNetwork) && object.spec.hostNetwork) || (has(object.spec.hostPID) && object.spec.hostPID) || (has(object.spec.hostIPC) && object.spec.hostIPC))",
        "a holder pod shares no host namespace",
    ),
    (
        "!variables.create || (has(object.spec.securityContext) && has(object.spec.securityContext.runAsNonRoot) && object.spec.securityContext.runAsNonRoot == true)",
        "a holder pod runs as non-root",
    ),
    (
        "!variables.create || object.spec.containers.all(c, has(c.securityContext) && has(c.securityContext.allowPrivilegeEscalation) && c.securityContext.allowPrivilegeEscalation == false && (!has(c.securityContext.privileged) || c.securityContext.privileged == false) && (!has(c.securityContext.capabilities) || !has(c.securityContext.capabilities.add)))",
        "a holder pod's container is not privileged, cannot escalate and adds no capabilities",
    ),
];

/// The chart's template: the policy and its binding, for Kubernetes 1.30
/// and later (ValidatingAdmissionPolicy v1), behind
/// `operator.holderPodPolicy`.
pub fn template() -> String {
    let vars: String = VARIABLES
        .iter()
        .map(|(name, expr)| format!("    - name: {name}\n      expression: {}\n", quote(expr)))
        .collect();
    let rules: String = VALIDATIONS
        .iter()
        .map(|(expr, msg)| {
            let expr = quote(expr).replace(IMAGE, r#"{{ include "volmig.holderImage" . }}"#);
            format!("    - expression: {expr}\n      message: {}\n", quote(msg))
        })
        .collect();
    let matcher = quote(MATCH)
        .replace(
            OPERATOR_USER,
            r#"system:serviceaccount:{{ .Release.Namespace }}:{{ include "volmig.operator.serviceAccountName" . }}"#,
        )
        .replace(
            CSI_USER,
            r#"system:serviceaccount:{{ .Release.Namespace }}:{{ include "volmig.csi.serviceAccountName" . }}"#,
        );
    // the policy's and its binding's
    let meta = r#"metadata:
  name: {{ include "volmig.operator.fullname" . }}-holder-pods
  labels:
    {{- include "volmig.labels" . | nindent 4 }}
    app.kubernetes.io/component: operator
"#;
    format!(
        r#"{{{{- if and .Values.operator.holderPodPolicy (semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version) }}}}
# Generated from operator/src/holder_policy.rs; do not edit.
# Regenerate: VOLMIG_UPDATE_GENERATED=1 cargo test -p volmig-operator --test holder_policy
#
# The operator may create pods in every namespace (holder pods must be in the
# claim's namespace), which RBAC cannot narrow further: this policy holds its
# ServiceAccount, and the CSI controller's, to holder pods exactly as they
# build them.
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
{meta}spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: [""]
        apiVersions: ["v1"]
        operations: ["CREATE", "UPDATE", "DELETE"]
        resources: ["pods"]
  matchConditions:
    - name: volmig-holder-makers
      expression: {matcher}
  variables:
{vars}  validations:
{rules}---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
{meta}spec:
  policyName: {{{{ include "volmig.operator.fullname" . }}}}-holder-pods
  validationActions: [Deny]
{{{{- end }}}}
"#
    )
}

/// A YAML single-quoted scalar.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
