//! A Rollout survives its operator: the operator's container killed (`docker kill`) while the canary holds 20%,
//! the restarted operator carries on at the same step with the same analysis counters and the same workloads
//! (no duplicates). Its own test binary, so it has its own cluster and may kill its operator.

use std::time::Duration;

use flywheel_e2e::fixtures::{api_for, create};
use flywheel_e2e::on_node::{self, docker_kill};
use flywheel_e2e::rollouts::{
    CANARY_UP, Setup, model_version, rollout_manifest, rollout_status, set_target, wait_scraped,
    wait_status,
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{ListParams, Patch, PatchParams};
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
    let deployments: Api<Deployment> = Api::namespaced(setup.client.clone(), &setup.namespace);
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
