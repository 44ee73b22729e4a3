//! The trainer binary end to end: generated data trains into a verifiable artifact and termination message;
//! bad inputs fail with a message naming the file and the column; the chief serves its live progress.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use parquet::arrow::ArrowWriter;
use serde_json::Value;

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flywheel-trainer"))
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("running flywheel-trainer: {err}"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flywheel-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("{err}"));
    dir
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

fn generated(dir: &Path) {
    let out = trainer(&[
        "generate",
        "--rows",
        "30000",
        "--users",
        "300",
        "--items",
        "80",
        "--buckets",
        "2000",
        "--out",
        &s(dir),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn train(dir: &Path, train: &Path, eval: &Path, schema: &Path) -> Output {
    trainer(&[
        "train",
        "--train",
        &s(train),
        "--eval",
        &s(eval),
        "--schema",
        &s(schema),
        "--output",
        &s(&dir.join("model")),
        "--termination-log",
        &s(&dir.join("termination-log")),
        "--hidden",
        "16",
        "--embedding-dim",
        "4",
        "--batch-size",
        "256",
        "--epochs",
        "2",
    ])
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn generated_data_trains_into_a_verified_artifact() {
    let dir = scratch("ok");
    generated(&dir);
    let out = train(
        &dir,
        &dir.join("train.parquet"),
        &dir.join("eval.parquet"),
        &dir.join("schema.json"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or(Value::Null))
        .collect();
    assert!(
        events.iter().all(|e| e.is_object()),
        "every stdout line is JSON: {stdout}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "progress" && e["samplesPerSecond"].as_f64().is_some())
    );
    let message: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("termination-log")).unwrap_or_default(),
    )
    .unwrap_or(Value::Null);
    let artifact = std::fs::read(dir.join("model/model.fwm")).unwrap_or_default();
    assert_eq!(
        message["sha256"].as_str(),
        Some(flywheel_ml::artifact::sha256_hex(&artifact).as_str())
    );
    assert!(
        message["metrics"]["auc"].as_f64().unwrap_or(0.0) > 0.55,
        "{message}"
    );
    assert_eq!(
        message["featureSchemaHash"].as_str().map(str::len),
        Some(64)
    );
}

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, array)| Field::new(*name, array.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    let file = std::fs::File::create(path).unwrap_or_else(|err| panic!("{err}"));
    let mut writer = ArrowWriter::try_new(file, schema, None).unwrap_or_else(|err| panic!("{err}"));
    if batch.num_rows() > 0 {
        writer.write(&batch).unwrap_or_else(|err| panic!("{err}"));
    }
    writer.close().unwrap_or_else(|err| panic!("{err}"));
}

fn tiny_schema(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-schema.json");
    let schema = serde_json::json!({"features": [
        {"name": "user_id", "valueType": "Int64", "transform": {"hashBucket": {"buckets": 100}}},
        {"name": "price", "valueType": "Float64", "transform": {"log1p": {}}},
    ]});
    std::fs::write(&path, schema.to_string()).unwrap_or_else(|err| panic!("{err}"));
    path
}

fn ints(values: &[i64]) -> ArrayRef {
    Arc::new(Int64Array::from(values.to_vec()))
}

fn floats(values: &[f64]) -> ArrayRef {
    Arc::new(Float64Array::from(values.to_vec()))
}

/// Trains on a good eval set and `bad` as the training set; returns stderr.
fn failure_with(name: &str, bad: Vec<(&str, ArrayRef)>) -> (String, PathBuf) {
    let dir = scratch(name);
    let bad_path = dir.join("bad.parquet");
    write_parquet(&bad_path, bad);
    let good = dir.join("good.parquet");
    write_parquet(
        &good,
        vec![
            ("user_id", ints(&[1, 2])),
            ("price", floats(&[1.0, 2.0])),
            ("clicked", ints(&[0, 1])),
        ],
    );
    let out = train(&dir, &bad_path, &good, &tiny_schema(&dir));
    assert!(!out.status.success(), "bad input must fail");
    (stderr(&out), bad_path)
}

#[test]
fn missing_column_is_named_with_its_file() {
    let (err, path) = failure_with(
        "missing",
        vec![("user_id", ints(&[1, 2])), ("clicked", ints(&[0, 1]))],
    );
    assert!(
        err.contains(&s(&path)) && err.contains("column `price` is missing"),
        "{err}"
    );
}

#[test]
fn wrong_type_is_named_with_its_file_and_feature() {
    let prices: ArrayRef = Arc::new(StringArray::from(vec!["cheap", "dear"]));
    let (err, path) = failure_with(
        "type",
        vec![
            ("user_id", ints(&[1, 2])),
            ("price", prices),
            ("clicked", ints(&[0, 1])),
        ],
    );
    assert!(
        err.contains(&s(&path)) && err.contains("feature `price`") && err.contains("a string"),
        "{err}"
    );
}

#[test]
fn empty_file_is_refused() {
    let (err, path) = failure_with(
        "empty",
        vec![
            ("user_id", ints(&[])),
            ("price", floats(&[])),
            ("clicked", ints(&[])),
        ],
    );
    assert!(
        err.contains(&s(&path)) && err.contains("holds no rows"),
        "{err}"
    );
}

#[test]
fn nan_label_is_named_with_its_file_and_column() {
    let labels = floats(&[0.0, f64::NAN]);
    let (err, path) = failure_with(
        "nan",
        vec![
            ("user_id", ints(&[1, 2])),
            ("price", floats(&[1.0, 2.0])),
            ("clicked", labels),
        ],
    );
    assert!(
        err.contains(&s(&path))
            && err.contains("label column `clicked` row 1")
            && err.contains("NaN"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_parquet_is_refused() {
    let dir = scratch("garbage");
    let garbage = dir.join("garbage.parquet");
    std::fs::write(&garbage, b"user_id,price\n1,2\n").unwrap_or_else(|err| panic!("{err}"));
    let out = train(&dir, &garbage, &garbage, &tiny_schema(&dir));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a readable Parquet file"),
        "{}",
        stderr(&out)
    );
}

fn train_with(dir: &Path, output: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "train".to_owned(),
        "--train".into(),
        s(&dir.join("train.parquet")),
        "--eval".into(),
        s(&dir.join("eval.parquet")),
        "--schema".into(),
        s(&dir.join("schema.json")),
        "--output".into(),
        s(&dir.join(output)),
        "--termination-log".into(),
        s(&dir.join(format!("{output}.termination-log"))),
        "--hidden".into(),
        "16".into(),
        "--embedding-dim".into(),
        "4".into(),
        "--batch-size".into(),
        "256".into(),
        "--epochs".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    trainer(&refs)
}

fn result_of(dir: &Path, output: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{output}.termination-log"))).unwrap_or_default(),
    )
    .unwrap_or(Value::Null)
}

#[test]
fn a_restarted_run_resumes_its_checkpoint_and_ends_identical() {
    let dir = scratch("resume");
    generated(&dir);
    let checkpoints = s(&dir.join("checkpoints"));
    let first = train_with(
        &dir,
        "first",
        &["--checkpoint-dir", &checkpoints, "--checkpoint-every", "40"],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(String::from_utf8_lossy(&first.stdout).contains("\"event\":\"checkpoint\""));
    // A restarted pod finds the last checkpoint (step 160, the last multiple of 40) and trains only the rest.
    let second = train_with(
        &dir,
        "second",
        &["--checkpoint-dir", &checkpoints, "--checkpoint-every", "40"],
    );
    assert!(second.status.success(), "{}", stderr(&second));
    let stdout = String::from_utf8_lossy(&second.stdout);
    let resumed: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "resumed")
        .unwrap_or(Value::Null);
    assert_eq!(resumed["step"], 160, "{stdout}");
    let (a, b) = (result_of(&dir, "first"), result_of(&dir, "second"));
    assert_eq!(a["metrics"], b["metrics"], "same weights, same metrics");
    assert_eq!(a["steps"], b["steps"]);
}

#[test]
fn the_cpu_thread_count_is_measured_and_never_changes_the_weights() {
    let dir = scratch("threads");
    generated(&dir);
    // Wide enough that burn-flex splits the matmuls over threads.
    let wide = ["--hidden", "256,256"];
    let measured = train_with(&dir, "measured", &wide);
    assert!(measured.status.success(), "{}", stderr(&measured));
    let stdout = String::from_utf8_lossy(&measured.stdout);
    let choice: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "cpuThreads")
        .unwrap_or(Value::Null);
    let chosen = choice["threads"].to_string();
    assert!(
        choice["stepSeconds"][&chosen].as_f64().is_some(),
        "{stdout}"
    );
    for threads in ["1", "2"] {
        let run = train_with(
            &dir,
            threads,
            &[&wide[..], &["--cpu-threads", threads]].concat(),
        );
        assert!(run.status.success(), "{}", stderr(&run));
        assert_eq!(
            result_of(&dir, threads)["metrics"],
            result_of(&dir, "measured")["metrics"],
            "{threads} thread(s)"
        );
    }
    let refused = train_with(&dir, "none", &["--cpu-threads", "0"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--cpu-threads must be at least 1"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn warm_start_checks_the_artifact_digest_and_records_it() {
    let dir = scratch("warm");
    generated(&dir);
    let base = train_with(&dir, "base", &[]);
    assert!(base.status.success(), "{}", stderr(&base));
    let digest = result_of(&dir, "base")["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let artifact = s(&dir.join("base/model.fwm"));
    let wrong = train_with(
        &dir,
        "wrong",
        &[
            "--warm-start",
            &artifact,
            "--warm-start-sha256",
            &"0".repeat(64),
        ],
    );
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("sha256"), "{}", stderr(&wrong));
    let warm = train_with(
        &dir,
        "warm",
        &["--warm-start", &artifact, "--warm-start-sha256", &digest],
    );
    assert!(warm.status.success(), "{}", stderr(&warm));
    let model = std::fs::read(dir.join("warm/model.fwm")).unwrap_or_default();
    let saved = flywheel_ml::artifact::decode::<burn::backend::Flex>(&model, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        saved.card.lineage.warm_start.as_deref(),
        Some(digest.as_str())
    );
    let other_shape = train_with(
        &dir,
        "shape",
        &["--warm-start", &artifact, "--architecture", "wide_deep"],
    );
    assert!(!other_shape.status.success());
    assert!(
        stderr(&other_shape).contains("cannot warm-start"),
        "{}",
        stderr(&other_shape)
    );
}

/// Gives `flag` the value `value` in `args`, replacing the value it had.
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    let at = args.iter().position(|arg| arg == flag);
    match at.and_then(|at| args.get_mut(at + 1)) {
        Some(old) => *old = value.to_owned(),
        None => args.extend([flag.to_owned(), value.to_owned()]),
    }
}

/// A plain HTTP/1.0 GET of `path` on `addr`: the status code and body, or None while nothing answers.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

#[test]
fn the_chief_serves_its_live_status() {
    let dir = common::scratch("cli", "status");
    common::generate(&dir, "30000");
    // Enough epochs of small batches to outlast the polling many times over; the test stops it when done.
    let mut args = common::train_args(&dir, "model");
    set_flag(&mut args, "--epochs", "200");
    set_flag(&mut args, "--patience", "0");
    set_flag(&mut args, "--batch-size", "32");
    set_flag(&mut args, "--progress-every", "10");
    // Port 0: the trainer reports the port it got, so no other process can take it first.
    set_flag(&mut args, "--status-listen", "127.0.0.1:0");
    let mut child = common::spawn(&args, &dir.join("model.log"));
    let started = Instant::now();
    let mut addr = None;
    let progress = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no step served: {}",
            common::log(&dir, "model")
        );
        assert!(
            !matches!(child.try_wait(), Ok(Some(_))),
            "the trainer ended before a step was served: {}",
            common::log(&dir, "model")
        );
        std::thread::sleep(Duration::from_millis(20));
        if addr.is_none() {
            addr = common::event(&dir, "model", "statusListening")
                .and_then(|event| event["addr"].as_str().map(str::to_owned));
        }
        let Some(addr) = &addr else { continue };
        if let Some((status, body)) = http_get(addr, "/progress") {
            assert_eq!(status, 200, "{body}");
            let progress: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let step = progress["step"]
                .as_u64()
                .unwrap_or_else(|| panic!("no step in {body}"));
            if step > 0 {
                break progress;
            }
            assert_eq!(progress["phase"], "loading", "{body}");
        }
    };
    let not_found = addr
        .and_then(|addr| http_get(&addr, "/metrics"))
        .map(|(status, _)| status);
    let _ = child.kill();
    let _ = child.wait();

    let step = progress["step"].as_u64().unwrap_or_default();
    let total_steps = progress["totalSteps"].as_u64().unwrap_or_default();
    assert!(total_steps >= step, "{progress}");
    assert!(
        progress["epoch"].as_u64().is_some_and(|epoch| epoch < 200),
        "{progress}"
    );
    assert!(
        progress["loss"].as_f64().is_some_and(f64::is_finite),
        "{progress}"
    );
    assert!(
        progress["samplesPerSecond"]
            .as_f64()
            .is_some_and(|rate| rate > 0.0),
        "{progress}"
    );
    assert!(
        ["training", "evaluating", "done"]
            .contains(&progress["phase"].as_str().unwrap_or_default()),
        "{progress}"
    );
    assert_eq!(not_found, Some(404));
}

#[test]
fn a_status_address_in_use_is_a_clear_error() {
    let dir = scratch("status-in-use");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|err| panic!("{err}"));
    let addr = taken
        .local_addr()
        .unwrap_or_else(|err| panic!("{err}"))
        .to_string();
    let out = train_with(&dir, "model", &["--status-listen", &addr]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("binding the status endpoint {addr}: ")),
        "{}",
        stderr(&out)
    );
}

/// Flags that cannot work together, or values no device has, fail before anything is read, naming the flag.
#[test]
fn impossible_devices_and_rank_layouts_are_refused_naming_the_flag() {
    let dir = scratch("flags");
    let cases: [(&[&str], &str); 2] = [
        (&["--device", "tpu:0"], "`tpu:0`: use cpu, cuda or cuda:N"),
        (
            &["--local-ranks", "2"],
            "--local-ranks 2 needs --data-parallel",
        ),
    ];
    for (flags, expected) in cases {
        let out = train_with(&dir, "model", flags);
        assert!(!out.status.success(), "{flags:?}");
        assert!(
            stderr(&out).contains(expected),
            "{flags:?}: {}",
            stderr(&out)
        );
    }
}

/// A CPU-only build refuses a GPU device up front, saying how to get one, instead of training on the CPU.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_cpu_build_asked_for_a_gpu_says_how_to_build_one() {
    let dir = scratch("cuda");
    generated(&dir);
    let out = train_with(&dir, "gpu", &["--device", "cuda:1"]);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(
        message.contains("--device cuda:1") && message.contains("--features cuda"),
        "{message}"
    );
    assert!(!dir.join("gpu/model.fwm").exists());
}

/// A CUDA build trains on the GPU where there is one, and elsewhere fails at start with the driver's reason
/// instead of a panic.
#[cfg(feature = "cuda")]
#[test]
fn a_cuda_build_trains_on_the_gpu_or_says_why_it_cannot() {
    let dir = scratch("cuda");
    generated(&dir);
    let out = train_with(&dir, "gpu", &["--device", "cuda:0"]);
    if out.status.success() {
        let result = result_of(&dir, "gpu");
        assert!(
            result["metrics"]["auc"].as_f64().unwrap_or(0.0) > 0.55,
            "{result}"
        );
        return;
    }
    let message = stderr(&out);
    assert!(
        message.contains("--device cuda:0: the GPU is not usable: "),
        "{message}"
    );
    assert!(!message.contains("panicked"), "{message}");
    assert!(!dir.join("gpu/model.fwm").exists());
}

/// An offline-only FeatureView `namespace/name` over the events `generate-events` wrote to `dir/events`.
fn offline_view(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    let view = serde_json::json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {
            "entities": [{"name": "user", "joinKey": "user_id", "valueType": "Int64"}],
            "source": {"batch": {"uri": format!("file://{}", s(&dir.join("events/events.parquet"))),
                                 "timestampField": "event_timestamp"}},
            "features": [{"name": "price", "valueType": "Float64"},
                         {"name": "category", "valueType": "String"}],
            "ttl": "1d",
            "offline": {"uri": format!("file://{}", s(&dir.join(format!("offline-{name}"))))},
        },
    });
    std::fs::write(&path, view.to_string()).unwrap_or_else(|err| panic!("{err}"));
    path
}

#[test]
fn a_model_records_the_feature_view_its_training_set_was_built_from() {
    let dir = scratch("lineage");
    let events = s(&dir.join("events"));
    let generated = trainer(&[
        "generate-events",
        "--events",
        "4000",
        "--users",
        "100",
        "--labels",
        "3000",
        "--out",
        &events,
    ]);
    assert!(generated.status.success(), "{}", stderr(&generated));
    let build = |view: &Path, out: &str| {
        let materialized = trainer(&[
            "materialize",
            "--view",
            &s(view),
            "--termination-log",
            &s(&dir.join("materialized.json")),
        ]);
        assert!(materialized.status.success(), "{}", stderr(&materialized));
        let built = trainer(&[
            "build-dataset",
            "--view",
            &s(view),
            "--events",
            &format!("{events}/labels.parquet"),
            "--out",
            &s(&dir.join(out)),
        ]);
        assert!(built.status.success(), "{}", stderr(&built));
    };
    build(&offline_view(&dir, "acts"), "train.parquet");
    let view_hash = serde_json::from_str::<Value>(
        &std::fs::read_to_string(dir.join("materialized.json")).unwrap_or_default(),
    )
    .unwrap_or(Value::Null)["schemaHash"]
        .clone();
    std::fs::write(
        dir.join("schema.json"),
        r#"{"features": [{"name": "price", "valueType": "Float64", "transform": {"log1p": {}}},
            {"name": "category", "valueType": "String", "transform": {"hashBucket": {"buckets": 100}}}]}"#,
    )
    .unwrap_or_else(|err| panic!("{err}"));
    let train = |eval: &str, output: &str| {
        trainer(&[
            "train",
            "--train",
            &s(&dir.join("train.parquet")),
            "--eval",
            &s(&dir.join(eval)),
            "--schema",
            &s(&dir.join("schema.json")),
            "--label",
            "label",
            "--group",
            "user_id",
            "--hidden",
            "8",
            "--embedding-dim",
            "4",
            "--batch-size",
            "256",
            "--output",
            &s(&dir.join(output)),
            "--termination-log",
            &s(&dir.join(format!("{output}.termination-log"))),
        ])
    };
    let trained = train("train.parquet", "model");
    assert!(trained.status.success(), "{}", stderr(&trained));
    let source = &result_of(&dir, "model")["featureView"];
    assert_eq!(source["name"], "ml/acts");
    assert!(
        view_hash.is_string() && source["schemaHash"] == view_hash,
        "{source} vs {view_hash}"
    );

    // Evaluating on a set joined from another view is refused before any training.
    build(&offline_view(&dir, "other"), "other.parquet");
    let refused = train("other.parquet", "mixed");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("were built from different FeatureViews or feature schemas"),
        "{}",
        stderr(&refused)
    );
}
