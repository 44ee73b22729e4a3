//! Served traffic becomes the next training set, with real processes on 127.0.0.1: `flywheel-serving` logs every
//! prediction to a real Kafka-protocol broker, `flywheel-trainer log-traffic` writes the log and the clicks
//! into Parquet parts, `flywheel-trainer traffic-training-set` labels each prediction by its clicks, and the
//! model that served scores the built rows exactly as it scored them online.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use flywheel_e2e::bin_dir;
use flywheel_e2e::serving::{
    Broker, HttpClient, Process, Server, dataset, offline_scores, rest_body, sink_written,
    temp_dir, train,
};
use flywheel_e2e::wait::until;
use flywheel_features::table::read_batches;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Predictions are labeled by clicks that arrive within this long.
const CLICK_WINDOW_SECONDS: u64 = 10;

fn read_set(path: &Path) -> Result<RecordBatch, Box<dyn std::error::Error>> {
    let batches = read_batches(path)?;
    let first = batches.first().ok_or("an empty set")?;
    Ok(arrow_select::concat::concat_batches(
        &first.schema(),
        &batches,
    )?)
}

fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .map(|c| c.iter().map(|v| v.unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn served_predictions_and_their_clicks_become_the_next_training_set() -> TestResult {
    let dir = temp_dir("traffic-loop");
    let broker = Broker::start(&dir).await?;
    broker.create_topic("predictions")?;
    broker.create_topic("clicks")?;
    let data = dataset(&dir.join("data"), 2_000, 17)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let uri = artifact.display().to_string();
    let server = Server::start(
        &dir,
        "serve",
        &[
            "--model-version",
            "v1",
            "--model-uri",
            &uri,
            "--kafka-brokers",
            &broker.address,
            "--prediction-log-topic",
            "predictions",
        ],
    )
    .await?;
    let traffic = dir.join("traffic");
    let sink_log = dir.join("log-traffic.log");
    let _sink = Process::spawn(
        "log-traffic",
        Command::new(bin_dir().join("flywheel-trainer"))
            .arg("log-traffic")
            .args(["--brokers", &broker.address])
            .args([
                "--predictions-topic",
                "predictions",
                "--clicks-topic",
                "clicks",
            ])
            .args(["--group", "traffic-test", "--flush-interval", "1s"])
            .arg("--out")
            .arg(format!("file://{}", traffic.display())),
        &sink_log,
    )?;

    // 40 served predictions; the split time falls between the 20th and the 21st.
    let client = HttpClient::default();
    let mut answered = BTreeMap::new();
    let mut split = None;
    for (i, row) in data.eval[..40].iter().enumerate() {
        if i == 20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            split = Some(jiff::Timestamp::now());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let id = format!("r-{i:02}");
        let (code, answer) = client
            .post(
                server.http,
                "/v2/models/ctr/infer",
                &rest_body(Some(&id), std::slice::from_ref(row)),
                &[],
            )
            .await?;
        assert_eq!(code, 200, "{answer}");
        let score = answer["outputs"][0]["data"][0].as_f64().ok_or("a score")?;
        answered.insert(id, (i, score));
    }
    let split = split.ok_or("the split time")?;

    // Clicks on the even requests; an explicit "not clicked" on r-01; a redelivered prediction log record of
    // r-04 (what a producer retry does), which must not become a second row.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .create()?;
    let send = |topic: &'static str, payload: String| {
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::<(), _>::to(topic).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map(|_| ())
                .map_err(|(err, _)| err)
        }
    };
    for i in (0..40).step_by(2) {
        send(
            "clicks",
            json!({"requestId": format!("r-{i:02}")}).to_string(),
        )
        .await?;
    }
    send(
        "clicks",
        json!({"requestId": "r-01", "clicked": false}).to_string(),
    )
    .await?;
    send("clicks", "not json".to_owned()).await?;
    until(
        "the sink wrote 40 predictions and 21 clicks",
        Duration::from_secs(60),
        || async {
            let (predictions, clicks) = sink_written(&sink_log);
            (predictions >= 40 && clicks >= 21)
                .then_some(())
                .ok_or(format!("{predictions} predictions, {clicks} clicks"))
        },
    )
    .await?;
    // Each window closes: the log must reach past the last prediction's window, or its label is not final.
    tokio::time::sleep(Duration::from_secs(CLICK_WINDOW_SECONDS + 1)).await;
    let (code, _) = client
        .post(
            server.http,
            "/v2/models/ctr/infer",
            &rest_body(Some("late"), std::slice::from_ref(&data.eval[40])),
            &[],
        )
        .await?;
    assert_eq!(code, 200);
    // The redelivered record: the same request id, logged just before the split (after the original).
    let duplicate = json!({
        "requestId": "r-04", "model": "ctr", "version": "v1", "score": answered["r-04"].1,
        "features": {}, "timestampMs": split.as_millisecond() - 1,
    });
    send("predictions", duplicate.to_string()).await?;
    until(
        "the sink wrote the late predictions",
        Duration::from_secs(60),
        || async {
            let (predictions, _) = sink_written(&sink_log);
            (predictions >= 42)
                .then_some(())
                .ok_or(format!("{predictions} predictions"))
        },
    )
    .await?;

    let start = split - jiff::SignedDuration::from_hours(1);
    let end = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let out = dir.join("next");
    let status = Command::new(bin_dir().join("flywheel-trainer"))
        .arg("traffic-training-set")
        .arg("--traffic")
        .arg(format!("file://{}", traffic.display()))
        .arg("--model")
        .arg(&artifact)
        .args(["--train-range", &format!("{start},{split}")])
        .args(["--eval-range", &format!("{split},{end}")])
        .args(["--click-window", &format!("{CLICK_WINDOW_SECONDS}s")])
        .arg("--out-dir")
        .arg(&out)
        .arg("--termination-log")
        .arg(dir.join("termination-log"))
        .status()?;
    assert!(status.success());
    let report: Value = serde_json::from_slice(&std::fs::read(dir.join("termination-log"))?)?;
    assert_eq!(report["train"]["duplicates"], 1, "{report}");

    let train_set = read_set(&out.join("train.parquet"))?;
    let eval_set = read_set(&out.join("eval.parquet"))?;
    let train_ids = strings(&train_set, "request_id");
    let eval_ids = strings(&eval_set, "request_id");
    let expected_train: Vec<String> = (0..20).map(|i| format!("r-{i:02}")).collect();
    assert_eq!(train_ids, expected_train, "one row per served prediction");
    let expected_eval: Vec<String> = (20..40).map(|i| format!("r-{i:02}")).collect();
    assert_eq!(
        eval_ids, expected_eval,
        "`late` waits for its click window to close"
    );
    assert_eq!(report["eval"]["pending"], 1, "{report}");

    for set in [&train_set, &eval_set] {
        let ids = strings(set, "request_id");
        let clicked = set.column_by_name("clicked").ok_or("clicked")?.as_boolean();
        let users = set
            .column_by_name("user_id")
            .ok_or("user_id")?
            .as_primitive::<Int64Type>();
        let prices = set
            .column_by_name("price")
            .ok_or("price")?
            .as_primitive::<Float64Type>();
        let devices = strings(set, "device");
        let scores = set
            .column_by_name("served_score")
            .ok_or("served_score")?
            .as_primitive::<Float64Type>();
        for (row, id) in ids.iter().enumerate() {
            let &(i, score) = answered
                .get(id)
                .ok_or("a row no request was answered with")?;
            let sent = &data.eval[i];
            assert_eq!(clicked.value(row), i % 2 == 0, "{id}'s label");
            assert_eq!(users.value(row), i64::from(sent.user_id), "{id}");
            assert_eq!(prices.value(row), sent.price, "{id}");
            assert_eq!(devices[row], sent.device, "{id}");
            assert_eq!(scores.value(row), score, "{id}");
        }
    }

    // The model that served scores the built rows as it scored them online: the features are the served ones.
    let served_schema: Value =
        serde_json::from_slice(&std::fs::read(data.dir.join("schema.json"))?)?;
    let built_schema: Value = serde_json::from_slice(&std::fs::read(out.join("schema.json"))?)?;
    assert_eq!(built_schema, served_schema, "the served model's schema");
    let offline = offline_scores(&artifact, &out)?;
    let online: Vec<f64> = eval_ids
        .iter()
        .filter_map(|id| answered.get(id).map(|&(_, score)| score))
        .collect();
    assert_eq!(offline.len(), online.len());
    for (offline, online) in offline.iter().zip(&online) {
        assert!(
            (offline - online).abs() < 1e-6,
            "offline {offline} against served {online}"
        );
    }

    // And the next model trains on it.
    let next = train(&out, &dir.join("v2"), 2)?;
    assert!(next.exists());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
