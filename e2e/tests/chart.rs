//! The Helm chart: it lints with Helm's own engine, installs into a real API server, and the RBAC it grants is
//! enough for the operator: the operator runs with the chart's ServiceAccount token and reconciles.

use std::time::Duration;

use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::fixtures::{api_for, condition, create, example};
use flywheel_e2e::helm::helm;
use flywheel_e2e::operator::OperatorProcess;
use flywheel_e2e::repo_root;
use flywheel_e2e::wait::until;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn chart_lints_installs_and_grants_the_operator_enough() -> TestResult {
    let chart = repo_root().join("charts/flywheel");
    let chart = chart.to_string_lossy();
    helm(&["lint", &chart])?;

    let cluster = TestCluster::shared()?;
    let client = cluster.client().await?;
    let release_namespace = "flywheel-system";
    helm(&[
        "install",
        "flywheel",
        &chart,
        release_namespace,
        &cluster.kubeconfig().to_string_lossy(),
    ])?;

    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), release_namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request("flywheel-operator", &PostParams::default(), &request)
        .await?
        .status
        .map(|status| status.token)
        .ok_or("no token in the TokenRequest answer")?;
    let kubeconfig = cluster.kubeconfig_with_token("chart-operator", &token)?;

    let _operator = OperatorProcess::spawn_with(
        cluster,
        &kubeconfig,
        "chart-rbac",
        &[
            "--lease-name",
            "flywheel-operator",
            "--lease-namespace",
            release_namespace,
        ],
    )?;
    let namespace = cluster.namespace(&client, "chart").await?;
    for file in ["featureview.yaml", "rollout.yaml", "gpuquota.yaml"] {
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
            Duration::from_secs(30),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let object = api.get(&name).await.map_err(|e| e.to_string())?;
                    match condition(&object, "Ready") {
                        Some((status, ..)) if status == "True" => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await?;
    }
    let log =
        std::fs::read_to_string(std::env::temp_dir().join("flywheel-operator-chart-rbac.log"))?;
    assert!(
        !log.contains("forbidden"),
        "the chart's RBAC refused the operator something:\n{log}"
    );
    Ok(())
}
