//! The Helm chart: it lints with Helm's own engine, installs on the real node, and the RBAC it grants is enough
//! for the operator: the operator's pod runs with the chart's ServiceAccount, reconciles every kind, and is
//! never refused.

use std::time::Duration;

use flywheel_e2e::fixtures::{api_for, condition, create, example};
use flywheel_e2e::helm::helm;
use flywheel_e2e::on_node;
use flywheel_e2e::repo_root;
use flywheel_e2e::wait::until;
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::{Api, ResourceExt};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn chart_lints_installs_and_grants_the_operator_enough() -> TestResult {
    let chart = repo_root().join("charts/flywheel");
    let chart = chart.to_string_lossy();
    helm(&["lint", &chart])?;

    let cluster = on_node::operator(&[]).await?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace(&client, "chart").await?;
    // The Rollout serves the ModelVersion: its Deployments, Services, route ConfigMap and credentials Secret
    // are made under the chart's RBAC. Its pods cannot run here (no model on this namespace's storage), so
    // it is reconciled once Ready says which pods it waits for.
    for file in [
        "featureview.yaml",
        "modelversion.yaml",
        "rollout.yaml",
        "gpuquota.yaml",
    ] {
        let manifest = example(file)?;
        create(&client, &namespace, &manifest).await??;
        let kind = manifest["kind"].as_str().unwrap_or_default().to_owned();
        let name = manifest["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let api = api_for(&client, &kind, &namespace)?;
        until(
            &format!("{kind}/{name} Ready under the chart's RBAC"),
            Duration::from_secs(90),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let object = api.get(&name).await.map_err(|e| e.to_string())?;
                    match condition(&object, "Ready") {
                        Some((status, ..)) if status == "True" => Ok(()),
                        Some((_, reason, message, _))
                            if reason == "NotServing" && message.contains("pods available") =>
                        {
                            Ok(())
                        }
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await?;
    }
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &namespace);
    assert!(
        secrets.get_opt("ctr-credentials").await?.is_some(),
        "the Rollout's tokens were created"
    );
    // The operator's own pods admit only scrapers and Alertmanager on their one port.
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(client.clone(), on_node::RELEASE_NAMESPACE);
    let policy = serde_json::to_value(policies.get("flywheel-operator").await?)?;
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "flywheel-operator"
    );
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let rule = &policy["spec"]["ingress"][0];
    assert_eq!(rule["ports"][0]["port"], "http-metrics");
    let peers: Vec<String> = rule["from"]
        .as_array()
        .map(|from| from.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    assert!(
        peers.iter().any(|peer| peer.contains("alertmanager"))
            && peers.iter().any(|peer| peer.contains("prometheus")),
        "{peers:?}"
    );
    // The kubelet reports a started container a little after it runs; its log is readable from then on.
    let pods: Api<Pod> = Api::namespaced(client.clone(), on_node::RELEASE_NAMESPACE);
    let log = until("the operator's log", Duration::from_secs(60), || {
        let pods = pods.clone();
        let client = client.clone();
        async move {
            let mut log = String::new();
            for pod in on_node::operator_pods(&client)
                .await
                .map_err(|e| e.to_string())?
            {
                log += &pods
                    .logs(&pod.name_any(), &LogParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if log.is_empty() {
                Err("no log yet".to_owned())
            } else {
                Ok(log)
            }
        }
    })
    .await?;
    assert!(
        !log.contains("forbidden"),
        "the chart's RBAC refused the operator something:\n{log}"
    );
    Ok(())
}
