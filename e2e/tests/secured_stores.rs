//! The data plane against stores that demand TLS and authentication, as every managed Kafka and Redis does:
//! real processes on 127.0.0.1, a private CA made with `openssl`, Debian's redis-server with TLS only, and the
//! Kafka-protocol broker requiring SASL SCRAM-SHA-512 behind a real TLS terminator. A client that trusts
//! another CA, or brings no or wrong credentials, gets nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flywheel_e2e::bin_dir;
use flywheel_e2e::secured_stores::{SecuredBroker, TestCertificates, TlsRedis};
use flywheel_e2e::serving::{
    HttpClient, Process, Server, dataset, offline_scores, rest_body, scores_of, sink_written,
    temp_dir, train,
};
use flywheel_e2e::wait::until;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Not URL-safe on purpose: the password travels beside the URL, never in it.
const REDIS_PASSWORD: &str = "tls:p@ss/#1";
const KAFKA_USER: &str = "flywheel";
const KAFKA_PASSWORD: &str = "kafka-s3cret";

/// Runs a command that must fail on its own within a minute; its stderr.
async fn failure_of(command: Command) -> Result<String, Box<dyn std::error::Error>> {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::from(command).output(),
    )
    .await??;
    if output.status.success() {
        return Err("the command succeeded".into());
    }
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn serving_and_materialization_reach_redis_over_tls_and_refuse_an_untrusted_server()
-> TestResult {
    let dir = temp_dir("secured-redis");
    let certs = TestCertificates::generate(&dir.join("certs"))?;
    let redis = TlsRedis::start(&dir, &certs, REDIS_PASSWORD).await?;
    let store = format!("redis://127.0.0.1:{}", redis.port);

    // Serving fills the features a request leaves out from the TLS store, scoring as offline.
    let data = dataset(&dir.join("data"), 2_000, 31)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let offline = offline_scores(&artifact, &data.dir)?;
    let rows = &data.eval[..5];
    for row in rows {
        redis.command(&[
            "HSET",
            &format!("user:{}", row.user_id),
            "age",
            &row.age.to_string(),
        ])?;
    }
    let uri = artifact.display().to_string();
    let ca = certs.ca.display().to_string();
    let online_flags = |ca: &str| -> Vec<String> {
        [
            "--model-version",
            "v1",
            "--model-uri",
            &uri,
            "--online-store",
            &store,
            "--online-store-password",
            REDIS_PASSWORD,
            "--redis-ca-file",
            ca,
            "--online-features",
            "age",
            "--online-key-prefix",
            "user:",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let flags = online_flags(&ca);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start(&dir, "serve-tls", &flags).await?;
    let mut body = rest_body(None, rows);
    if let Some(inputs) = body["inputs"].as_array_mut() {
        inputs.retain(|input| input["name"] != "age");
    }
    let (code, answer) = HttpClient::default()
        .post(server.http, "/v2/models/ctr/infer", &body, &[])
        .await?;
    assert_eq!(code, 200, "{answer}");
    let scores = scores_of(&answer);
    assert_eq!(scores.len(), 5, "{answer}");
    for (online, offline) in scores.iter().zip(&offline) {
        assert!(
            (online - offline).abs() <= 1e-6,
            "{online} against {offline}"
        );
    }

    // A server whose certificate another CA signed is refused at start, naming the store.
    let other_ca = certs.other_ca.display().to_string();
    let mut untrusting = Command::new(bin_dir().join("flywheel-serving"));
    untrusting
        .args([
            "serve",
            "--model-name",
            "ctr",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(online_flags(&other_ca));
    let refused = failure_of(untrusting).await?;
    assert!(refused.contains("online store"), "{refused}");

    // Materialization writes the view's values through the same TLS connection.
    let source = dir.join("source");
    let generated = Command::new(bin_dir().join("flywheel-trainer"))
        .args(["generate-events", "--events", "500", "--users", "20"])
        .args(["--labels", "10", "--span", "1h", "--out"])
        .arg(&source)
        .output()?;
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let view = write_view(&dir, &source.join("events.parquet"), redis.port)?;
    let materialize = |ca: &Path| {
        let mut command = Command::new(bin_dir().join("flywheel-trainer"));
        command
            .args(["materialize", "--view"])
            .arg(&view)
            .arg("--redis-ca-file")
            .arg(ca)
            .env("FLYWHEEL_REDIS_PASSWORD", REDIS_PASSWORD);
        command
    };
    let untrusted = failure_of(materialize(&certs.other_ca)).await?;
    assert!(untrusted.contains("online store"), "{untrusted}");
    let output = materialize(&certs.ca).output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let keys = redis.command(&["--scan", "--pattern", "test/users:*"])?;
    assert_eq!(keys.lines().count(), 20, "{keys}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A FeatureView over the generated events with an online store at 127.0.0.1:`port`, written as JSON.
fn write_view(dir: &Path, source: &Path, port: u16) -> Result<PathBuf, std::io::Error> {
    let manifest = json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView",
        "metadata": {"name": "users", "namespace": "test"},
        "spec": {
            "entities": [{"name": "user", "joinKey": "user_id", "valueType": "Int64"}],
            "source": {"batch": {"uri": format!("file://{}", source.display()),
                                 "timestampField": "event_timestamp"}},
            "features": [{"name": "price", "valueType": "Float64"}],
            "ttl": "30d",
            "offline": {"uri": format!("file://{}", dir.join("offline").display())},
            "online": {"redis": {"address": format!("127.0.0.1:{port}"), "tls": {"caSecret": "redis-ca"}}},
        },
    });
    let path = dir.join("view.json");
    std::fs::write(&path, manifest.to_string())?;
    Ok(path)
}

/// A sink toward the secured broker, trusting `ca`, with SCRAM credentials of `password` if any.
fn sink(
    broker: &SecuredBroker,
    dir: &Path,
    name: &str,
    ca: &Path,
    password: Option<&str>,
) -> Result<(Process, PathBuf), Box<dyn std::error::Error>> {
    let log = dir.join(format!("{name}.log"));
    let mut command = Command::new(bin_dir().join("flywheel-trainer"));
    command
        .arg("log-traffic")
        .args([
            "--brokers",
            &broker.address,
            "--predictions-topic",
            "predictions",
        ])
        .args(["--group", name, "--flush-interval", "1s", "--out"])
        .arg(format!("file://{}", dir.join(name).display()))
        .arg("--kafka-ca-file")
        .arg(ca);
    if let Some(password) = password {
        command
            .env("FLYWHEEL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
            .env("FLYWHEEL_KAFKA_SASL_USERNAME", KAFKA_USER)
            .env("FLYWHEEL_KAFKA_SASL_PASSWORD", password);
    }
    Ok((Process::spawn(name, &mut command, &log)?, log))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_prediction_log_reaches_the_sink_over_sasl_and_tls_and_nowhere_else() -> TestResult {
    let dir = temp_dir("secured-kafka");
    let certs = TestCertificates::generate(&dir.join("certs"))?;
    let broker =
        SecuredBroker::start(&dir, &certs, (KAFKA_USER, KAFKA_PASSWORD), &["predictions"]).await?;
    assert!(
        broker.create_topic_unauthenticated("refused").is_err(),
        "the broker must demand authentication"
    );

    let data = dataset(&dir.join("data"), 2_000, 37)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let uri = artifact.display().to_string();
    let ca = certs.ca.display().to_string();
    let server = Server::start(
        &dir,
        "serve-kafka",
        &[
            "--model-version",
            "v1",
            "--model-uri",
            &uri,
            "--kafka-brokers",
            &broker.address,
            "--prediction-log-topic",
            "predictions",
            "--kafka-ca-file",
            &ca,
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-512",
            "--kafka-sasl-username",
            KAFKA_USER,
            "--kafka-sasl-password",
            KAFKA_PASSWORD,
        ],
    )
    .await?;
    let (_trusted, trusted_log) = sink(&broker, &dir, "trusted", &certs.ca, Some(KAFKA_PASSWORD))?;
    let (mut untrusted, untrusted_log) = sink(
        &broker,
        &dir,
        "untrusted",
        &certs.other_ca,
        Some(KAFKA_PASSWORD),
    )?;
    let (mut anonymous, anonymous_log) = sink(&broker, &dir, "anonymous", &certs.ca, None)?;
    let (mut impostor, impostor_log) = sink(&broker, &dir, "impostor", &certs.ca, Some("guessed"))?;

    let client = HttpClient::default();
    for (i, row) in data.eval[..10].iter().enumerate() {
        let id = format!("r-{i}");
        let (code, answer) = client
            .post(
                server.http,
                "/v2/models/ctr/infer",
                &rest_body(Some(&id), std::slice::from_ref(row)),
                &[],
            )
            .await?;
        assert_eq!(code, 200, "{answer}");
    }
    until(
        "the trusted sink wrote the 10 predictions",
        Duration::from_secs(60),
        || async {
            let (predictions, _) = sink_written(&trusted_log);
            (predictions >= 10)
                .then_some(())
                .ok_or(format!("{predictions} predictions"))
        },
    )
    .await?;
    // The others ran as long, against the same broker: one distrusts its certificate, one has no credentials,
    // one a wrong password.
    assert_eq!(sink_written(&untrusted_log), (0, 0));
    assert_eq!(sink_written(&anonymous_log), (0, 0));
    assert_eq!(sink_written(&impostor_log), (0, 0));
    // None of them runs on reading nothing: each ends with the reason (what its pod's TrafficLogged shows).
    for (name, process, log) in [
        ("untrusted", &mut untrusted, &untrusted_log),
        ("anonymous", &mut anonymous, &anonymous_log),
        ("impostor", &mut impostor, &impostor_log),
    ] {
        until(
            &format!("the {name} sink to give up"),
            Duration::from_secs(60),
            || {
                let ended = process.has_exited();
                async move { ended.then_some(()).ok_or("still running".to_owned()) }
            },
        )
        .await?;
        let said = std::fs::read_to_string(log)?;
        assert!(
            said.contains("reaching topic predictions"),
            "{name}: {said}"
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
