//! The online data plane with real processes on 127.0.0.1: models trained by the real trainer, served by
//! `flywheel-serving serve` over REST and gRPC (tonic client), routed by `flywheel-serving route`, with a real
//! Kafka-protocol broker for the prediction log and the click topic.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use flywheel_e2e::serving::{
    Broker, HttpClient, Process, Redis, Server, dataset, free_port, metric, offline_scores,
    rest_body, scores_of, temp_dir, token_file, train,
};
use flywheel_e2e::wait::until;
use flywheel_e2e::{bin_dir, http::http_get};
use flywheel_serving::grpc::feedback::feedback_client::FeedbackClient;
use flywheel_serving::grpc::feedback::{Label, LabelRequest};
use flywheel_serving::grpc::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use flywheel_serving::grpc::inference::model_infer_request::InferInputTensor;
use flywheel_serving::grpc::inference::{InferTensorContents, ModelInferRequest};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `flywheel-serving serve` of `artifact` as model version `version`, with `extra` flags.
async fn serve_model(
    dir: &Path,
    name: &str,
    version: &str,
    artifact: &Path,
    extra: &[&str],
) -> Result<Server, flywheel_e2e::serving::ServingError> {
    let uri = artifact.display().to_string();
    let mut flags = vec!["--model-version", version, "--model-uri", &uri];
    flags.extend_from_slice(extra);
    Server::start(dir, name, &flags).await
}

/// A gRPC request of `rows` with typed contents (`raw` = false) or raw little-endian bytes (Triton's form).
fn grpc_request(rows: &[flywheel_ml::synthetic::Impression], raw: bool) -> ModelInferRequest {
    let n = rows.len() as i64;
    let ints = |name: &str, f: fn(&flywheel_ml::synthetic::Impression) -> i64| {
        let values: Vec<i64> = rows.iter().map(f).collect();
        (
            name.to_owned(),
            "INT64",
            InferTensorContents {
                int64_contents: values,
                ..Default::default()
            },
        )
    };
    let strings = |name: &str, f: fn(&flywheel_ml::synthetic::Impression) -> &'static str| {
        (
            name.to_owned(),
            "BYTES",
            InferTensorContents {
                bytes_contents: rows.iter().map(|r| f(r).as_bytes().to_vec()).collect(),
                ..Default::default()
            },
        )
    };
    let tensors = vec![
        ints("user_id", |r| i64::from(r.user_id)),
        ints("item_id", |r| i64::from(r.item_id)),
        ints("category", |r| i64::from(r.category)),
        ints("age", |r| i64::from(r.age)),
        strings("gender", |r| r.gender),
        strings("device", |r| r.device),
        ints("hour", |r| i64::from(r.hour)),
        (
            "price".to_owned(),
            "FP64",
            InferTensorContents {
                fp64_contents: rows.iter().map(|r| r.price).collect(),
                ..Default::default()
            },
        ),
    ];
    let mut request = ModelInferRequest {
        model_name: "ctr".into(),
        ..Default::default()
    };
    for (name, datatype, contents) in tensors {
        let mut tensor = InferInputTensor {
            name,
            datatype: datatype.into(),
            shape: vec![n],
            ..Default::default()
        };
        if raw {
            let bytes: Vec<u8> = match datatype {
                "INT64" => contents
                    .int64_contents
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                "FP64" => contents
                    .fp64_contents
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                _ => contents
                    .bytes_contents
                    .iter()
                    .flat_map(|b| [(b.len() as u32).to_le_bytes().to_vec(), b.clone()].concat())
                    .collect(),
            };
            request.raw_input_contents.push(bytes);
        } else {
            tensor.contents = Some(contents);
        }
        request.inputs.push(tensor);
    }
    request
}

fn grpc_scores(response: &flywheel_serving::grpc::inference::ModelInferResponse) -> Vec<f64> {
    match response.raw_output_contents.first() {
        Some(raw) => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        None => response
            .outputs
            .first()
            .and_then(|o| o.contents.as_ref())
            .map(|c| c.fp64_contents.clone())
            .unwrap_or_default(),
    }
}

#[tokio::test]
async fn online_scores_equal_the_trainers_offline_scores_over_rest_and_grpc() -> TestResult {
    let dir = temp_dir("serving-scores");
    let data = dataset(&dir.join("data"), 5_000, 7)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let offline = offline_scores(&artifact, &data.dir)?;
    assert_eq!(offline.len(), data.eval.len());
    let server = serve_model(&dir, "serve", "v1", &artifact, &[]).await?;
    let client = HttpClient::default();
    let (code, ready) = client
        .send("GET", server.http, "/v2/health/ready", None, &[])
        .await?;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["serving"]["version"], "v1");

    // REST: single rows and batches of 100.
    let mut online = Vec::new();
    for row in &data.eval[..50] {
        let (code, answer) = client
            .post(
                server.http,
                "/v2/models/ctr/infer",
                &rest_body(None, std::slice::from_ref(row)),
                &[],
            )
            .await?;
        assert_eq!(code, 200, "{answer}");
        online.extend(scores_of(&answer));
    }
    for chunk in data.eval[50..].chunks(100) {
        let (code, answer) = client
            .post(
                server.http,
                "/v2/models/ctr/infer",
                &rest_body(Some("batch"), chunk),
                &[],
            )
            .await?;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["model_version"], "v1");
        online.extend(scores_of(&answer));
    }
    assert_eq!(online.len(), offline.len());
    let worst = online
        .iter()
        .zip(&offline)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= 1e-6, "REST scores differ from offline by {worst}");

    // gRPC with typed contents and with raw bytes.
    let mut grpc =
        GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{}", server.grpc)).await?;
    for raw in [false, true] {
        let rows = &data.eval[..200];
        let response = grpc
            .model_infer(grpc_request(rows, raw))
            .await?
            .into_inner();
        assert_eq!(response.model_version, "v1");
        let scores = grpc_scores(&response);
        assert_eq!(scores.len(), 200);
        let worst = scores
            .iter()
            .zip(&offline)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-6, "gRPC (raw {raw}) scores differ by {worst}");
    }
    let metadata = grpc
        .model_metadata(flywheel_serving::grpc::inference::ModelMetadataRequest {
            name: "ctr".into(),
            version: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(metadata.inputs.len(), 8, "every feature but the cross");
    let text = server.metrics().await?;
    assert_eq!(
        metric(
            &text,
            "flywheel_serving_predictions_total",
            &["version=\"v1\""]
        ),
        Some((offline.len() + 400) as f64)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn the_off_the_shelf_triton_client_scores_like_the_trainer() -> TestResult {
    let dir = temp_dir("serving-triton");
    let data = dataset(&dir.join("data"), 2_000, 19)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let offline = offline_scores(&artifact, &data.dir)?;
    let server = serve_model(&dir, "serve", "v1", &artifact, &[]).await?;
    let rows: Vec<Value> = data.eval[..20]
        .iter()
        .map(|r| {
            json!({"user_id": r.user_id, "item_id": r.item_id, "category": r.category, "age": r.age,
                        "gender": r.gender, "device": r.device, "hour": r.hour, "price": r.price})
        })
        .collect();
    let rows_file = dir.join("rows.json");
    std::fs::write(&rows_file, Value::Array(rows).to_string())?;
    let python = std::process::Command::new("bash")
        .arg(flywheel_e2e::repo_root().join("e2e/scripts/install-tritonclient.sh"))
        .output()?;
    assert!(
        python.status.success(),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
    let output = std::process::Command::new(python)
        .arg(flywheel_e2e::repo_root().join("e2e/scripts/tritonclient_infer.py"))
        .args([server.grpc.to_string(), server.http.to_string()])
        .arg(&rows_file)
        .output()?;
    assert!(
        output.status.success(),
        "tritonclient failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout)?;
    for protocol in ["grpc", "http"] {
        let scores: Vec<f64> = answer[protocol]
            .as_array()
            .map(|s| s.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        assert_eq!(scores.len(), 20, "{protocol}: {answer}");
        let worst = scores
            .iter()
            .zip(&offline)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-6,
            "{protocol}: tritonclient scores differ from offline by {worst}"
        );
    }
    assert_eq!(
        answer["metadata"]["inputs"].as_array().map(Vec::len),
        Some(8)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn entity_features_come_from_the_online_store_when_the_request_lacks_them() -> TestResult {
    let dir = temp_dir("serving-online");
    let redis = Redis::start(&dir).await?;
    let data = dataset(&dir.join("data"), 2_000, 23)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let offline = offline_scores(&artifact, &data.dir)?;
    let rows = &data.eval[..30];
    for row in rows {
        redis.command(&[
            "HSET",
            &format!("user:{}", row.user_id),
            "age",
            &row.age.to_string(),
            "gender",
            row.gender,
        ])?;
    }
    let server = serve_model(
        &dir,
        "serve",
        "v1",
        &artifact,
        &[
            "--online-store",
            &format!("redis://127.0.0.1:{}", redis.port),
            "--online-entity",
            "user_id",
            "--online-features",
            "age,gender",
            "--online-key-prefix",
            "user:",
        ],
    )
    .await?;
    let client = HttpClient::default();
    let without_entity_features = |rows: &[flywheel_ml::synthetic::Impression]| {
        let mut body = rest_body(None, rows);
        if let Some(inputs) = body["inputs"].as_array_mut() {
            inputs.retain(|input| input["name"] != "age" && input["name"] != "gender");
        }
        body
    };
    let (code, answer) = client
        .post(
            server.http,
            "/v2/models/ctr/infer",
            &without_entity_features(rows),
            &[],
        )
        .await?;
    assert_eq!(code, 200, "{answer}");
    let scores = scores_of(&answer);
    let worst = scores
        .iter()
        .zip(&offline)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert_eq!(scores.len(), 30);
    assert!(
        worst <= 1e-6,
        "scores with online features differ from offline by {worst}"
    );
    // Values in the request win over the store.
    let (code, answer) = client
        .post(
            server.http,
            "/v2/models/ctr/infer",
            &rest_body(None, rows),
            &[],
        )
        .await?;
    assert_eq!((code, scores_of(&answer)), (200, scores.clone()));
    // An unknown entity scores with missing values; a bad stored value names the feature; a dead store is 503.
    let mut stranger = rows[0].clone();
    stranger.user_id = 999_999;
    let (code, _) = client
        .post(
            server.http,
            "/v2/models/ctr/infer",
            &without_entity_features(&[stranger]),
            &[],
        )
        .await?;
    assert_eq!(code, 200);
    redis.command(&["HSET", &format!("user:{}", rows[1].user_id), "age", "old"])?;
    let (code, answer) = client
        .post(
            server.http,
            "/v2/models/ctr/infer",
            &without_entity_features(&rows[1..2]),
            &[],
        )
        .await?;
    assert_eq!(code, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("input `age`: online store value `old`"),
        "{answer}"
    );
    let text = server.metrics().await?;
    assert_eq!(
        metric(
            &text,
            "flywheel_serving_online_store_lookups_total",
            &["outcome=\"miss\""]
        ),
        Some(1.0)
    );
    drop(redis);
    let (code, answer) = client
        .post(
            server.http,
            "/v2/models/ctr/infer",
            &without_entity_features(rows),
            &[],
        )
        .await?;
    assert_eq!(code, 503, "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A generated password may hold any character; it reaches Redis as it is (never spliced into a URL, where `@`,
/// `/` or `#` would change the host or cut it short).
#[tokio::test]
async fn an_online_store_password_that_is_not_url_safe_still_authenticates() -> TestResult {
    const PASSWORD: &str = "p@ss:w/rd#1%?é";
    let dir = temp_dir("serving-online-password");
    let redis = Redis::start_with(&dir, &["--requirepass", PASSWORD]).await?;
    let data = dataset(&dir.join("data"), 2_000, 29)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let offline = offline_scores(&artifact, &data.dir)?;
    let rows = &data.eval[..5];
    for row in rows {
        redis.command(&[
            "--no-auth-warning",
            "-a",
            PASSWORD,
            "HSET",
            &format!("user:{}", row.user_id),
            "age",
            &row.age.to_string(),
        ])?;
    }
    let server = serve_model(
        &dir,
        "serve",
        "v1",
        &artifact,
        &[
            "--online-store",
            &format!("redis://127.0.0.1:{}", redis.port),
            "--online-store-password",
            PASSWORD,
            "--online-features",
            "age",
            "--online-key-prefix",
            "user:",
        ],
    )
    .await?;
    let mut body = rest_body(None, rows);
    if let Some(inputs) = body["inputs"].as_array_mut() {
        inputs.retain(|input| input["name"] != "age");
    }
    let (code, answer) = HttpClient::default()
        .post(server.http, "/v2/models/ctr/infer", &body, &[])
        .await?;
    assert_eq!(code, 200, "{answer}");
    let scores = scores_of(&answer);
    assert_eq!(scores.len(), 5);
    for (online, offline) in scores.iter().zip(&offline) {
        assert!(
            (online - offline).abs() <= 1e-6,
            "{online} against {offline}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_naming_the_input_and_nothing_breaks() -> TestResult {
    let dir = temp_dir("serving-bad-input");
    let data = dataset(&dir.join("data"), 2_000, 3)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let server = serve_model(
        &dir,
        "serve",
        "v1",
        &artifact,
        &["--max-request-rows", "64", "--max-body-bytes", "65536"],
    )
    .await?;
    let client = HttpClient::default();
    let good = rest_body(None, &data.eval[..2]);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "missing feature",
            {
                let mut b = good.clone();
                if let Some(inputs) = b["inputs"].as_array_mut() {
                    inputs.remove(0);
                }
                b
            },
            "input `user_id` is missing",
        ),
        (
            "unknown feature",
            {
                let mut b = good.clone();
                if let Some(inputs) = b["inputs"].as_array_mut() {
                    inputs.push(json!({"name": "colour", "shape": [2], "datatype": "INT64", "data": [1, 2]}));
                }
                b
            },
            "input `colour` is not a feature",
        ),
        (
            "wrong datatype",
            {
                let mut b = good.clone();
                b["inputs"][4] =
                    json!({"name": "gender", "shape": [2], "datatype": "INT64", "data": [1, 2]});
                b
            },
            "input `gender`: datatype",
        ),
        (
            "wrong shape",
            {
                let mut b = good.clone();
                b["inputs"][1]["shape"] = json!([2, 2]);
                b
            },
            "input `item_id`: shape [2, 2]",
        ),
        (
            "too few values",
            {
                let mut b = good.clone();
                b["inputs"][2]["shape"] = json!([3]);
                b
            },
            "input `category`: shape [3] needs 3 values, got 2",
        ),
        (
            "ragged rows",
            {
                let mut b = good.clone();
                b["inputs"][3] =
                    json!({"name": "age", "shape": [1], "datatype": "INT64", "data": [30]});
                b
            },
            "input `age` has 1 rows",
        ),
        (
            "string in a number",
            {
                let mut b = good.clone();
                b["inputs"][7]["data"] = json!(["cheap", 2.0]);
                b
            },
            "input `price`: element 0 is not a number",
        ),
        (
            "oversized batch",
            rest_body(None, &data.eval[..65]),
            "batch of 65 rows exceeds the limit of 64",
        ),
        (
            "not JSON",
            Value::String("{".into()),
            "malformed request body",
        ),
        (
            "request id too long to remember",
            {
                let mut b = good.clone();
                b["id"] = json!("x".repeat(129));
                b
            },
            "request id is 129 bytes; at most 128",
        ),
    ];
    for (case, body, expected) in cases {
        let bytes = match &body {
            Value::String(raw) => raw.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        let (code, answer) = client
            .send(
                "POST",
                server.http,
                "/v2/models/ctr/infer",
                Some(bytes),
                &[],
            )
            .await?;
        assert_eq!(code, 400, "{case}: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(expected),
            "{case}: `{message}` lacks `{expected}`"
        );
    }
    let huge = vec![b' '; 70_000];
    let (code, answer) = client
        .send("POST", server.http, "/v2/models/ctr/infer", Some(huge), &[])
        .await?;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("exceeds 65536 bytes")
    );
    let (code, _) = client
        .post(server.http, "/v2/models/other/infer", &good, &[])
        .await?;
    assert_eq!(code, 404);
    // Admin endpoints are not on the inference port.
    let (code, _) = http_get(server.http, "/metrics").await?;
    assert_eq!(code, 404);
    let (code, _) = client
        .send(
            "PUT",
            server.http,
            "/admin/model",
            Some(b"{}".to_vec()),
            &[],
        )
        .await?;
    assert!(
        code == 404 || code == 405,
        "admin on the inference port answered {code}"
    );

    // gRPC: NaN, an unknown datatype, truncated raw bytes.
    let mut grpc =
        GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{}", server.grpc)).await?;
    let mut nan = grpc_request(&data.eval[..2], false);
    nan.inputs[7].datatype = "FP32".into();
    nan.inputs[7].contents = Some(InferTensorContents {
        fp32_contents: vec![f32::NAN, 1.0],
        ..Default::default()
    });
    let mut unknown = grpc_request(&data.eval[..2], false);
    unknown.inputs[0].datatype = "COMPLEX64".into();
    let mut truncated = grpc_request(&data.eval[..2], true);
    truncated.raw_input_contents[7].pop();
    for (request, expected) in [
        (nan, "feature `price`: value is not a finite number"),
        (unknown, "input `user_id`: datatype COMPLEX64"),
        (truncated, "input `price`: 15 raw bytes"),
    ] {
        let status = grpc
            .model_infer(request)
            .await
            .err()
            .ok_or("bad request accepted")?;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{} lacks {expected}",
            status.message()
        );
    }
    // Still serving, and every rejection counted.
    let (code, _) = client
        .post(server.http, "/v2/models/ctr/infer", &good, &[])
        .await?;
    assert_eq!(code, 200);
    let text = server.metrics().await?;
    assert!(
        metric(
            &text,
            "flywheel_serving_requests_total",
            &["code=\"INVALID_ARGUMENT\"", "protocol=\"grpc\""]
        ) == Some(3.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn a_hot_swap_under_load_fails_no_request_and_a_corrupt_artifact_keeps_the_old_model()
-> TestResult {
    let dir = temp_dir("serving-swap");
    let data = dataset(&dir.join("data"), 3_000, 5)?;
    let v1 = train(&data.dir, &dir.join("v1"), 1)?;
    let v2 = train(&data.dir, &dir.join("v2"), 2)?;
    let config = dir.join("model.json");
    let source =
        |version: &str, artifact: &Path| json!({"version": version, "uri": artifact}).to_string();
    std::fs::write(&config, source("v1", &v1))?;
    let (token, bearer) = token_file(&dir, "admin-token")?;
    let server = Server::start(
        &dir,
        "serve",
        &[
            "--model-config",
            &config.display().to_string(),
            "--admin-token-file",
            &token.display().to_string(),
            "--allow-model-swap",
        ],
    )
    .await?;
    let client = HttpClient::default();
    let (code, _) = client
        .send("GET", server.http, "/v2/health/ready", None, &[])
        .await?;
    assert_eq!(code, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        usize,
    >::new()));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (client, stop, failures, served) = (
            client.clone(),
            stop.clone(),
            failures.clone(),
            served.clone(),
        );
        let rows = data.eval[worker * 10..worker * 10 + 10].to_vec();
        let port = server.http;
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client
                    .post(port, "/v2/models/ctr/infer", &rest_body(None, &rows), &[])
                    .await
                {
                    Ok((200, answer)) => {
                        let version = answer["model_version"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        *served
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(version)
                            .or_default() += 1;
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&config, source("v2", &v2))?;
    until("v2 serving", Duration::from_secs(20), || {
        let client = client.clone();
        async move {
            let (_, ready) = client
                .send("GET", server.http, "/v2/health/ready", None, &[])
                .await
                .map_err(|e| e.to_string())?;
            (ready["serving"]["version"] == "v2")
                .then_some(())
                .ok_or(ready.to_string())
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A corrupt artifact (bytes flipped, digest file stale): refused, v2 keeps serving, readiness says why.
    let corrupt_dir = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt_dir)?;
    let mut bytes = std::fs::read(&v2)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(corrupt_dir.join("model.fwm"), bytes)?;
    std::fs::copy(
        dir.join("v2/model.fwm.sha256"),
        corrupt_dir.join("model.fwm.sha256"),
    )?;
    std::fs::write(&config, source("v3", &corrupt_dir.join("model.fwm")))?;
    let ready = until("the failed load reported", Duration::from_secs(20), || {
        let client = client.clone();
        async move {
            let (code, ready) = client
                .send("GET", server.http, "/v2/health/ready", None, &[])
                .await
                .map_err(|e| e.to_string())?;
            (code == 200 && ready["lastError"].is_string())
                .then_some(ready.clone())
                .ok_or(ready.to_string())
        }
    })
    .await?;
    assert_eq!(ready["serving"]["version"], "v2");
    assert!(
        ready["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("sha256"),
        "{ready}"
    );
    // A schema hash the ModelVersion does not expect is refused through the admin endpoint too.
    let swap = |source: Value, authorization: Option<String>| {
        let client = client.clone();
        async move {
            let headers: Vec<(&str, &str)> = authorization
                .as_deref()
                .map(|value| ("authorization", value))
                .into_iter()
                .collect();
            client
                .send(
                    "PUT",
                    server.admin,
                    "/admin/model",
                    Some(source.to_string().into_bytes()),
                    &headers,
                )
                .await
        }
    };
    let (code, answer) = swap(
        json!({"version": "v4", "uri": v1, "featureSchemaHash": "0".repeat(64)}),
        Some(bearer.clone()),
    )
    .await?;
    assert_eq!(code, 422, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("feature schema hash")
    );
    // A device is never read as an artifact (it would be read until memory runs out).
    let (code, answer) = swap(
        json!({"version": "v5", "uri": "/dev/zero", "sha256": "0".repeat(64)}),
        Some(bearer.clone()),
    )
    .await?;
    assert_eq!(code, 422, "{answer}");
    assert!(
        answer.to_string().contains("not a regular file"),
        "{answer}"
    );
    // Without the admin token, or with another one, a swap is refused and changes nothing.
    for authorization in [None, Some(format!("Bearer {}", "0".repeat(64)))] {
        let (code, answer) = swap(json!({"version": "v6", "uri": v1}), authorization).await?;
        assert_eq!(code, 401, "{answer}");
    }
    let (_, ready) = client
        .send("GET", server.http, "/v2/health/ready", None, &[])
        .await?;
    assert_eq!(ready["serving"]["version"], "v2", "{ready}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await?;
    }
    let served = served.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests across the swaps; served {served:?}"
    );
    assert!(
        served.get("v1").copied().unwrap_or(0) > 0 && served.get("v2").copied().unwrap_or(0) > 0,
        "{served:?}"
    );
    assert_eq!(served.len(), 2, "only v1 and v2 ever answered: {served:?}");
    // The corrupt artifact, the wrong schema hash and the device; refused callers never reach a load.
    let text = server.metrics().await?;
    assert_eq!(
        metric(
            &text,
            "flywheel_serving_model_loads_total",
            &["outcome=\"failed\""]
        ),
        Some(3.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn labels_fed_back_give_the_online_auc_and_calibration_of_the_ml_core() -> TestResult {
    let dir = temp_dir("serving-feedback");
    let data = dataset(&dir.join("data"), 3_000, 11)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let (token, bearer) = token_file(&dir, "feedback-token")?;
    let token = token.display().to_string();
    let server = serve_model(
        &dir,
        "serve",
        "v1",
        &artifact,
        &["--feedback-token-file", &token],
    )
    .await?;
    let client = HttpClient::default();
    let rows = &data.eval[..400];
    let mut scores = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let (code, answer) = client
            .post(
                server.http,
                "/v2/models/ctr/infer",
                &rest_body(Some(&format!("req-{i}")), std::slice::from_ref(row)),
                &[],
            )
            .await?;
        assert_eq!(code, 200);
        scores.extend(scores_of(&answer));
    }
    // An id the server issues is 128 random bits, so nobody can label a prediction they were not given.
    let (code, answer) = client
        .post(
            server.http,
            "/v2/models/ctr/infer",
            &rest_body(None, &rows[..1]),
            &[],
        )
        .await?;
    let issued = answer["id"].as_str().unwrap_or_default();
    assert_eq!(code, 200);
    assert!(
        issued.len() == 32 && issued.bytes().all(|b| b.is_ascii_hexdigit()),
        "{answer}"
    );
    let labels: Vec<bool> = rows.iter().map(|r| r.clicked).collect();
    // Half over HTTP, half over gRPC; one unknown id on each.
    let http_labels: Vec<Value> = (0..200)
        .map(|i| json!({"requestId": format!("req-{i}"), "clicked": labels[i]}))
        .chain(std::iter::once(
            json!({"requestId": "nobody", "clicked": true}),
        ))
        .collect();
    // Labels without the feedback token (or with another) are refused and join nothing.
    for headers in [
        vec![],
        vec![("authorization", "Bearer not-the-feedback-token")],
    ] {
        let (code, answer) = client
            .post(
                server.http,
                "/v1/feedback",
                &json!({"labels": http_labels}),
                &headers,
            )
            .await?;
        assert_eq!(code, 401, "{answer}");
    }
    let mut feedback = FeedbackClient::connect(format!("http://127.0.0.1:{}", server.grpc)).await?;
    let refused = feedback
        .label(LabelRequest {
            labels: vec![Label {
                request_id: "req-0".into(),
                clicked: true,
            }],
        })
        .await
        .err()
        .map(|status| status.code());
    assert_eq!(refused, Some(tonic::Code::Unauthenticated));
    let (code, answer) = client
        .post(
            server.http,
            "/v1/feedback",
            &json!({"labels": http_labels}),
            &[("authorization", &bearer)],
        )
        .await?;
    assert_eq!(
        (
            code,
            answer["matched"].as_u64(),
            answer["unmatched"].as_u64()
        ),
        (200, Some(200), Some(1))
    );
    let grpc_labels: Vec<Label> = (200..400)
        .map(|i| Label {
            request_id: format!("req-{i}"),
            clicked: labels[i],
        })
        .chain(std::iter::once(Label {
            request_id: "req-0".into(),
            clicked: true,
        }))
        .collect();
    let mut request = tonic::Request::new(LabelRequest {
        labels: grpc_labels,
    });
    request
        .metadata_mut()
        .insert("authorization", bearer.parse()?);
    let answer = feedback.label(request).await?.into_inner();
    assert_eq!(
        (answer.matched, answer.unmatched),
        (200, 1),
        "a label twice is not joined twice"
    );

    let expected_auc = flywheel_ml::metrics::auc(&scores, &labels).ok_or("one class only")?;
    let clicks = labels.iter().filter(|&&c| c).count() as f64;
    let expected_calibration = scores.iter().sum::<f64>() / clicks;
    let text = until(
        "the quality window holds 400 labels",
        Duration::from_secs(20),
        || async {
            let text = server.metrics().await.map_err(|e| e.to_string())?;
            (metric(
                &text,
                "flywheel_serving_online_window_samples",
                &["version=\"v1\""],
            ) == Some(400.0))
            .then_some(text.clone())
            .ok_or(text)
        },
    )
    .await?;
    let auc = metric(&text, "flywheel_serving_online_auc", &["version=\"v1\""]).ok_or("no AUC")?;
    let calibration = metric(
        &text,
        "flywheel_serving_online_calibration",
        &["version=\"v1\""],
    )
    .ok_or("no calibration")?;
    assert!(
        (auc - expected_auc).abs() < 1e-12,
        "online AUC {auc} vs ml {expected_auc}"
    );
    assert!(
        (calibration - expected_calibration).abs() < 1e-9,
        "{calibration} vs {expected_calibration}"
    );
    assert_eq!(
        metric(
            &text,
            "flywheel_serving_labeled_clicks_total",
            &["version=\"v1\""]
        ),
        Some(clicks)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn predictions_are_logged_to_kafka_and_clicks_come_back_from_a_topic() -> TestResult {
    use rdkafka::Message;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let dir = temp_dir("serving-kafka");
    let broker = Broker::start(&dir).await?;
    broker.create_topic("predictions")?;
    broker.create_topic("clicks")?;
    let data = dataset(&dir.join("data"), 2_000, 13)?;
    let artifact = train(&data.dir, &dir.join("v1"), 1)?;
    let server = serve_model(
        &dir,
        "serve",
        "v1",
        &artifact,
        &[
            "--kafka-brokers",
            &broker.address,
            "--prediction-log-topic",
            "predictions",
            "--clicks-topic",
            "clicks",
            "--clicks-offset-reset",
            "earliest",
        ],
    )
    .await?;
    let client = HttpClient::default();
    let mut answered = std::collections::BTreeMap::new();
    for (i, row) in data.eval[..20].iter().enumerate() {
        let id = format!("k-{i}");
        let (code, answer) = client
            .post(
                server.http,
                "/v2/models/ctr/infer",
                &rest_body(Some(&id), std::slice::from_ref(row)),
                &[],
            )
            .await?;
        assert_eq!(code, 200);
        answered.insert(id, scores_of(&answer)[0]);
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", "test-reader")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&["predictions"])?;
    let mut logged = std::collections::BTreeMap::new();
    while logged.len() < 20 {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        let record: Value = serde_json::from_slice(message.payload().unwrap_or_default())?;
        assert_eq!(record["version"], "v1");
        let features = record["features"].as_object().cloned().unwrap_or_default();
        let mut names: Vec<&str> = features.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "age", "category", "device", "gender", "hour", "item_id", "price", "user_id"
            ],
            "every input feature as scored (the cross is computed, not logged)"
        );
        logged.insert(
            record["requestId"].as_str().unwrap_or_default().to_owned(),
            record["score"].as_f64().unwrap_or(-1.0),
        );
    }
    assert_eq!(
        logged, answered,
        "the log carries exactly what was answered"
    );

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .create()?;
    for i in 0..10 {
        let payload = json!({"requestId": format!("k-{i}")}).to_string();
        producer
            .send(
                FutureRecord::<(), _>::to("clicks").payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| err)?;
    }
    producer
        .send(
            FutureRecord::<(), _>::to("clicks").payload("not json"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(err, _)| err)?;
    let text = until(
        "10 clicks joined from Kafka",
        Duration::from_secs(30),
        || async {
            let text = server.metrics().await.map_err(|e| e.to_string())?;
            (metric(
                &text,
                "flywheel_serving_feedback_total",
                &["source=\"kafka\"", "outcome=\"matched\""],
            ) == Some(10.0))
            .then_some(text.clone())
            .ok_or(text)
        },
    )
    .await?;
    assert_eq!(
        metric(
            &text,
            "flywheel_serving_labeled_clicks_total",
            &["version=\"v1\""]
        ),
        Some(10.0)
    );
    assert_eq!(
        metric(
            &text,
            "flywheel_serving_prediction_log_total",
            &["outcome=\"queued\""]
        ),
        Some(20.0)
    );
    until(
        "the malformed click counted",
        Duration::from_secs(10),
        || async {
            let text = server.metrics().await.map_err(|e| e.to_string())?;
            metric(
                &text,
                "flywheel_serving_feedback_total",
                &["source=\"kafka\"", "outcome=\"malformed\""],
            )
            .ok_or(text)
        },
    )
    .await?;

    // A client's labels reach a replica that did not serve the predictions (what a Service's balancing does
    // half the time with two replicas): it writes them to the clicks topic, and the replica that served them
    // joins them from there.
    let other = serve_model(
        &dir,
        "serve-other",
        "v1",
        &artifact,
        &[
            "--kafka-brokers",
            &broker.address,
            "--clicks-topic",
            "clicks",
        ],
    )
    .await?;
    let http_labels: Vec<Value> = (10..15)
        .map(|i| json!({"requestId": format!("k-{i}"), "clicked": i % 2 == 0}))
        .collect();
    let (code, answer) = client
        .post(
            other.http,
            "/v1/feedback",
            &json!({"labels": http_labels}),
            &[],
        )
        .await?;
    assert_eq!(
        (code, answer["forwarded"].as_u64()),
        (202, Some(5)),
        "{answer}"
    );
    let mut feedback = FeedbackClient::connect(format!("http://127.0.0.1:{}", other.grpc)).await?;
    let answer = feedback
        .label(LabelRequest {
            labels: vec![Label {
                request_id: "k-15".into(),
                clicked: true,
            }],
        })
        .await?
        .into_inner();
    assert_eq!((answer.forwarded, answer.matched), (1, 0));
    let (code, answer) = client
        .post(
            other.http,
            "/v1/feedback",
            &json!({"requestId": "x".repeat(129)}),
            &[],
        )
        .await?;
    assert_eq!(code, 400, "an over-long request id is refused: {answer}");
    let text = until(
        "the serving replica joined the 6 forwarded labels",
        Duration::from_secs(30),
        || async {
            let text = server.metrics().await.map_err(|e| e.to_string())?;
            (metric(
                &text,
                "flywheel_serving_feedback_total",
                &["source=\"kafka\"", "outcome=\"matched\""],
            ) == Some(16.0))
            .then_some(text.clone())
            .ok_or(text)
        },
    )
    .await?;
    assert_eq!(
        metric(
            &text,
            "flywheel_serving_labeled_clicks_total",
            &["version=\"v1\""]
        ),
        Some(14.0),
        "10 clicks from the topic, then k-10, k-12, k-14 and k-15"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The route config: canary (v2) first, so its bucket range only grows.
fn routes(canary_weight: f64, stable: &Server, canary: &Server, mirror: Option<&Server>) -> Value {
    let backend = |name: &str, server: &Server, weight: f64| json!({"name": name, "http": format!("http://127.0.0.1:{}", server.http), "grpc": format!("http://127.0.0.1:{}", server.grpc), "weight": weight});
    let mut backends = vec![backend("v2", canary, canary_weight)];
    if canary_weight < 100.0 {
        backends.push(backend("v1", stable, 100.0 - canary_weight));
    }
    let mut config = json!({"backends": backends});
    if let Some(mirror) = mirror {
        config["mirror"] = json!({"name": "shadow", "http": format!("http://127.0.0.1:{}", mirror.http), "percent": 100});
    }
    config
}

#[tokio::test]
async fn the_router_splits_exactly_sticks_users_while_weights_grow_and_mirrors_without_answering()
-> TestResult {
    let dir = temp_dir("serving-router");
    let data = dataset(&dir.join("data"), 2_000, 17)?;
    let artifact = train(&data.dir, &dir.join("model"), 1)?;
    let start = |version: &'static str| {
        let (dir, artifact) = (dir.clone(), artifact.clone());
        async move { serve_model(&dir, &format!("serve-{version}"), version, &artifact, &[]).await }
    };
    let stable = start("v1").await?;
    let canary = start("v2").await?;
    let config_file = dir.join("routes.json");
    std::fs::write(
        &config_file,
        routes(1.0, &stable, &canary, None).to_string(),
    )?;
    let (port, admin) = (free_port()?, free_port()?);
    let (token, bearer) = token_file(&dir, "admin-token")?;
    let _router = Process::spawn(
        "router",
        std::process::Command::new(bin_dir().join("flywheel-serving"))
            .args([
                "route",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
            ])
            .arg("--config")
            .arg(&config_file)
            .arg("--admin-token-file")
            .arg(&token)
            .args(["--model-name", "ctr"]),
        &dir.join("router.log"),
    )?;
    until("router listening", Duration::from_secs(20), || async move {
        http_get(admin, "/metrics")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await?;
    let client = HttpClient::default();
    let authorized = [("authorization", bearer.as_str())];
    // Without the admin token nobody reads or repoints the routes.
    let hijack = routes(100.0, &stable, &canary, Some(&stable)).to_string();
    let (code, _) = client
        .send(
            "PUT",
            admin,
            "/admin/routes",
            Some(hijack.into_bytes()),
            &[],
        )
        .await?;
    assert_eq!(code, 401);
    let (code, _) = client
        .send("GET", admin, "/admin/routes", None, &[])
        .await?;
    assert_eq!(code, 401);
    let (code, current) = client
        .send("GET", admin, "/admin/routes", None, &authorized)
        .await?;
    assert_eq!(code, 200);
    assert_eq!(current["backends"][0]["weight"].as_f64(), Some(1.0));
    assert!(current["mirror"].is_null(), "{current}");
    let body = Arc::new(rest_body(None, &data.eval[..1]));

    // Sends `count` requests keyed `<prefix><i>` with 16 in flight; returns how many the canary answered and
    // which version answered each key.
    let send = |prefix: String, count: usize| {
        let (client, body) = (client.clone(), body.clone());
        async move {
            let next = Arc::new(AtomicUsize::new(0));
            let answers = Arc::new(std::sync::Mutex::new(vec![String::new(); count]));
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let (client, body, next, answers, prefix) = (
                    client.clone(),
                    body.clone(),
                    next.clone(),
                    answers.clone(),
                    prefix.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok::<_, String>(());
                        }
                        let key = format!("{prefix}{i}");
                        let (code, answer) = client
                            .post(port, "/v2/models/ctr/infer", &body, &[("x-user-id", &key)])
                            .await
                            .map_err(|e| e.to_string())?;
                        if code != 200 {
                            return Err(format!("{key}: {code} {answer}"));
                        }
                        answers.lock().unwrap_or_else(|e| e.into_inner())[i] =
                            answer["model_version"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned();
                    }
                }));
            }
            for task in tasks {
                task.await.map_err(|e| e.to_string())??;
            }
            let answers = answers.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Ok::<_, String>(answers)
        }
    };

    let users = 2_000;
    let mut on_canary = vec![false; users];
    let mut total = 0;
    for (step, weight) in [1.0, 5.0, 20.0, 100.0].into_iter().enumerate() {
        let config = routes(weight, &stable, &canary, None).to_string();
        if step % 2 == 0 {
            // Through the mounted file on even steps, the admin endpoint on odd ones.
            std::fs::write(&config_file, &config)?;
            until("routes reloaded", Duration::from_secs(10), || {
                let client = client.clone();
                async move {
                    let (_, current) = client
                        .send("GET", admin, "/admin/routes", None, &authorized)
                        .await
                        .map_err(|e| e.to_string())?;
                    (current["backends"][0]["weight"].as_f64() == Some(weight))
                        .then_some(())
                        .ok_or(current.to_string())
                }
            })
            .await?;
        } else {
            let (code, answer) = client
                .send(
                    "PUT",
                    admin,
                    "/admin/routes",
                    Some(config.into_bytes()),
                    &authorized,
                )
                .await?;
            assert_eq!(code, 200, "{answer}");
        }
        let count = 25_000;
        let answers = send(format!("step{step}-"), count).await?;
        total += count;
        let canary_share = answers.iter().filter(|v| *v == "v2").count() as f64 / count as f64;
        let p = weight / 100.0;
        let sigma = (p * (1.0 - p) / count as f64).sqrt();
        assert!(
            (canary_share - p).abs() <= 4.0 * sigma + 1e-12,
            "weight {weight}%: canary got {:.4}%",
            canary_share * 100.0
        );
        let sticky = send("user-".into(), users).await?;
        for (user, version) in sticky.iter().enumerate() {
            let now = version == "v2";
            assert!(
                now || !on_canary[user],
                "user-{user} left the canary at {weight}%"
            );
            on_canary[user] = now;
        }
    }
    assert!(total >= 100_000);
    assert!(on_canary.iter().all(|&c| c));

    // A bad config is refused with the field named, and the current routes stay.
    let bad = json!({"backends": [{"name": "v2", "http": "http://127.0.0.1:1", "weight": 60}]})
        .to_string();
    let (code, answer) = client
        .send(
            "PUT",
            admin,
            "/admin/routes",
            Some(bad.into_bytes()),
            &authorized,
        )
        .await?;
    assert_eq!(code, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("add up to 60%"),
        "{answer}"
    );

    // gRPC through the router.
    let mut grpc = GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{port}")).await?;
    let response = grpc
        .model_infer(grpc_request(&data.eval[..3], false))
        .await?
        .into_inner();
    assert_eq!(response.model_version, "v2");

    // Mirror: v1 gets a copy of everything, answers are compared, never returned.
    let config = routes(100.0, &stable, &canary, Some(&stable)).to_string();
    let (code, _) = client
        .send(
            "PUT",
            admin,
            "/admin/routes",
            Some(config.into_bytes()),
            &authorized,
        )
        .await?;
    assert_eq!(code, 200);
    let mirrored = send("mirror-".into(), 200).await?;
    assert!(
        mirrored.iter().all(|v| v == "v2"),
        "a mirror answer was returned"
    );
    let text = until(
        "200 shadow comparisons",
        Duration::from_secs(20),
        || async {
            let (_, text) = http_get(admin, "/metrics")
                .await
                .map_err(|e| e.to_string())?;
            (metric(
                &text,
                "flywheel_router_shadow_comparisons_total",
                &["outcome=\"agree\""],
            ) == Some(200.0))
            .then_some(text.clone())
            .ok_or(text)
        },
    )
    .await?;
    assert_eq!(
        metric(
            &text,
            "flywheel_router_requests_total",
            &["backend=\"v2\"", "code=\"502\""]
        ),
        None
    );

    // A backend that refuses connections (a crash-looping canary): the caller gets 502, and the router counts
    // it as an upstream failure of that version, which the Rollout's error rate adds to the servers' errors.
    let dead = json!({"backends": [{"name": "v3", "http": format!("http://127.0.0.1:{}", free_port()?), "weight": 100}]});
    let (code, _) = client
        .send(
            "PUT",
            admin,
            "/admin/routes",
            Some(dead.to_string().into_bytes()),
            &authorized,
        )
        .await?;
    assert_eq!(code, 200);
    let (code, _) = client
        .post(port, "/v2/models/ctr/infer", &body, &[("x-user-id", "u")])
        .await?;
    assert_eq!(code, 502);
    let (_, text) = http_get(admin, "/metrics").await?;
    assert_eq!(
        metric(
            &text,
            "flywheel_router_upstream_failures_total",
            &["model=\"ctr\"", "backend=\"v3\""]
        ),
        Some(1.0),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
