//! `GPUQuota` (cluster-scoped): what a platform team writes to bound and isolate a team's GPU use. Training jobs
//! are admitted against it as whole gangs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    DNS_LABEL_PATTERN, GPU_RESOURCE_PATTERN, SpecViolations, is_dns_label, is_gpu_resource,
};

/// Desired state of a GPUQuota: which namespaces' TrainingJobs it admits, how many GPUs of each resource they
/// may hold at once, whether higher-priority jobs may preempt, and the placement their pods get.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flywheel.dev",
    version = "v1alpha1",
    kind = "GPUQuota",
    plural = "gpuquotas",
    status = "GPUQuotaStatus",
    shortname = "gq",
    category = "flywheel",
    derive = "PartialEq",
    doc = "A team's GPU quota and isolation; TrainingJobs are admitted against it as whole gangs.",
    printcolumn(name = "Used", type_ = "string", json_path = ".status.usedSummary"),
    printcolumn(
        name = "Admitted",
        type_ = "integer",
        json_path = ".status.admittedCount"
    ),
    printcolumn(name = "Queued", type_ = "integer", json_path = ".status.queuedCount"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GPUQuotaSpec {
    /// Namespaces whose jobs this quota admits.
    pub namespaces: NamespaceScope,
    /// GPU limits per resource (whole GPUs and MIG profiles).
    #[schemars(length(min = 1, max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["resource"]))]
    pub limits: Vec<GpuLimit>,
    /// Jobs admitted at once; unlimited when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_concurrent_jobs: Option<u32>,
    /// Whether a waiting job may take GPUs from admitted jobs of lower priority. Default `policy: Never`.
    #[serde(default)]
    pub preemption: PreemptionPolicy,
    /// Placement every pod of an admitted job gets; users cannot opt out.
    #[serde(default)]
    pub isolation: Isolation,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.names) && size(self.names) > 0) || has(self.selector)").message("spec.namespaces: list names, set a selector, or both"))]
pub struct NamespaceScope {
    /// Namespaces covered by name. Set `names`, `selector` or both; a namespace listed here or matched by the
    /// selector is covered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(pattern(DNS_LABEL_PATTERN), length(max = 63)), extend("x-kubernetes-list-type" = "set"))]
    pub names: Vec<String>,
    /// Namespaces covered by their labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct GpuLimit {
    /// `nvidia.com/gpu`, `amd.com/gpu` or a MIG profile such as `nvidia.com/mig-1g.10gb`.
    #[schemars(pattern(GPU_RESOURCE_PATTERN))]
    pub resource: String,
    /// Number of GPUs (or MIG slices) of `resource`: in `spec.limits`, the most that admitted jobs may hold at
    /// once; in `status.used`, how many admitted jobs hold now.
    #[schemars(range(min = 0, max = 1_000_000))]
    pub count: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreemptionPolicy {
    /// Whether a queued job may evict admitted jobs of lower priority to fit.
    #[serde(default)]
    pub policy: PreemptionMode,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PreemptionMode {
    #[default]
    Never,
    LowerPriority,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Isolation {
    /// Node labels added to the node selector of every pod of an admitted job; they override a job's own
    /// (e.g. its GPU product).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added to every pod of an admitted job, e.g. for taints on the team's GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// RuntimeClass every pod of an admitted job runs with (e.g. a sandboxed runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub runtime_class_name: Option<String>,
    /// Keep other quotas' pods off the nodes this quota's jobs run on.
    #[serde(default)]
    pub exclusive_nodes: bool,
}

/// Observed state of a GPUQuota, written by the operator: GPUs in use, and which jobs are admitted, queued or
/// rejected.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GPUQuotaStatus {
    /// The `metadata.generation` the operator last reconciled; while it is behind, the status does not reflect
    /// the latest spec yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions. Types: `Ready`; `InvalidSpec` (True when the spec breaks a rule, the
    /// message naming each field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// GPUs held by admitted jobs, per resource in `spec.limits`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used: Vec<GpuLimit>,
    /// `used/limit` per resource (printer column), e.g. `nvidia.com/gpu 4/8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_summary: Option<String>,
    /// Jobs admitted under this quota: all of their pods may run. They stay admitted while they run, even if
    /// the quota shrinks; only preemption takes their GPUs back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admitted: Vec<JobRef>,
    /// Waiting jobs in admission order (the first is admitted next), each with why it waits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queued: Vec<JobRef>,
    /// Jobs that name this quota but can never be admitted by it, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<JobRef>,
    /// Number of admitted jobs (printer column).
    #[serde(default)]
    pub admitted_count: u32,
    /// Number of queued jobs (printer column).
    #[serde(default)]
    pub queued_count: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    /// Namespace of the TrainingJob.
    pub namespace: String,
    /// Name of the TrainingJob.
    pub name: String,
    /// The job's UID: a job deleted and re-created under the same name is a new job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Why a queued or rejected job is not admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl GPUQuotaSpec {
    /// The rules OpenAPI cannot express on a 1.20 server (each mirrors a CEL rule or a cross-field check).
    pub fn validate(&self) -> Result<(), SpecViolations> {
        let mut violations = SpecViolations::default();
        if self.namespaces.names.is_empty() && self.namespaces.selector.is_none() {
            violations.push("spec.namespaces", "list names, set a selector, or both");
        }
        for (index, name) in self.namespaces.names.iter().enumerate() {
            if !is_dns_label(name) {
                violations.push(
                    format!("spec.namespaces.names[{index}]"),
                    format!("`{name}` is not a namespace name"),
                );
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, limit) in self.limits.iter().enumerate() {
            let field = format!("spec.limits[{index}].resource");
            if !is_gpu_resource(&limit.resource) {
                violations.push(
                    &field,
                    format!(
                        "unknown GPU resource `{}`; use nvidia.com/gpu, amd.com/gpu or nvidia.com/mig-<N>g.<M>gb",
                        limit.resource
                    ),
                );
            }
            if !seen.insert(limit.resource.as_str()) {
                violations.push(&field, format!("`{}` is listed twice", limit.resource));
            }
        }
        violations.into_result()
    }

    /// Limit for `resource`, if the quota lists it.
    pub fn limit_of(&self, resource: &str) -> Option<u32> {
        self.limits
            .iter()
            .find(|limit| limit.resource == resource)
            .map(|limit| limit.count)
    }
}
