//! Two operator replicas on one Lease: only the leader reconciles; when it dies the standby takes over within
//! the lease duration; when it is stopped with SIGTERM it hands the Lease over at once.
//!
//! The killed leader's object must wait for the Lease to lapse: measured here, bounded by one lease duration
//! plus one retry period.

use std::time::{Duration, Instant};

use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::fixtures::{api_for, condition, create, example, set};
use flywheel_e2e::operator::OperatorProcess;
use flywheel_e2e::wait::until;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE_DURATION: Duration = Duration::from_secs(6);
const RETRY: Duration = Duration::from_secs(1);

const LEASE: &str = "election-test";
const ARGS: [&str; 8] = [
    "--lease-name",
    LEASE,
    "--lease-namespace",
    "default",
    "--lease-duration",
    "6s",
    "--lease-retry",
    "1s",
];

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

fn spawn_pair(
    cluster: &TestCluster,
    lease: &str,
) -> std::io::Result<(OperatorProcess, OperatorProcess)> {
    let first = OperatorProcess::spawn(cluster, &format!("{lease}-a"), &ARGS)?;
    let second = OperatorProcess::spawn(cluster, &format!("{lease}-b"), &ARGS)?;
    Ok((first, second))
}

async fn reconciled_count(operator: &OperatorProcess) -> Result<u64, Box<dyn std::error::Error>> {
    let (_, body) = operator.get("/metrics").await?;
    Ok(body
        .lines()
        .filter(|line| line.starts_with("flywheel_operator_reconciliations_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Creates a FeatureView and returns how long until the operator marked it Ready.
async fn time_to_ready(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let mut view = example("featureview.yaml")?;
    set(&mut view, "/metadata/name", json!(name));
    let start = Instant::now();
    create(client, namespace, &view).await??;
    let api = api_for(client, "FeatureView", namespace)?;
    until(
        &format!("{name} to become Ready"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let object = api.get(name).await.map_err(|e| e.to_string())?;
                match condition(&object, "Ready") {
                    Some((status, ..)) if status == "True" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await?;
    Ok(start.elapsed())
}

async fn elect(client: &Client) -> Result<String, Box<dyn std::error::Error>> {
    Ok(until("a leader", Duration::from_secs(30), || async {
        holder(client).await.ok_or_else(|| "no holder".to_owned())
    })
    .await?)
}

/// One narrative, because every replica set reconciles the whole cluster: two groups in parallel tests would
/// reconcile each other's objects.
#[tokio::test]
async fn only_the_leader_reconciles_and_the_standby_takes_over() -> TestResult {
    let cluster = TestCluster::shared()?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace(&client, "leader").await?;
    let (mut first, mut second) = spawn_pair(cluster, LEASE)?;
    let leader_id = elect(&client).await?;
    time_to_ready(&client, &namespace, "before").await?;
    let (leader, standby) = if leader_id == first.identity {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    assert_eq!(
        reconciled_count(standby).await?,
        0,
        "the standby must not reconcile"
    );
    assert!(
        standby
            .get("/metrics")
            .await?
            .1
            .contains("flywheel_operator_leader 0")
    );
    assert_eq!(
        standby.get("/readyz").await?.0,
        200,
        "a standby is ready to serve probes"
    );

    // A crash: the Lease is not released and must lapse first.
    leader.kill();
    let killed_at = Instant::now();
    time_to_ready(&client, &namespace, "after-kill").await?;
    let takeover = killed_at.elapsed();
    eprintln!("leader killed: a new object was Ready {takeover:?} after the kill");
    assert_eq!(
        holder(&client).await.as_deref(),
        Some(standby.identity.as_str())
    );
    assert!(reconciled_count(standby).await? > 0);
    assert!(
        takeover <= LEASE_DURATION + RETRY + Duration::from_secs(3),
        "takeover took {takeover:?}"
    );

    // A graceful stop: the Lease is released and a new standby takes it at once.
    let third = OperatorProcess::spawn(cluster, &format!("{LEASE}-c"), &ARGS)?;
    tokio::time::sleep(RETRY).await;
    let status = standby.terminate()?;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    let stopped_at = Instant::now();
    until(
        "the new standby to lead",
        Duration::from_secs(30),
        || async {
            match holder(&client).await {
                Some(holder) if holder == third.identity => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    let handover = stopped_at.elapsed();
    eprintln!("SIGTERM: lease handed over in {handover:?}");
    assert!(
        handover < LEASE_DURATION,
        "a released lease is taken before it would lapse: {handover:?}"
    );
    time_to_ready(&client, &namespace, "after-term").await?;
    Ok(())
}
