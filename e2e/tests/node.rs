//! A real node: kubelet runs Flywheel's built images in Docker, with addresses on the CNI bridge, and answers
//! what only a real runtime can — a read-only root filesystem refuses writes, a mounted volume takes them,
//! a ConfigMap is mounted, a pod whose readiness probe fails gets no traffic from its Service, and cluster DNS
//! names a Service's ClusterIP. Images published with `scripts/build-images.sh REGISTRY` to a registry are
//! pulled from it by the node. (The operator's pods, installed by the chart, are `leader_election.rs`.)

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::images::image;
use flywheel_e2e::repo_root;
use flywheel_e2e::serving::{HttpClient, Process, free_port};
use flywheel_e2e::wait::until;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, LogParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The node's address: its CNI bridge's gateway, where cluster DNS listens.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const POD_START: Duration = Duration::from_secs(90);

async fn setup(prefix: &str) -> Result<(Client, String), Box<dyn std::error::Error>> {
    let cluster = TestCluster::with_node()?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace_for_pods(&client, prefix).await?;
    Ok((client, namespace))
}

/// The restricted security context every Flywheel container runs with.
fn restricted() -> serde_json::Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}
    })
}

async fn create_pod(
    client: &Client,
    namespace: &str,
    pod: serde_json::Value,
) -> Result<Pod, Box<dyn std::error::Error>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods
        .create(&PostParams::default(), &serde_json::from_value(pod)?)
        .await?)
}

/// Waits for `name` to reach `phase`, returning the pod.
async fn pod_in_phase(
    client: &Client,
    namespace: &str,
    name: &str,
    phase: &str,
) -> Result<Pod, Box<dyn std::error::Error>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(until(&format!("pod {name} to be {phase}"), POD_START, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get(name).await.map_err(|e| e.to_string())?;
            let status = pod.status.clone().unwrap_or_default();
            if status.phase.as_deref() == Some(phase) {
                Ok(pod)
            } else {
                Err(format!("{:?}", status))
            }
        }
    })
    .await?)
}

fn pod_ip(pod: &Pod) -> Result<Ipv4Addr, Box<dyn std::error::Error>> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .ok_or("pod has no IP")?;
    Ok(ip.parse()?)
}

fn on_the_bridge(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    (a, b, c) == (10, 244, 0) && ip != NODE_IP
}

#[tokio::test]
async fn the_root_filesystem_is_read_only_and_a_volume_is_writable() -> TestResult {
    let (client, namespace) = setup("rootfs").await?;
    let generate = |name: &str, out: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "trainer",
                    "image": image("flywheel-trainer"),
                    "imagePullPolicy": "Never",
                    "args": ["generate", "--rows", "2000", "--out", out],
                    "securityContext": restricted(),
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]
                }],
                "volumes": [{"name": "data", "emptyDir": {}}]
            }
        })
    };
    create_pod(&client, &namespace, generate("onto-root", "/generated")).await?;
    create_pod(
        &client,
        &namespace,
        generate("onto-volume", "/data/generated"),
    )
    .await?;

    let refused = pod_in_phase(&client, &namespace, "onto-root", "Failed").await?;
    let exit_code = refused
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code);
    assert!(
        matches!(exit_code, Some(code) if code != 0),
        "{exit_code:?}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let log = pods.logs("onto-root", &LogParams::default()).await?;
    assert!(log.contains("Read-only file system"), "{log}");

    let written = pod_in_phase(&client, &namespace, "onto-volume", "Succeeded").await?;
    assert!(on_the_bridge(pod_ip(&written)?), "{:?}", written.status);
    Ok(())
}

/// A router pod listening where its Service points (`ready`), and one listening elsewhere, whose readiness
/// probe on the Service's port therefore fails (`unready`). Both mount their routes from a ConfigMap.
fn router(name: &str, listen_port: u16) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "router"}},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "route",
                "image": image("flywheel-serving"),
                "imagePullPolicy": "Never",
                "args": ["route", "--config", "/etc/flywheel/routes.json",
                         "--listen", format!("0.0.0.0:{listen_port}")],
                "ports": [{"containerPort": listen_port}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "securityContext": restricted(),
                "volumeMounts": [{"name": "routes", "mountPath": "/etc/flywheel", "readOnly": true}]
            }],
            "volumes": [{"name": "routes", "configMap": {"name": "routes"}}]
        }
    })
}

/// A DNS A query for `name` to the cluster DNS, answered with its addresses.
fn resolve(name: &str) -> Result<Vec<Ipv4Addr>, Box<dyn std::error::Error>> {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(u8::try_from(label.len())?);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = UdpSocket::bind((NODE_IP, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(&query, SocketAddr::from((NODE_IP, 53)))?;
    let mut answer = [0u8; 512];
    let length = socket.recv(&mut answer)?;
    let answer = &answer[..length];
    let count = usize::from(u16::from_be_bytes([answer[6], answer[7]]));
    // Answers follow the echoed question; each A record ends in its 4-byte address.
    let mut addresses = Vec::new();
    let mut at = query.len();
    for _ in 0..count {
        // A compressed name (2 bytes), type, class, TTL, length.
        let data_length = usize::from(u16::from_be_bytes([answer[at + 10], answer[at + 11]]));
        let data = &answer[at + 12..at + 12 + data_length];
        if let [a, b, c, d] = *data {
            addresses.push(Ipv4Addr::new(a, b, c, d));
        }
        at += 12 + data_length;
    }
    Ok(addresses)
}

#[tokio::test]
async fn a_service_sends_traffic_only_to_ready_pods_and_dns_names_it() -> TestResult {
    let (client, namespace) = setup("service").await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let routes = json!({"backends": [{"name": "v1", "http": "http://ctr-v1:8080", "weight": 100}]});
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "routes"},
                "data": {"routes.json": routes.to_string()}
            }))?,
        )
        .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let service = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "router"},
                "spec": {"selector": {"app": "router"},
                         "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
            }))?,
        )
        .await?;
    let cluster_ip: Ipv4Addr = service
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or("no ClusterIP")?
        .parse()?;
    create_pod(&client, &namespace, router("ready", 8080)).await?;
    create_pod(&client, &namespace, router("unready", 9090)).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let ready = until("pod `ready` to be Ready", POD_START, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("ready").await.map_err(|e| e.to_string())?;
            let conditions = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            if conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
            {
                Ok(pod)
            } else {
                Err(format!("{:?}", pod.status))
            }
        }
    })
    .await?;
    let unready = pod_in_phase(&client, &namespace, "unready", "Running").await?;
    let (ready_ip, unready_ip) = (pod_ip(&ready)?, pod_ip(&unready)?);
    assert!(on_the_bridge(ready_ip) && on_the_bridge(unready_ip));

    // The Service's endpoints are the ready pod alone, and the unready one is really running (it answers on
    // its own port), so a connection through the Service can only have reached the ready pod.
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), &namespace);
    let addresses = until("the router's endpoints", POD_START, || {
        let endpoints = endpoints.clone();
        async move {
            let found = endpoints.get("router").await.map_err(|e| e.to_string())?;
            let addresses: Vec<String> = found
                .subsets
                .iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().flatten().map(|a| a.ip.clone()))
                .collect();
            if addresses.is_empty() {
                Err(format!("{found:?}"))
            } else {
                Ok(addresses)
            }
        }
    })
    .await?;
    assert_eq!(addresses, vec![ready_ip.to_string()]);
    tokio::net::TcpStream::connect((unready_ip, 9090)).await?;
    // kube-proxy writes the Service's rules a moment after the endpoints appear.
    until(
        "kube-proxy to route the Service",
        Duration::from_secs(30),
        || async move {
            tokio::net::TcpStream::connect((cluster_ip, 80))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await?;
    for attempt in 0..40 {
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((cluster_ip, 80)),
        )
        .await
        .map_err(|_| format!("connection {attempt} through the Service timed out"))?
        .map_err(|e| format!("connection {attempt} through the Service: {e}"))?;
    }

    let name = format!("router.{namespace}.svc.cluster.local");
    let resolved = until(
        &format!("{name} to resolve"),
        Duration::from_secs(20),
        || {
            let name = name.clone();
            async move {
                match resolve(&name) {
                    Ok(addresses) if !addresses.is_empty() => Ok(addresses),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await?;
    assert_eq!(resolved, vec![cluster_ip]);
    Ok(())
}

#[tokio::test]
async fn images_published_to_a_registry_are_pulled_from_it_by_the_node() -> TestResult {
    let (client, namespace) = setup("registry").await?;
    // Docker's own registry (distribution) on loopback, as a team's registry would be.
    let dir = TestCluster::with_node()?.state_dir().join("registry");
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    std::fs::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )?;
    let _registry = Process::spawn(
        "docker-registry",
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml")),
        &dir.join("registry.log"),
    )?;
    let http = HttpClient::default();
    until("the registry to answer", Duration::from_secs(30), || {
        let http = http.clone();
        async move {
            match http.send("GET", port, "/v2/", None, &[]).await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;

    // The one command a user publishes with (the binaries the tests built, not compiled again).
    let registry = format!("127.0.0.1:{port}/flywheel");
    let published = Command::new(repo_root().join("scripts/build-images.sh"))
        .arg(&registry)
        .arg("--binaries")
        .arg(flywheel_e2e::bin_dir())
        .output()?;
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );

    let pulled = format!("{registry}/flywheel-trainer:{}", env!("CARGO_PKG_VERSION"));
    create_pod(
        &client,
        &namespace,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "pulled"},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "trainer",
                    "image": pulled,
                    "imagePullPolicy": "Always",
                    "args": ["--version"],
                    "securityContext": restricted()
                }]
            }
        }),
    )
    .await?;
    pod_in_phase(&client, &namespace, "pulled", "Succeeded").await?;
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let pulls: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|event| event.reason.as_deref() == Some("Pulled"))
        .filter_map(|event| event.note)
        .collect();
    assert!(
        pulls
            .iter()
            .any(|note| note.contains("Successfully pulled") && note.contains(&pulled)),
        "{pulls:?}"
    );

    // The registry's port is new each run: drop its tags (the pod's stopped container still names one), the
    // layers stay shared with the local images.
    let docker = std::env::var("DOCKER").unwrap_or_else(|_| "docker".to_owned());
    for name in ["flywheel-operator", "flywheel-trainer", "flywheel-serving"] {
        let _ = Command::new(&docker)
            .args([
                "rmi",
                "--force",
                &format!("{registry}/{name}:{}", env!("CARGO_PKG_VERSION")),
            ])
            .output();
    }
    Ok(())
}
