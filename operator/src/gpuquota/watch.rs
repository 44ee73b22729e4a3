//! Which GPUQuotas a change elsewhere concerns, as pure functions over the cached objects.

use std::sync::Arc;

use flywheel_crds::{GPUQuota, TrainingJob};
use kube::runtime::reflector::ObjectRef;

/// A job's arrival, change or deletion concerns the quota it names.
pub fn quota_of_job(job: &TrainingJob) -> Option<ObjectRef<GPUQuota>> {
    job.spec.queue.as_deref().map(ObjectRef::new)
}

/// A namespace's labels decide which selector-scoped quotas cover it: those quotas, on any namespace change.
pub fn selector_quotas(quotas: &[Arc<GPUQuota>]) -> Vec<ObjectRef<GPUQuota>> {
    quotas
        .iter()
        .filter(|quota| quota.spec.namespaces.selector.is_some())
        .map(|quota| ObjectRef::from_obj(quota.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::load;

    #[test]
    fn a_job_concerns_its_queue_and_a_namespace_the_selector_quotas() {
        let job: TrainingJob = load("trainingjob-gpu.yaml", 1);
        assert_eq!(quota_of_job(&job), Some(ObjectRef::new("ranking-team")));
        let mut unqueued = job.clone();
        unqueued.spec.queue = None;
        assert_eq!(quota_of_job(&unqueued), None);

        let listed: GPUQuota = load("gpuquota.yaml", 1);
        let mut by_selector = listed.clone();
        by_selector.metadata.name = Some("by-selector".into());
        by_selector.spec.namespaces.selector = Some(Default::default());
        let mut by_list = listed;
        by_list.spec.namespaces.selector = None;
        let woken: Vec<String> = selector_quotas(&[Arc::new(by_list), Arc::new(by_selector)])
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(woken, ["by-selector"]);
    }
}
