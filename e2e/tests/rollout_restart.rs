//! A Rollout survives its operator: the operator's container killed (`docker kill`) while the canary holds 20%,
//! the restarted operator carries on at the same step with the same analysis counters and the same workloads
//! (no duplicates), and it deletes the workloads of a version it does not serve that appeared while it was
//! down (an orphan). Its own test binary, so it has its own cluster and may kill its operator.

use std::time::Duration;

use flywheel_e2e::fixtures::{api_for, create};
use flywheel_e2e::on_node::{self, docker_kill};
use flywheel_e2e::rollouts::{
    CANARY_UP, Setup, model_version, rollout_manifest, rollout_status, set_target, wait_scraped,
    wait_status,
};
use flywheel_e2e::wait::until;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

#[tokio::test]
async fn a_killed_operator_resumes_the_rollout_at_20_percent()
-> Result<(), Box<dyn std::error::Error>> {
    let setup = Setup::start("restart").await?;
    model_version(&setup, "ctr-v1").await?;
    model_version(&setup, "ctr-v2").await?;
    setup.exporter.set("ctr-v1", 0.80, 1.0, 50_000.0);
    setup.exporter.set("ctr-v2", 0.80, 1.0, 5_000.0);
    let mut manifest = rollout_manifest(&setup, "ctr-v1", 1000);
    // 1 → 5 → 20, then hold for a human (analysis keeps measuring meanwhile).
    manifest["spec"]["strategy"] = json!({"canary": {"steps": [
        {"setWeight": 1}, {"setWeight": 5}, {"setWeight": 20}, {"pause": {}}, {"setWeight": 100},
    ]}});
    wait_scraped(&setup).await?;
    create(&setup.client, &setup.namespace, &manifest).await??;
    wait_status(&setup, "ctr-v1 stable", Duration::from_secs(30), |s| {
        s["phase"] == "Healthy"
    })
    .await?;
    set_target(&setup, "ctr-v2").await?;
    wait_status(&setup, "held at 20%", CANARY_UP, |s| {
        s["canaryWeight"] == 20 && s["phase"] == "Paused"
    })
    .await?;
    let operator = on_node::operator_pods(&setup.client)
        .await?
        .first()
        .map(ResourceExt::name_any)
        .ok_or("no operator pod")?;
    docker_kill(&on_node::container_of(
        on_node::RELEASE_NAMESPACE,
        &operator,
        "operator",
    )?)?;
    let before = rollout_status(&setup).await?;
    let measured_before = before["measurements"].as_array().map_or(0, Vec::len);
    // While the operator restarts: workloads labelled as the rollout's for a version it does not serve.
    let orphan_labels =
        json!({"flywheel.dev/rollout": "ctr", "flywheel.dev/model-version": "ctr-v0"});
    let deployments: Api<Deployment> = Api::namespaced(setup.client.clone(), &setup.namespace);
    let services: Api<Service> = Api::namespaced(setup.client.clone(), &setup.namespace);
    let orphan: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "ctr-ctr-v0", "labels": orphan_labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": orphan_labels},
            "template": {
                "metadata": {"labels": orphan_labels},
                "spec": {"containers": [{"name": "serve", "image": "flywheel-serving:orphan"}]},
            },
        },
    }))?;
    deployments.create(&PostParams::default(), &orphan).await?;
    let orphan_service: Service = serde_json::from_value(json!({
        "metadata": {"name": "ctr-ctr-v0", "labels": orphan_labels},
        "spec": {"selector": orphan_labels, "ports": [{"port": 8080}]},
    }))?;
    services
        .create(&PostParams::default(), &orphan_service)
        .await?;

    // The restarted operator analyses on: more measurements, same step, same weight, nothing reset.
    let after = wait_status(&setup, "analysis resumed", Duration::from_secs(30), |s| {
        s["measurements"].as_array().map_or(0, Vec::len) > measured_before
    })
    .await?;
    assert_eq!(after["currentStep"], before["currentStep"]);
    assert_eq!(after["canaryWeight"], 20);
    assert_eq!(after["phase"], "Paused");
    assert_eq!(after["failedMeasurements"], before["failedMeasurements"]);
    assert_eq!(after["stableVersion"], "ctr-v1");
    until(
        "the orphaned workloads are swept",
        Duration::from_secs(30),
        || async {
            let deployment = deployments
                .get_opt("ctr-ctr-v0")
                .await
                .map_err(|e| e.to_string())?;
            let service = services
                .get_opt("ctr-ctr-v0")
                .await
                .map_err(|e| e.to_string())?;
            match (deployment, service) {
                (None, None) => Ok(()),
                (deployment, service) => Err(format!(
                    "Deployment left: {}, Service left: {}",
                    deployment.is_some(),
                    service.is_some()
                )),
            }
        },
    )
    .await?;
    let names: Vec<String> = deployments
        .list(&ListParams::default().labels("flywheel.dev/rollout=ctr"))
        .await?
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    assert_eq!(
        names.len(),
        3,
        "stable, canary and router, once each: {names:?}"
    );

    let api = api_for(&setup.client, "Rollout", &setup.namespace)?;
    api.patch(
        "ctr",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"flywheel.dev/action": "promote"}}})),
    )
    .await?;
    wait_status(
        &setup,
        "promoted after the restart",
        Duration::from_secs(30),
        |s| s["stableVersion"] == "ctr-v2" && s["phase"] == "Healthy",
    )
    .await?;
    Ok(())
}
