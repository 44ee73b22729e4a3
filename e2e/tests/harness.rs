//! The harness itself against the real API server. The kubelet stand-in: Flywheel-image pods run as local
//! processes and report exit code and output; other pods are reported Running; deleting a pod kills its
//! processes; Service names resolve to the Ready pods they select; ConfigMap volumes are projected and follow
//! their ConfigMap. The controller manager: owned objects are garbage-collected with their owner.

use std::process::Command;
use std::time::Duration;

use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::kubelet::Kubelet;
use flywheel_e2e::wait::until;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn start(prefix: &str) -> Result<(Client, Api<Pod>), Box<dyn std::error::Error>> {
    let cluster = TestCluster::shared()?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace(&client, prefix).await?;
    let work = std::env::temp_dir().join(format!("flywheel-kubelet-test-{}", std::process::id()));
    // `sh` stands in for a Flywheel binary: the kubelet resolves our image names against this directory.
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin)?;
    let kubelet =
        Kubelet::new(client.clone(), bin.clone(), work.join("pods")).in_namespace(&namespace);
    tokio::spawn(kubelet.run());
    Ok((client.clone(), Api::namespaced(client, &namespace)))
}

fn pod(name: &str, image: &str, script: &str) -> Result<Pod, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": image,
                "command": ["sh", "-c", script],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "env": [
                    {"name": "TERMINATION_LOG", "value": "/dev/termination-log"},
                    {"name": "GREETING", "value": "hello"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ],
            }],
        },
    }))
}

async fn phase_of(
    pods: &Api<Pod>,
    name: &str,
    want: &str,
) -> Result<Pod, Box<dyn std::error::Error>> {
    Ok(until(
        &format!("{name} to be {want}"),
        Duration::from_secs(30),
        || async {
            let pod = pods.get(name).await.map_err(|e| e.to_string())?;
            match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some(phase) if phase == want => Ok(pod),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?)
}

fn terminated(pod: &Pod) -> Option<(i32, String)> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    let terminated = status.state.as_ref()?.terminated.as_ref()?;
    Some((
        terminated.exit_code,
        terminated.message.clone().unwrap_or_default(),
    ))
}

#[tokio::test]
async fn own_image_runs_with_the_pod_env_and_reports_its_exit() -> TestResult {
    let (_client, pods) = start("kubelet-ok").await?;
    // The termination message is what the container writes to its terminationMessagePath.
    let script = r#"echo "$GREETING from $POD_NAME" >"$TERMINATION_LOG"; exit 0"#;
    pods.create(
        &PostParams::default(),
        &pod("ok", "registry.example/flywheel-trainer:0.1.0", script)?,
    )
    .await?;
    let done = phase_of(&pods, "ok", "Succeeded").await?;
    assert_eq!(terminated(&done), Some((0, "hello from ok\n".to_owned())));
    Ok(())
}

#[tokio::test]
async fn failing_container_fails_the_pod_with_its_code_and_output() -> TestResult {
    let (_client, pods) = start("kubelet-fail").await?;
    pods.create(
        &PostParams::default(),
        &pod("fails", "flywheel-serving", "echo boom >&2; exit 3")?,
    )
    .await?;
    let done = phase_of(&pods, "fails", "Failed").await?;
    // Nothing written to the termination file: FallbackToLogsOnError reports the output's tail.
    assert_eq!(terminated(&done), Some((3, "boom\n".to_owned())));
    Ok(())
}

#[tokio::test]
async fn foreign_image_is_reported_running_without_running() -> TestResult {
    let (_client, pods) = start("kubelet-foreign").await?;
    pods.create(&PostParams::default(), &pod("web", "nginx:1.25", "exit 1")?)
        .await?;
    let running = phase_of(&pods, "web", "Running").await?;
    let ready = running
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    assert!(ready);
    Ok(())
}

#[tokio::test]
async fn deleting_a_pod_kills_its_processes() -> TestResult {
    let (_client, pods) = start("kubelet-delete").await?;
    let namespace = pods.namespace().unwrap_or_default().to_owned();
    // The shell waits on a child: both are in the container's process group and must both die.
    let script = format!("sleep 600; echo {namespace}");
    pods.create(
        &PostParams::default(),
        &pod("long", "flywheel-trainer", &script)?,
    )
    .await?;
    phase_of(&pods, "long", "Running").await?;
    let group = until("the container process", Duration::from_secs(10), || async {
        let output = Command::new("pgrep")
            .args(["-f", &namespace])
            .output()
            .map_err(|e| e.to_string())?;
        let pid = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if pid.is_empty() {
            Err("no process".to_owned())
        } else {
            Ok(pid)
        }
    })
    .await?;
    let members = || {
        Command::new("pgrep")
            .args(["-g", &group])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    assert_eq!(members(), 2, "sh and sleep run in the container's group");
    pods.delete("long", &DeleteParams::default()).await?;
    until("the processes to die", Duration::from_secs(10), || async {
        match members() {
            0 => Ok(()),
            alive => Err(format!("{alive} still alive")),
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn owned_objects_are_garbage_collected_with_their_owner() -> TestResult {
    use flywheel_e2e::fixtures::{api_for, create, example};
    use k8s_openapi::api::core::v1::ConfigMap;
    let cluster = TestCluster::shared()?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace(&client, "gc").await?;
    let owner = create(&client, &namespace, &example("featureview.yaml")?).await??;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let owned: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView",
            "name": owner.metadata.name, "uid": owner.metadata.uid,
        }]},
        "data": {"k": "v"},
    }))?;
    config_maps.create(&PostParams::default(), &owned).await?;
    api_for(&client, "FeatureView", &namespace)?
        .delete("ctr-events", &DeleteParams::default())
        .await?;
    // The garbage collector discovers a newly registered CRD type with some delay, as in a real cluster.
    until(
        "the owned ConfigMap to be collected",
        Duration::from_secs(90),
        || async {
            match config_maps.get_opt("owned").await {
                Ok(None) => Ok(()),
                other => Err(format!(
                    "{:?}",
                    other.map(|cm| cm.map(|cm| cm.metadata.name))
                )),
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn service_names_resolve_and_config_map_volumes_follow_their_config_map() -> TestResult {
    use k8s_openapi::api::core::v1::{ConfigMap, Service};
    use kube::api::{Patch, PatchParams};
    let (client, pods) = start("kubelet-dns").await?;
    let namespace = pods.namespace().unwrap_or_default().to_owned();
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let backend: Pod = serde_json::from_value(json!({
        "metadata": {"name": "backend", "labels": {"app": "backend"}},
        "spec": {"containers": [{"name": "main", "image": "flywheel-serving", "command": ["sleep", "600"]}]},
    }))?;
    pods.create(&PostParams::default(), &backend).await?;
    let backend_ip = phase_of(&pods, "backend", "Running")
        .await?
        .status
        .and_then(|status| status.pod_ip)
        .unwrap_or_default();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 8080}]},
    }))?;
    services.create(&PostParams::default(), &service).await?;
    let config: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "client-config"},
        "data": {"target": format!("backend.{namespace}.svc")},
    }))?;
    config_maps.create(&PostParams::default(), &config).await?;
    // A name read from a mounted file at run time, not spelled out in the pod's env or args. Mount paths are
    // rewritten where a value (an env value, an argument) starts with one, so the script takes it from env.
    let script = r#"
        target=$(cat "$CONFIG/target")
        for i in $(seq 1 100); do addr=$(getent hosts "$target" | awk '{print $1}'); [ -n "$addr" ] && break; sleep 0.1; done
        echo "$addr $FLYWHEEL_BIND_ADDRESS" >"$TERMINATION_LOG"
        for i in $(seq 1 200); do [ "$(cat "$CONFIG/target")" = updated ] && break; sleep 0.1; done
        cat "$CONFIG/target" >>"$TERMINATION_LOG""#;
    let client_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "client"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": "flywheel-trainer", "command": ["sh", "-c", script],
                "env": [
                    {"name": "TERMINATION_LOG", "value": "/dev/termination-log"},
                    {"name": "CONFIG", "value": "/etc/demo"},
                ],
                "volumeMounts": [{"name": "config", "mountPath": "/etc/demo", "readOnly": true}],
            }],
            "volumes": [{"name": "config", "configMap": {"name": "client-config"}}],
        },
    }))?;
    pods.create(&PostParams::default(), &client_pod).await?;
    let client_ip = phase_of(&pods, "client", "Running")
        .await?
        .status
        .and_then(|status| status.pod_ip)
        .unwrap_or_default();
    config_maps
        .patch(
            "client-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"target": "updated"}})),
        )
        .await?;
    let done = phase_of(&pods, "client", "Succeeded").await?;
    assert_eq!(
        terminated(&done),
        Some((0, format!("{backend_ip} {client_ip}\nupdated")))
    );
    Ok(())
}

#[tokio::test]
async fn a_pod_waits_for_its_config_map() -> TestResult {
    use k8s_openapi::api::core::v1::ConfigMap;
    let (client, pods) = start("kubelet-cm-wait").await?;
    let namespace = pods.namespace().unwrap_or_default().to_owned();
    let waiting: Pod = serde_json::from_value(json!({
        "metadata": {"name": "waiting"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": "flywheel-trainer",
                "command": ["sh", "-c", "cat \"$VALUE\" >\"$TERMINATION_LOG\""],
                "env": [
                    {"name": "TERMINATION_LOG", "value": "/dev/termination-log"},
                    {"name": "VALUE", "value": "/etc/late/value"},
                ],
                "volumeMounts": [{"name": "late", "mountPath": "/etc/late"}],
            }],
            "volumes": [{"name": "late", "configMap": {"name": "late"}}],
        },
    }))?;
    pods.create(&PostParams::default(), &waiting).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let phase = pods
        .get("waiting")
        .await?
        .status
        .and_then(|status| status.phase);
    assert_ne!(phase.as_deref(), Some("Succeeded"));
    assert_ne!(phase.as_deref(), Some("Failed"));
    let late: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "late"}, "data": {"value": "here"},
    }))?;
    Api::<ConfigMap>::namespaced(client, &namespace)
        .create(&PostParams::default(), &late)
        .await?;
    let done = phase_of(&pods, "waiting", "Succeeded").await?;
    assert_eq!(terminated(&done), Some((0, "here".to_owned())));
    Ok(())
}
