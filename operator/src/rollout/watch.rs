//! Which Rollouts a change elsewhere concerns, as pure functions over the cached objects.

use std::sync::Arc;

use flywheel_crds::{ModelVersion, Rollout};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::traffic::LABEL_ROLLOUT;

/// The Rollouts waiting for `version` (to be Validated, or to exist). The versions a Rollout already serves
/// change status with every Rollout that serves them; mapping those would re-reconcile every Rollout on each.
pub fn rollouts_waiting_for(
    rollouts: &[Arc<Rollout>],
    version: &ModelVersion,
) -> Vec<ObjectRef<Rollout>> {
    let namespace = version.namespace();
    let name = version.name_any();
    rollouts
        .iter()
        .filter(|rollout| rollout.namespace() == namespace)
        .filter(|rollout| {
            let status = rollout.status.clone().unwrap_or_default();
            rollout.spec.model_version == name
                && status.stable_version.as_deref() != Some(name.as_str())
                && status.canary_version.as_deref() != Some(name.as_str())
        })
        .map(|rollout| ObjectRef::from_obj(rollout.as_ref()))
        .collect()
}

/// The Rollout a labelled workload belongs to: a change to it (an orphan appearing, a served Deployment
/// deleted or becoming available) is the rollout's to look at.
pub fn owning_rollout<K: kube::Resource>(object: &K) -> Option<ObjectRef<Rollout>> {
    let name = object.meta().labels.as_ref()?.get(LABEL_ROLLOUT)?;
    Some(ObjectRef::new(name).within(object.meta().namespace.as_deref()?))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use flywheel_crds::rollout::RolloutStatus;
    use k8s_openapi::api::apps::v1::Deployment;

    use super::*;
    use crate::plan::examples::load;

    fn rollout(name: &str, namespace: &str, wants: &str, stable: Option<&str>) -> Arc<Rollout> {
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.metadata.name = Some(name.into());
        rollout.metadata.namespace = Some(namespace.into());
        rollout.spec.model_version = wants.into();
        rollout.status = Some(RolloutStatus {
            stable_version: stable.map(Into::into),
            ..RolloutStatus::default()
        });
        Arc::new(rollout)
    }

    #[test]
    fn a_version_wakes_the_rollouts_of_its_namespace_still_waiting_for_it() {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.metadata.name = Some("ctr-v2".into());
        version.metadata.namespace = Some("ml".into());
        let rollouts = vec![
            rollout("waiting", "ml", "ctr-v2", Some("ctr-v1")),
            rollout("serving-it", "ml", "ctr-v2", Some("ctr-v2")),
            rollout("wants-another", "ml", "ctr-v3", Some("ctr-v1")),
            rollout("namesake-elsewhere", "staging", "ctr-v2", None),
        ];
        let woken: Vec<String> = rollouts_waiting_for(&rollouts, &version)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(woken, ["waiting"]);
    }

    #[test]
    fn a_workload_belongs_to_the_rollout_its_label_names_in_its_namespace() {
        let mut deployment = Deployment::default();
        deployment.metadata.namespace = Some("ml".into());
        assert_eq!(owning_rollout(&deployment), None);
        deployment.metadata.labels = Some(BTreeMap::from([(LABEL_ROLLOUT.into(), "ctr".into())]));
        assert_eq!(
            owning_rollout(&deployment),
            Some(ObjectRef::new("ctr").within("ml"))
        );
    }
}
