//! What a Rollout owns, decided from its planned status: the route table (ConfigMap), its NetworkPolicy, a
//! Deployment and a Service per served version, the router, the traffic log's sink, and the sweep of every
//! owned workload the status no longer serves (a promoted rollout's old stable, an aborted canary, a router or a
//! sink the spec dropped, or one created behind the operator's back). The sweep is level-triggered: it compares
//! the cache of owned objects with the plan on every reconcile, so an orphan missed once is collected by the
//! next.

use std::collections::BTreeSet;

use flywheel_crds::rollout::{RolloutPhase, RolloutStatus};
use flywheel_crds::{ModelVersion, Rollout};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;

use super::network;
use super::online::{self, OnlineView};
use super::traffic_log;
use crate::config::ServingSettings;
use crate::plan::{Child, Children, OwnedObject};
use crate::rollout::traffic::{self, LABEL_ROLE, LABEL_ROLLOUT, LABEL_VERSION};

/// What the children are built from, besides the planned status.
pub struct Inputs<'a> {
    pub rollout: &'a Rollout,
    /// The ModelVersions the status may serve (stable, canary, target) that exist.
    pub versions: &'a [&'a ModelVersion],
    /// The Deployments and Services labelled with this rollout, from the cache.
    pub owned: &'a [OwnedObject],
    pub online: &'a OnlineView,
    pub serving: &'a ServingSettings,
    /// Digest of the rollout's credentials, stamped on pod templates so a rotation rolls the pods.
    pub credentials_digest: &'a str,
}

/// A canary counts (keeps its pods, takes its weight) while the rollout is progressing or paused.
pub fn canary_live(status: &RolloutStatus) -> bool {
    status.canary_version.is_some()
        && matches!(
            status.phase,
            Some(RolloutPhase::Progressing | RolloutPhase::Paused)
        )
}

/// The versions taking traffic, with weights, for a status.
pub fn split_of(status: &RolloutStatus) -> Option<Vec<(String, u32)>> {
    let stable = status.stable_version.as_deref()?;
    let canary = status
        .canary_version
        .as_deref()
        .filter(|_| canary_live(status))
        .map(|canary| (canary, status.canary_weight));
    Some(traffic::split(canary, stable))
}

/// The versions whose workloads exist for a status: those taking traffic, and a live canary even before its
/// first weight.
pub fn served(status: &RolloutStatus) -> BTreeSet<String> {
    let mut served: BTreeSet<String> = split_of(status)
        .unwrap_or_default()
        .into_iter()
        .map(|(version, _)| version)
        .collect();
    if let Some(canary) = status
        .canary_version
        .as_ref()
        .filter(|_| canary_live(status))
    {
        served.insert(canary.clone());
    }
    served
}

/// The children for `status`. Nothing is applied or swept before a version is stable: until then the
/// rollout serves nothing and has not decided what it owns.
pub fn plan(inputs: &Inputs<'_>, status: &RolloutStatus) -> Result<Children, serde_json::Error> {
    let mut children = Children::default();
    let Some(split) = split_of(status) else {
        return Ok(children);
    };
    let rollout = inputs.rollout;
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
    let table = traffic::route_table(&name, &namespace, &split);
    children
        .apply
        .push(Child::of(&traffic::routes_config_map(rollout, &table)?)?);
    children
        .apply
        .push(Child::of(&network::network_policy(rollout)?)?);
    let online_access = match inputs.online {
        OnlineView::Found(view) => online::access(rollout, view),
        _ => None,
    };
    let served = served(status);
    for version in inputs
        .versions
        .iter()
        .filter(|version| served.contains(version.metadata.name.as_deref().unwrap_or_default()))
    {
        let deployment = traffic::version_deployment(
            rollout,
            version,
            inputs.serving,
            online_access.as_ref(),
            inputs.credentials_digest,
        )?;
        children.apply.push(Child::of(&deployment)?);
        let service = traffic::version_service(
            rollout,
            version.metadata.name.as_deref().unwrap_or_default(),
        )?;
        children.apply.push(Child::of(&service)?);
    }
    let with_router = rollout.spec.traffic.router.is_some();
    if with_router {
        let (router, service) =
            traffic::router(rollout, inputs.serving, inputs.credentials_digest)?;
        children.apply.push(Child::of(&router)?);
        children.apply.push(Child::of(&service)?);
    }
    let traffic_log = traffic_log::deployment(rollout, inputs.serving)?;
    let with_traffic_log = traffic_log.is_some();
    if let Some(sink) = traffic_log {
        children.apply.push(Child::of(&sink)?);
    }
    children.delete = inputs
        .owned
        .iter()
        .filter(|owned| owned.label(LABEL_ROLLOUT) == Some(name.as_str()))
        .filter(|owned| is_workload(owned))
        .filter(|owned| match owned.label(LABEL_VERSION) {
            Some(version) => !served.contains(version),
            None => match owned.label(LABEL_ROLE) {
                Some("router") => !with_router,
                Some(traffic_log::ROLE) => !with_traffic_log,
                _ => false,
            },
        })
        .map(OwnedObject::reference)
        .collect();
    Ok(children)
}

/// Only the kinds the sweep watches: the credentials Secret and the routes ConfigMap carry the rollout's label
/// too, and are never swept.
fn is_workload(owned: &OwnedObject) -> bool {
    let deployment = kube::api::ApiResource::erase::<Deployment>(&());
    let service = kube::api::ApiResource::erase::<Service>(&());
    owned.resource == deployment || owned.resource == service
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ChildRef;
    use crate::plan::examples::load;
    use std::collections::BTreeMap;

    fn rollout() -> Rollout {
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.metadata.namespace = Some("ml".into());
        rollout
    }

    fn version(name: &str) -> ModelVersion {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.metadata.name = Some(name.into());
        version
    }

    fn settings() -> ServingSettings {
        ServingSettings {
            image: "flywheel-serving:test".into(),
            traffic_log_image: "flywheel-trainer:test".into(),
            storage_claim: None,
            storage_path: "/var/lib/flywheel".into(),
        }
    }

    fn owned<K: kube::Resource<DynamicType = ()>>(
        name: &str,
        labels: &[(&str, &str)],
    ) -> OwnedObject {
        OwnedObject {
            resource: kube::api::ApiResource::erase::<K>(&()),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn status(stable: &str, canary: Option<(&str, u32)>, phase: RolloutPhase) -> RolloutStatus {
        RolloutStatus {
            stable_version: Some(stable.into()),
            canary_version: canary.map(|(c, _)| c.into()),
            canary_weight: canary.map_or(0, |(_, w)| w),
            phase: Some(phase),
            ..RolloutStatus::default()
        }
    }

    fn children_for(rollout: &Rollout, owned: &[OwnedObject], status: &RolloutStatus) -> Children {
        let (v1, v2) = (version("ctr-v1"), version("ctr-v2"));
        plan(
            &Inputs {
                rollout,
                versions: &[&v1, &v2],
                owned,
                online: &OnlineView::NotNamed,
                serving: &settings(),
                credentials_digest: "d1",
            },
            status,
        )
        .unwrap_or_else(|err| panic!("the children serialize: {err}"))
    }

    fn applied(children: &Children) -> Vec<(String, String)> {
        children
            .apply
            .iter()
            .map(|c| (c.resource.kind.clone(), c.name().to_owned()))
            .collect()
    }

    fn deleted(children: &Children) -> Vec<(String, String)> {
        children
            .delete
            .iter()
            .map(|c: &ChildRef| (c.resource.kind.clone(), c.name.clone()))
            .collect()
    }

    fn pair(kind: &str, name: &str) -> (String, String) {
        (kind.to_owned(), name.to_owned())
    }

    #[test]
    fn a_live_canary_and_the_stable_each_get_a_deployment_and_a_service_after_the_routes() {
        let rollout = rollout();
        let children = children_for(
            &rollout,
            &[],
            &status("ctr-v1", Some(("ctr-v2", 5)), RolloutPhase::Progressing),
        );
        let applied = applied(&children);
        assert_eq!(applied[0], pair("ConfigMap", "ctr-routes"), "routes first");
        for wanted in [
            pair("Deployment", "ctr-ctr-v1"),
            pair("Service", "ctr-ctr-v1"),
            pair("Deployment", "ctr-ctr-v2"),
            pair("Service", "ctr-ctr-v2"),
        ] {
            assert!(applied.contains(&wanted), "{wanted:?} in {applied:?}");
        }
        assert!(children.delete.is_empty());
    }

    #[test]
    fn a_canary_at_weight_zero_keeps_its_pods_while_live() {
        let rollout = rollout();
        let children = children_for(
            &rollout,
            &[],
            &status("ctr-v1", Some(("ctr-v2", 0)), RolloutPhase::Progressing),
        );
        assert!(applied(&children).contains(&pair("Deployment", "ctr-ctr-v2")));
    }

    #[test]
    fn every_owned_workload_of_an_unserved_version_is_swept_and_nothing_else() {
        let rollout = rollout();
        let owned = [
            owned::<Deployment>(
                "ctr-ctr-v1",
                &[(LABEL_ROLLOUT, "ctr"), (LABEL_VERSION, "ctr-v1")],
            ),
            owned::<Deployment>(
                "ctr-ctr-v0",
                &[(LABEL_ROLLOUT, "ctr"), (LABEL_VERSION, "ctr-v0")],
            ),
            owned::<Service>(
                "ctr-ctr-v0",
                &[(LABEL_ROLLOUT, "ctr"), (LABEL_VERSION, "ctr-v0")],
            ),
            // An aborted canary: not live any more.
            owned::<Deployment>(
                "ctr-ctr-v2",
                &[(LABEL_ROLLOUT, "ctr"), (LABEL_VERSION, "ctr-v2")],
            ),
            // Another rollout's, and objects the sweep never owns.
            owned::<Deployment>(
                "other-v0",
                &[(LABEL_ROLLOUT, "other"), (LABEL_VERSION, "v0")],
            ),
            owned::<k8s_openapi::api::core::v1::ConfigMap>(
                "ctr-routes",
                &[(LABEL_ROLLOUT, "ctr"), (LABEL_ROLE, "routes")],
            ),
        ];
        let children = children_for(
            &rollout,
            &owned,
            &status("ctr-v1", Some(("ctr-v2", 0)), RolloutPhase::Degraded),
        );
        assert_eq!(
            deleted(&children),
            [
                pair("Deployment", "ctr-ctr-v0"),
                pair("Service", "ctr-ctr-v0"),
                pair("Deployment", "ctr-ctr-v2"),
            ]
        );
        assert!(!applied(&children).contains(&pair("Deployment", "ctr-ctr-v2")));
    }

    #[test]
    fn a_router_the_spec_dropped_is_swept_and_one_it_names_is_applied() {
        let mut rollout = rollout();
        let router = [
            owned::<Deployment>(
                "ctr-router",
                &[(LABEL_ROLLOUT, "ctr"), (LABEL_ROLE, "router")],
            ),
            owned::<Service>("ctr", &[(LABEL_ROLLOUT, "ctr"), (LABEL_ROLE, "router")]),
        ];
        let healthy = status("ctr-v1", None, RolloutPhase::Healthy);
        if rollout.spec.traffic.router.is_none() {
            rollout.spec.traffic.router = Some(Default::default());
        }
        let kept = children_for(&rollout, &router, &healthy);
        assert!(kept.delete.is_empty());
        assert!(applied(&kept).contains(&pair("Deployment", "ctr-router")));
        rollout.spec.traffic.router = None;
        let dropped = children_for(&rollout, &router, &healthy);
        assert_eq!(
            deleted(&dropped),
            [pair("Deployment", "ctr-router"), pair("Service", "ctr")]
        );
    }

    #[test]
    fn the_traffic_log_sink_follows_the_spec() {
        let mut rollout = rollout();
        let sink = [owned::<Deployment>(
            "ctr-traffic-log",
            &[(LABEL_ROLLOUT, "ctr"), (LABEL_ROLE, traffic_log::ROLE)],
        )];
        let healthy = status("ctr-v1", None, RolloutPhase::Healthy);
        rollout.spec.feedback = Some(flywheel_crds::rollout::Feedback {
            brokers: vec!["kafka:9092".into()],
            clicks_topic: Some("clicks".into()),
            prediction_log_topic: Some("predictions".into()),
            traffic_log: Some(flywheel_crds::rollout::TrafficLog {
                uri: "file:///var/lib/flywheel/traffic/ctr".into(),
                flush_interval: None,
            }),
            security: None,
        });
        let kept = children_for(&rollout, &sink, &healthy);
        assert!(kept.delete.is_empty());
        assert!(applied(&kept).contains(&pair("Deployment", "ctr-traffic-log")));
        rollout.spec.feedback = None;
        let dropped = children_for(&rollout, &sink, &healthy);
        assert_eq!(deleted(&dropped), [pair("Deployment", "ctr-traffic-log")]);
    }

    #[test]
    fn nothing_is_applied_or_swept_before_a_version_is_stable() {
        let rollout = rollout();
        let owned = [owned::<Deployment>(
            "ctr-ctr-v0",
            &[(LABEL_ROLLOUT, "ctr"), (LABEL_VERSION, "ctr-v0")],
        )];
        let children = children_for(&rollout, &owned, &RolloutStatus::default());
        assert_eq!(children, Children::default());
    }
}
