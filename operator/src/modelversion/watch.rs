//! Which ModelVersions a change elsewhere concerns, as pure functions over the cached objects.

use std::sync::Arc;

use flywheel_crds::{ModelVersion, Rollout};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

/// The versions `rollout` serves, or says it serves, or that record it among their servers: their `servedBy`
/// follows the Rollout's status.
pub fn versions_of_rollout(
    versions: &[Arc<ModelVersion>],
    rollout: &Rollout,
) -> Vec<ObjectRef<ModelVersion>> {
    let namespace = rollout.namespace();
    let rollout_name = rollout.name_any();
    let status = rollout.status.clone().unwrap_or_default();
    versions
        .iter()
        .filter(|version| version.namespace() == namespace)
        .filter(|version| {
            let name = version.name_any();
            status.stable_version.as_deref() == Some(name.as_str())
                || status.canary_version.as_deref() == Some(name.as_str())
                || version
                    .status
                    .as_ref()
                    .is_some_and(|s| s.served_by.iter().any(|by| by.rollout == rollout_name))
        })
        .map(|version| ObjectRef::from_obj(version.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use flywheel_crds::modelversion::{ModelVersionStatus, ServedBy, ServingRole};
    use flywheel_crds::rollout::RolloutStatus;

    use super::*;
    use crate::plan::examples::load;

    fn version(name: &str, namespace: &str, served_by: Option<&str>) -> Arc<ModelVersion> {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.metadata.name = Some(name.into());
        version.metadata.namespace = Some(namespace.into());
        version.status = served_by.map(|rollout| ModelVersionStatus {
            served_by: vec![ServedBy {
                rollout: rollout.into(),
                role: ServingRole::Stable,
            }],
            ..ModelVersionStatus::default()
        });
        Arc::new(version)
    }

    #[test]
    fn a_rollout_wakes_what_it_serves_and_what_still_records_it() {
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.metadata.name = Some("ctr".into());
        rollout.metadata.namespace = Some("ml".into());
        rollout.status = Some(RolloutStatus {
            stable_version: Some("v1".into()),
            canary_version: Some("v2".into()),
            ..RolloutStatus::default()
        });
        let versions = vec![
            version("v1", "ml", None),
            version("v2", "ml", None),
            version("v0", "ml", Some("ctr")),
            version("unrelated", "ml", Some("other")),
            version("v1", "staging", Some("ctr")),
        ];
        let woken: Vec<(String, Option<String>)> = versions_of_rollout(&versions, &rollout)
            .into_iter()
            .map(|r| (r.name, r.namespace))
            .collect();
        let ml = Some("ml".to_owned());
        assert_eq!(
            woken,
            [
                ("v1".to_owned(), ml.clone()),
                ("v2".to_owned(), ml.clone()),
                ("v0".to_owned(), ml)
            ]
        );
    }
}
