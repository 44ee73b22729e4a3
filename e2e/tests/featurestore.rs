//! The FeatureView data plane as real processes: `flywheel-trainer materialize` and `build-dataset` against
//! Parquet files and a real Redis, and `flywheel-serving ingest` against a real Kafka-protocol broker (tansu)
//! and Redis, killed mid-stream.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray};
use flywheel_e2e::bin_dir;
use flywheel_e2e::serving::{Broker, Process, Redis, free_port, metric, temp_dir};
use flywheel_e2e::wait::until;
use flywheel_features::FeatureValue;
use flywheel_features::online::{AS_OF_FIELD, OnlineRow, hash_dump};
use flywheel_features::table::{self, read_batches, write_parquet};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;
/// A generated event read back: user, time (µs), price.
type RawEvent = (i64, i64, f64);
/// A bad source file: its name, its columns, and what the error must say.
type BadCase = (&'static str, Vec<(&'static str, ArrayRef)>, &'static str);

const HOUR_US: i64 = 3_600_000_000;

/// Runs `flywheel-trainer` and returns its last JSON line, or its stderr as the error.
fn trainer(args: &[&str]) -> Result<Value, String> {
    let output = Command::new(bin_dir().join("flywheel-trainer"))
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("{e}: {stdout}"))
}

/// A FeatureView over the generated events (`generate-events`) with last values, windowed aggregations and a
/// transform; `online` is the Redis port, if any.
fn write_view(
    dir: &Path,
    source: &Path,
    online: Option<u16>,
    ttl: &str,
    stream: Option<(&str, &str)>,
) -> PathBuf {
    let mut spec = json!({
        "entities": [{"name": "user", "joinKey": "user_id", "valueType": "Int64"}],
        "source": {"batch": {"uri": format!("file://{}", source.display()), "timestampField": "event_timestamp"}},
        "features": [
            {"name": "price", "valueType": "Float64"},
            {"name": "clicks", "valueType": "Int64"},
            {"name": "category", "valueType": "String"},
            {"name": "spend_1h", "column": "price", "valueType": "Float64",
             "aggregation": {"function": "sum", "window": "1h"}},
            {"name": "events_1d", "column": "price", "valueType": "Int64",
             "aggregation": {"function": "count", "window": "1d"}},
            {"name": "log_price", "column": "price", "valueType": "Float64", "transform": {"log1p": {}}},
        ],
        "ttl": ttl,
        "offline": {"uri": format!("file://{}", dir.join("offline").display())},
        "drift": {"psiThreshold": 0.25, "ksThreshold": 0.2},
    });
    if let Some(port) = online {
        spec["online"] = json!({"redis": {"address": format!("127.0.0.1:{port}")}});
    }
    if let Some((brokers, topic)) = stream {
        spec["source"]["stream"] =
            json!({"brokers": [brokers], "topic": topic, "timestampField": "event_timestamp"});
    }
    let manifest = json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView",
        "metadata": {"name": "users", "namespace": "test"},
        "spec": spec,
    });
    let path = dir.join("view.json");
    let _ = std::fs::write(&path, manifest.to_string());
    path
}

/// The generated events, read back independently of the feature store: (user, time µs, price).
fn raw_events(path: &Path) -> Result<Vec<RawEvent>, Box<dyn std::error::Error>> {
    let mut rows = Vec::new();
    for batch in read_batches(path)? {
        let users = table::values(&batch, path, "user_id")?;
        let times = table::timestamps(&batch, path, "event_timestamp")?;
        let prices = table::values(&batch, path, "price")?;
        for ((user, time), price) in users.into_iter().zip(times).zip(prices) {
            if let (FeatureValue::Int(u), FeatureValue::Float(p)) = (user, price) {
                rows.push((u, time, p));
            }
        }
    }
    Ok(rows)
}

fn hash(redis: &Redis, key: &str) -> Result<BTreeMap<String, String>, Box<dyn std::error::Error>> {
    let raw = redis.command(&["hgetall", key])?;
    let lines: Vec<&str> = raw.lines().collect();
    Ok(lines
        .chunks(2)
        .filter(|pair| pair.len() == 2)
        .map(|pair| (pair[0].to_owned(), pair[1].to_owned()))
        .collect())
}

fn number(fields: &BTreeMap<String, String>, name: &str) -> f64 {
    fields
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Every key and its fields, for before/after comparisons.
fn snapshot(
    redis: &Redis,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, Box<dyn std::error::Error>> {
    let keys = redis.command(&["--scan", "--pattern", "test/users:*"])?;
    let mut all = BTreeMap::new();
    for key in keys.lines() {
        all.insert(key.to_owned(), hash(redis, key)?);
    }
    Ok(all)
}

fn file_bytes(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>, Box<dyn std::error::Error>> {
    let mut files = BTreeMap::new();
    for file in table::parquet_files(dir)? {
        files.insert(file.clone(), std::fs::read(&file)?);
    }
    Ok(files)
}

#[tokio::test]
async fn materialization_matches_the_events_reruns_change_nothing_and_increments_add_only_new_events()
-> TestResult {
    let dir = temp_dir("features-materialize");
    let redis = Redis::start(&dir).await?;
    let source = dir.join("source");
    trainer(&[
        "generate-events",
        "--events",
        "20000",
        "--users",
        "300",
        "--labels",
        "10",
        "--span",
        "2d",
        "--out",
        &source.display().to_string(),
    ])?;
    std::fs::remove_file(source.join("labels.parquet"))?;
    let view = write_view(&dir, &source, Some(redis.port), "1d", None);
    let view_arg = view.display().to_string();
    let log = dir.join("termination.json").display().to_string();
    let first = trainer(&[
        "materialize",
        "--view",
        &view_arg,
        "--termination-log",
        &log,
    ])?;
    let report = &first["report"];
    assert_eq!(report["rows"], 20000, "{report}");
    assert_eq!(report["entitiesWritten"], 300, "{report}");
    assert_eq!(report["baselineCreated"], true);
    let message: Value = serde_json::from_str(&std::fs::read_to_string(&log)?)?;
    assert_eq!(
        message["watermark"], report["watermark"],
        "the termination message carries the report"
    );

    // Independently of the feature store: each user's values as of the watermark.
    let events = raw_events(&source.join("events.parquet"))?;
    let watermark = events.iter().map(|e| e.1).max().unwrap_or_default();
    for user in [0, 7, 150, 299] {
        let mine: Vec<&(i64, i64, f64)> = events.iter().filter(|e| e.0 == user).collect();
        let latest = mine
            .iter()
            .max_by_key(|e| e.1)
            .map(|e| e.2)
            .unwrap_or(f64::NAN);
        let spend: f64 = mine
            .iter()
            .filter(|e| e.1 > watermark - HOUR_US)
            .map(|e| e.2)
            .sum();
        let count = mine
            .iter()
            .filter(|e| e.1 > watermark - 24 * HOUR_US)
            .count() as f64;
        let stored = hash(&redis, &format!("test/users:{user}"))?;
        assert!(
            (number(&stored, "price") - latest).abs() < 1e-9,
            "user {user}: {stored:?} latest {latest}"
        );
        assert!(
            (number(&stored, "spend_1h") - spend).abs() < 1e-6,
            "user {user}: {stored:?} spend {spend}"
        );
        assert_eq!(
            number(&stored, "events_1d"),
            count,
            "user {user}: {stored:?}"
        );
        assert!((number(&stored, "log_price") - latest.ln_1p()).abs() < 1e-9);
        // The hash expires a TTL after the user's newest event.
        let newest = mine.iter().map(|e| e.1).max().unwrap_or_default();
        let ttl_ms: i64 = redis
            .command(&["pttl", &format!("test/users:{user}")])?
            .trim()
            .parse()?;
        let expected_ms = (newest + 24 * HOUR_US - jiff::Timestamp::now().as_microsecond()) / 1000;
        assert!(
            (ttl_ms - expected_ms).abs() < 10_000,
            "user {user}: pttl {ttl_ms} vs {expected_ms}"
        );
    }

    // A re-run changes nothing, offline or online.
    let (offline_before, online_before) = (file_bytes(&dir.join("offline"))?, snapshot(&redis)?);
    trainer(&[
        "materialize",
        "--view",
        &view_arg,
        "--termination-log",
        &log,
    ])?;
    assert_eq!(
        file_bytes(&dir.join("offline"))?,
        offline_before,
        "offline partitions changed on a re-run"
    );
    assert_eq!(
        snapshot(&redis)?,
        online_before,
        "online values changed on a re-run"
    );

    // New events after the watermark: only they are counted, and a user's count grows by exactly their number.
    let end = jiff::Timestamp::from_microsecond(watermark + HOUR_US / 2)?.to_string();
    trainer(&[
        "generate-events",
        "--events",
        "500",
        "--users",
        "300",
        "--labels",
        "10",
        "--span",
        "20m",
        "--end",
        &end,
        "--seed",
        "99",
        "--out",
        &dir.join("more").display().to_string(),
    ])?;
    std::fs::rename(dir.join("more/events.parquet"), source.join("more.parquet"))?;
    let since = report["watermark"].as_str().unwrap_or_default().to_owned();
    let next = trainer(&[
        "materialize",
        "--view",
        &view_arg,
        "--termination-log",
        &log,
        "--since",
        &since,
    ])?;
    assert_eq!(next["report"]["rows"], 500, "{}", next["report"]);
    assert_eq!(next["report"]["baselineCreated"], false);
    let added = raw_events(&source.join("more.parquet"))?;
    let new_watermark = added.iter().map(|e| e.1).max().unwrap_or_default();
    let user = added.first().map(|e| e.0).unwrap_or_default();
    let all: Vec<i64> = events
        .iter()
        .chain(&added)
        .filter(|e| e.0 == user)
        .map(|e| e.1)
        .collect();
    let count = all
        .iter()
        .filter(|&&t| t > new_watermark - 24 * HOUR_US && t <= new_watermark)
        .count() as f64;
    assert_eq!(
        number(&hash(&redis, &format!("test/users:{user}"))?, "events_1d"),
        count
    );
    Ok(())
}

/// 2,000 generated events of 50 users in the hour before `end` (now by default), into `source`.
fn generate_hour(source: &Path, end: Option<&str>) -> Result<Value, String> {
    let out = source.display().to_string();
    let mut args = vec![
        "generate-events",
        "--events",
        "2000",
        "--users",
        "50",
        "--labels",
        "10",
        "--span",
        "1h",
        "--out",
        &out,
    ];
    if let Some(end) = end {
        args.extend(["--end", end]);
    }
    trainer(&args)
}

/// Materializes `view` with its termination message in `dir`; the report.
fn materialize(dir: &Path, view: &Path) -> Result<Value, String> {
    let log = dir.join("termination.json").display().to_string();
    trainer(&[
        "materialize",
        "--view",
        &view.display().to_string(),
        "--termination-log",
        &log,
    ])
}

#[tokio::test]
async fn values_older_than_the_ttl_are_not_served() -> TestResult {
    let dir = temp_dir("features-ttl");
    let redis = Redis::start(&dir).await?;
    let source = dir.join("source");
    // Events that ended two days ago, under a one-day TTL: every value is already stale.
    let end =
        jiff::Timestamp::from_microsecond(jiff::Timestamp::now().as_microsecond() - 48 * HOUR_US)?
            .to_string();
    generate_hour(&source, Some(&end))?;
    let view = write_view(
        &dir,
        &source.join("events.parquet"),
        Some(redis.port),
        "1d",
        None,
    );
    let report = materialize(&dir, &view)?;
    assert_eq!(
        report["report"]["entitiesWritten"], 0,
        "{}",
        report["report"]
    );
    assert_eq!(report["report"]["expired"], 50);
    assert_eq!(redis.command(&["dbsize"])?.trim(), "0");
    Ok(())
}

/// The conditional write: an entity whose stored values are newer than the batch's (a streamed update) keeps
/// them (its key refuses `RESTORE`, and the script compares times), while the others are created.
#[tokio::test]
async fn a_batch_never_overwrites_newer_online_values() -> TestResult {
    let dir = temp_dir("features-newer");
    let redis = Redis::start(&dir).await?;
    let source = dir.join("source");
    generate_hour(&source, None)?;
    let events = raw_events(&source.join("events.parquet"))?;
    let users: std::collections::BTreeSet<i64> = events.iter().map(|e| e.0).collect();
    let streamed = *users.first().ok_or("no events")?;
    let key = format!("test/users:{streamed}");
    let newer = (jiff::Timestamp::now().as_microsecond() + HOUR_US).to_string();
    redis.command(&["hset", &key, "_as_of_us", &newer, "price", "-1"])?;
    redis.command(&["expire", &key, "86400"])?;
    let view = write_view(
        &dir,
        &source.join("events.parquet"),
        Some(redis.port),
        "1d",
        None,
    );
    let report = materialize(&dir, &view)?;
    assert_eq!(
        report["report"]["entitiesWritten"].as_u64(),
        Some(users.len() as u64 - 1),
        "{}",
        report["report"]
    );
    let kept = hash(&redis, &key)?;
    assert_eq!(kept.get("_as_of_us"), Some(&newer));
    assert_eq!(kept.get("price").map(String::as_str), Some("-1"));
    assert!(!kept.contains_key("clicks"), "{kept:?}");
    let other = hash(
        &redis,
        &format!("test/users:{}", users.last().ok_or("one user")?),
    )?;
    assert!(number(&other, "price").is_finite(), "{other:?}");
    Ok(())
}

/// A Redis that refuses `RESTORE` (an ACL without it, a managed Redis that renamed it) gets the same hashes and
/// expiries from the conditional script as one that takes it.
#[tokio::test]
async fn without_restore_the_script_writes_the_same_hashes() -> TestResult {
    let dir = temp_dir("features-no-restore");
    let (plain_dir, restoreless_dir) = (dir.join("plain"), dir.join("restoreless"));
    std::fs::create_dir_all(&plain_dir)?;
    std::fs::create_dir_all(&restoreless_dir)?;
    // Deep checks of every restored payload, so a malformed dump fails here instead of loading.
    let plain = Redis::start_with(&plain_dir, &["--sanitize-dump-payload", "yes"]).await?;
    let restoreless =
        Redis::start_with(&restoreless_dir, &["--rename-command", "RESTORE", ""]).await?;
    assert!(
        restoreless
            .command(&["restore", "probe", "0", "x"])?
            .contains("unknown command"),
        "the server still has RESTORE"
    );
    let source = dir.join("source");
    generate_hour(&source, None)?;
    let view = write_view(
        &dir,
        &source.join("events.parquet"),
        Some(plain.port),
        "1d",
        None,
    );
    let mut written = Vec::new();
    for redis in [&plain, &restoreless] {
        let address = format!("127.0.0.1:{}", redis.port);
        let offline = redis_offline(&dir, redis.port);
        let report = trainer(&[
            "materialize",
            "--view",
            &view.display().to_string(),
            "--termination-log",
            &dir.join("termination.json").display().to_string(),
            "--redis",
            &address,
            "--offline",
            &offline,
        ])?;
        written.push(report["report"]["entitiesWritten"].clone());
    }
    assert_eq!(written[0], written[1]);
    assert_eq!(written[0], 50, "{written:?}");
    let snapshot_plain = snapshot(&plain)?;
    assert_eq!(snapshot_plain.len(), 50);
    assert_eq!(snapshot(&restoreless)?, snapshot_plain);
    for key in snapshot_plain.keys() {
        let expiry = |redis: &Redis| -> Result<i64, Box<dyn std::error::Error>> {
            Ok(redis.command(&["pexpiretime", key])?.trim().parse()?)
        };
        assert_eq!(expiry(&plain)?, expiry(&restoreless)?, "{key}");
    }
    Ok(())
}

/// Dumps of hashes with values of every listpack width restore, under Redis's deep payload checks, to exactly
/// the fields written, expiring when asked.
#[tokio::test]
async fn hash_dumps_restore_to_the_same_hash_in_redis() -> TestResult {
    let dir = temp_dir("features-dump");
    let redis = Redis::start_with(&dir, &["--sanitize-dump-payload", "yes"]).await?;
    let expire_at_ms = jiff::Timestamp::now().as_millisecond() + 3_600_000;
    for (index, length) in [0, 1, 63, 64, 127, 4_095, 4_096, 20_000]
        .into_iter()
        .enumerate()
    {
        let row = OnlineRow {
            key: format!("dump:{index}"),
            as_of: 1_700_000_000_000_000,
            expire_at_ms,
            fields: vec![
                ("price".into(), "12.5".into()),
                (
                    "note".into(),
                    "é".repeat(length / 2) + &"x".repeat(length % 2),
                ),
                ("count".into(), "-3".into()),
            ],
        };
        let answer = restore(redis.port, &row.key, row.expire_at_ms, &hash_dump(&row))?;
        assert_eq!(answer, "+OK", "value of {length} bytes");
        let stored = hash(&redis, &row.key)?;
        let mut expected: BTreeMap<String, String> = row.fields.iter().cloned().collect();
        expected.insert(AS_OF_FIELD.into(), row.as_of.to_string());
        assert_eq!(stored, expected, "value of {length} bytes");
        let expiry: i64 = redis.command(&["pexpiretime", &row.key])?.trim().parse()?;
        assert_eq!(expiry, expire_at_ms);
    }
    Ok(())
}

/// `RESTORE key expire_at_ms dump ABSTTL` over the wire (redis-cli only takes binary input as the last
/// argument); returns the first line of the answer.
fn restore(
    port: u16,
    key: &str,
    expire_at_ms: i64,
    dump: &[u8],
) -> Result<String, Box<dyn std::error::Error>> {
    use std::io::{BufRead, Write};
    let expire_at = expire_at_ms.to_string();
    let arguments: [&[u8]; 5] = [
        b"RESTORE",
        key.as_bytes(),
        expire_at.as_bytes(),
        dump,
        b"ABSTTL",
    ];
    let mut request = format!("*{}\r\n", arguments.len()).into_bytes();
    for argument in arguments {
        request.extend_from_slice(format!("${}\r\n", argument.len()).as_bytes());
        request.extend_from_slice(argument);
        request.extend_from_slice(b"\r\n");
    }
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(&request)?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim_end().to_owned())
}

/// A separate offline table per server, so each run is a first run.
fn redis_offline(dir: &Path, port: u16) -> String {
    format!("file://{}", dir.join(format!("offline-{port}")).display())
}

fn write_columns(
    path: &Path,
    columns: Vec<(&str, ArrayRef)>,
) -> Result<(), Box<dyn std::error::Error>> {
    write_parquet(
        path,
        columns
            .into_iter()
            .map(|(n, a)| (n.to_owned(), a))
            .collect(),
    )?;
    Ok(())
}

fn ints(values: &[i64]) -> ArrayRef {
    Arc::new(Int64Array::from(values.to_vec()))
}

#[tokio::test]
async fn training_sets_are_point_in_time_correct_and_samples_are_joined() -> TestResult {
    let dir = temp_dir("features-pit");
    // User 1's price is 1.0 from t=100 s and 2.0 from t=200 s; user 2's is 5.0 from t=100 s. TTL 50 s.
    let source = dir.join("events.parquet");
    write_columns(
        &source,
        vec![
            ("user_id", ints(&[1, 1, 2])),
            ("event_timestamp", ints(&[200, 100, 100])),
            ("price", Arc::new(Float64Array::from(vec![2.0, 1.0, 5.0]))),
            ("clicks", ints(&[0, 0, 0])),
            ("category", Arc::new(StringArray::from(vec!["a", "a", "b"]))),
        ],
    )?;
    let view = write_view(&dir, &source, None, "50s", None);
    let view_arg = view.display().to_string();
    let log = dir.join("termination.json").display().to_string();
    trainer(&[
        "materialize",
        "--view",
        &view_arg,
        "--termination-log",
        &log,
    ])?;

    // Labeled events: t=150 must see 1.0 (a naive latest-value join gives 2.0); t=250 is exactly at the TTL;
    // t=251 is past it; user 2 at t=90 is before any value.
    let labels = dir.join("labels.parquet");
    write_columns(
        &labels,
        vec![
            ("user_id", ints(&[1, 1, 1, 2])),
            ("event_timestamp", ints(&[150, 250, 251, 90])),
            ("label", ints(&[1, 0, 1, 0])),
        ],
    )?;
    let out = dir.join("train.parquet");
    let built = trainer(&[
        "build-dataset",
        "--view",
        &view_arg,
        "--events",
        &labels.display().to_string(),
        "--out",
        &out.display().to_string(),
    ])?;
    assert_eq!(built["rows"], 4);
    assert_eq!(built["withFeatures"], 2);
    let batch = read_batches(&out)?.remove(0);
    assert_eq!(
        table::values(&batch, &out, "price")?,
        [
            FeatureValue::Float(1.0),
            FeatureValue::Float(2.0),
            FeatureValue::Null,
            FeatureValue::Null,
        ]
    );
    assert_eq!(
        table::values(&batch, &out, "label")?,
        [1, 0, 1, 0].map(FeatureValue::Int),
        "labels kept"
    );
    assert_eq!(
        table::values(&batch, &out, "events_1d")?[1],
        FeatureValue::Int(2)
    );

    // Sample joining: impressions ← clicks (30 s window) ← conversions (60 s window), and the prediction log.
    let impressions = dir.join("impressions.parquet");
    write_columns(
        &impressions,
        vec![
            (
                "request_id",
                Arc::new(StringArray::from(vec!["r1", "r2", "r3"])),
            ),
            ("user_id", ints(&[1, 1, 2])),
            ("event_timestamp", ints(&[150, 210, 120])),
        ],
    )?;
    let clicks = dir.join("clicks.parquet");
    write_columns(
        &clicks,
        vec![
            (
                "request_id",
                Arc::new(StringArray::from(vec!["r1", "r1", "r2"])),
            ),
            (
                "click_id",
                Arc::new(StringArray::from(vec!["c1", "c1", "c2"])),
            ),
            ("event_timestamp", ints(&[180, 180, 241])),
        ],
    )?;
    let conversions = dir.join("conversions.parquet");
    write_columns(
        &conversions,
        vec![
            ("click_id", Arc::new(StringArray::from(vec!["c1"]))),
            ("event_timestamp", ints(&[240])),
        ],
    )?;
    let log_path = dir.join("predictions.jsonl");
    std::fs::write(
        &log_path,
        concat!(
            r#"{"requestId":"r1","model":"ctr","version":"v2","score":0.25,"categorical":[],"numeric":[],"timestampMs":150000}"#,
            "\n",
            r#"{"requestId":"r3","model":"ctr","version":"v1","score":0.5,"categorical":[],"numeric":[],"timestampMs":120000}"#,
            "\n",
        ),
    )?;
    let joined = dir.join("joined.parquet");
    trainer(&[
        "build-dataset",
        "--view",
        &view_arg,
        "--impressions",
        &impressions.display().to_string(),
        "--clicks",
        &clicks.display().to_string(),
        "--conversions",
        &conversions.display().to_string(),
        "--prediction-log",
        &log_path.display().to_string(),
        "--click-window",
        "30s",
        "--conversion-window",
        "60s",
        "--out",
        &joined.display().to_string(),
    ])?;
    let batch = read_batches(&joined)?.remove(0);
    assert_eq!(
        batch.num_rows(),
        3,
        "a duplicate click does not duplicate its impression"
    );
    let bools = |v: [bool; 3]| v.map(FeatureValue::Bool);
    assert_eq!(
        table::values(&batch, &joined, "label_click")?,
        bools([true, false, false]),
        "r2's click is 1 s late"
    );
    assert_eq!(
        table::values(&batch, &joined, "label_convert")?,
        bools([true, false, false])
    );
    assert_eq!(
        table::values(&batch, &joined, "served_version")?,
        [
            FeatureValue::Str("v2".into()),
            FeatureValue::Null,
            FeatureValue::Str("v1".into()),
        ]
    );
    assert_eq!(
        table::values(&batch, &joined, "price")?[0],
        FeatureValue::Float(1.0)
    );

    // The TrainingJob step on the same impressions: train and eval sets by range, labeled by sample joining.
    let sets = dir.join("sets");
    let report = trainer(&[
        "training-set",
        "--view",
        &view_arg,
        "--events",
        &impressions.display().to_string(),
        "--label",
        "label_convert",
        "--clicks",
        &clicks.display().to_string(),
        "--conversions",
        &conversions.display().to_string(),
        "--click-window",
        "30s",
        "--conversion-window",
        "60s",
        "--train-range",
        "1970-01-01T00:01:40Z,1970-01-01T00:03:20Z",
        "--eval-range",
        "1970-01-01T00:03:20Z,1970-01-01T00:05:00Z",
        "--out-dir",
        &sets.display().to_string(),
        "--termination-log",
        &log,
    ])?;
    assert_eq!(
        (report["trainRows"].clone(), report["evalRows"].clone()),
        (json!(2), json!(1)),
        "{report}"
    );
    let train = sets.join("train.parquet");
    let batch = read_batches(&train)?.remove(0);
    assert_eq!(
        table::values(&batch, &train, "request_id")?,
        [
            FeatureValue::Str("r1".into()),
            FeatureValue::Str("r3".into())
        ]
    );
    assert_eq!(
        table::values(&batch, &train, "label_convert")?,
        [FeatureValue::Bool(true), FeatureValue::Bool(false)]
    );
    assert!(sets.join("schema.json").exists());
    // A label sample joining does not write is refused before anything is built.
    let refused = trainer(&[
        "training-set",
        "--view",
        &view_arg,
        "--events",
        &impressions.display().to_string(),
        "--label",
        "clicked",
        "--clicks",
        &clicks.display().to_string(),
        "--train-range",
        "1970-01-01T00:01:40Z,1970-01-01T00:03:20Z",
        "--eval-range",
        "1970-01-01T00:03:20Z,1970-01-01T00:05:00Z",
        "--out-dir",
        &dir.join("refused").display().to_string(),
        "--termination-log",
        &log,
    ])
    .err()
    .unwrap_or_default();
    assert!(refused.contains("not `clicked`"), "{refused}");
    Ok(())
}

#[tokio::test]
async fn bad_sources_fail_naming_the_file_and_column() -> TestResult {
    let dir = temp_dir("features-bad");
    let log = dir.join("termination.json").display().to_string();
    let cases: Vec<BadCase> = vec![
        (
            "missing.parquet",
            vec![
                ("user_id", ints(&[1])),
                ("event_timestamp", ints(&[1])),
                ("clicks", ints(&[1])),
                ("category", Arc::new(StringArray::from(vec!["a"]))),
            ],
            "column `price` is missing",
        ),
        (
            "wrongtype.parquet",
            vec![
                ("user_id", ints(&[1])),
                ("event_timestamp", ints(&[1])),
                ("price", Arc::new(StringArray::from(vec!["cheap"]))),
                ("clicks", ints(&[1])),
                ("category", Arc::new(StringArray::from(vec!["a"]))),
            ],
            "feature `price` (column `price`): is Float64 but got a string",
        ),
        (
            "badkey.parquet",
            vec![
                ("user_id", Arc::new(StringArray::from(vec!["u1"]))),
                ("event_timestamp", ints(&[1])),
                ("price", Arc::new(Float64Array::from(vec![1.0]))),
                ("clicks", ints(&[1])),
                ("category", Arc::new(StringArray::from(vec!["a"]))),
            ],
            "column `user_id` has type Utf8, expected Int64",
        ),
        (
            "empty.parquet",
            vec![
                ("user_id", ints(&[])),
                ("event_timestamp", ints(&[])),
                ("price", Arc::new(Float64Array::from(Vec::<f64>::new()))),
                ("clicks", ints(&[])),
                ("category", Arc::new(StringArray::from(Vec::<&str>::new()))),
            ],
            "holds no Parquet rows",
        ),
    ];
    for (file, columns, expected) in cases {
        let path = dir.join(file);
        write_columns(&path, columns)?;
        let view = write_view(&dir, &path, None, "1d", None);
        let error = trainer(&[
            "materialize",
            "--view",
            &view.display().to_string(),
            "--termination-log",
            &log,
        ])
        .err()
        .unwrap_or_default();
        assert!(
            error.contains(&path.display().to_string()) && error.contains(expected),
            "{file}: {error}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_shifted_feature_drifts_and_an_unchanged_one_does_not() -> TestResult {
    let dir = temp_dir("features-drift");
    let source = dir.join("source");
    let now = jiff::Timestamp::now().as_microsecond();
    let at = |offset: i64| jiff::Timestamp::from_microsecond(now + offset).map(|t| t.to_string());
    trainer(&[
        "generate-events",
        "--events",
        "20000",
        "--users",
        "500",
        "--labels",
        "10",
        "--span",
        "1d",
        "--end",
        &at(-2 * HOUR_US)?,
        "--out",
        &source.display().to_string(),
    ])?;
    std::fs::remove_file(source.join("labels.parquet"))?;
    let view = write_view(&dir, &source, None, "2d", None);
    let view_arg = view.display().to_string();
    let log = dir.join("termination.json").display().to_string();
    let baseline = trainer(&[
        "materialize",
        "--view",
        &view_arg,
        "--termination-log",
        &log,
    ])?;
    let since = baseline["report"]["watermark"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // The next day's prices are 40 higher; everything else is drawn the same way.
    trainer(&[
        "generate-events",
        "--events",
        "5000",
        "--users",
        "500",
        "--labels",
        "10",
        "--span",
        "1h",
        "--end",
        &at(0)?,
        "--seed",
        "11",
        "--price-shift",
        "40",
        "--out",
        &dir.join("shifted").display().to_string(),
    ])?;
    std::fs::rename(
        dir.join("shifted/events.parquet"),
        source.join("shifted.parquet"),
    )?;
    let next = trainer(&[
        "materialize",
        "--view",
        &view_arg,
        "--termination-log",
        &log,
        "--since",
        &since,
    ])?;
    let drift: HashMap<String, Value> = next["report"]["drift"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d["name"].as_str()?.to_owned(), d.clone())))
        .collect();
    assert_eq!(drift["price"]["drifted"], true, "{drift:?}");
    assert!(
        drift["price"]["psi"].as_f64().unwrap_or_default() > 0.25,
        "{drift:?}"
    );
    assert_eq!(drift["clicks"]["drifted"], false, "{drift:?}");
    assert_eq!(drift["category"]["drifted"], false, "{drift:?}");
    let message: Value = serde_json::from_str(&std::fs::read_to_string(&log)?)?;
    assert_eq!(message["drift"], next["report"]["drift"]);
    Ok(())
}

/// Events of the stream test: 3,000 events of 60 users over the last 50 minutes, each with an id.
fn stream_events() -> Vec<Value> {
    let now = jiff::Timestamp::now().as_second();
    (0..3000)
        .map(|i: i64| {
            let category = ["a", "b", "c"][(i % 3) as usize];
            json!({
                "event_id": format!("e{i}"),
                "user_id": i % 60,
                "event_timestamp": (now - 3000 + i) as f64,
                "price": (i % 13) as f64 + 0.5,
                "clicks": i % 3,
                "category": category,
            })
        })
        .collect()
}

#[tokio::test]
async fn ingestion_killed_mid_stream_loses_nothing_and_counts_nothing_twice() -> TestResult {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let dir = temp_dir("features-ingest");
    let redis = Redis::start(&dir).await?;
    let broker = Broker::start(&dir).await?;
    broker.create_topic_with_partitions("user-events", 2)?;
    let view = write_view(
        &dir,
        &dir.join("unused.parquet"),
        Some(redis.port),
        "1d",
        Some((&broker.address, "user-events")),
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .create()?;
    let events = stream_events();
    let malformed = [
        "not json".to_owned(),
        json!({"event_id": "m1", "price": 1.0, "event_timestamp": 1.0}).to_string(),
        json!({"event_id": "m2", "user_id": 1, "price": "cheap", "event_timestamp": 1.0})
            .to_string(),
        json!({"event_id": "m3", "user_id": 1, "price": 1.0}).to_string(),
    ];
    for (i, event) in events.iter().enumerate() {
        let payload = event.to_string();
        let key = event["user_id"].to_string();
        producer
            .send(
                FutureRecord::to("user-events").payload(&payload).key(&key),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        if i % 1000 == 500 {
            let bad = &malformed[i / 1000];
            producer
                .send(
                    FutureRecord::to("user-events").payload(bad).key("1"),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
    }
    producer
        .send(
            FutureRecord::to("user-events")
                .payload(&malformed[3])
                .key("1"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;

    let start = |name: &str| -> Result<(Process, u16), Box<dyn std::error::Error>> {
        let admin = free_port()?;
        let process = Process::spawn(
            name,
            Command::new(bin_dir().join("flywheel-serving"))
                .arg("ingest")
                .arg("--view")
                .arg(&view)
                .args([
                    "--batch-size",
                    "25",
                    "--admin-listen",
                    &format!("127.0.0.1:{admin}"),
                ]),
            &dir.join(format!("{name}.log")),
        )?;
        Ok((process, admin))
    };
    let ingested = |admin: u16| async move {
        let (_, text) = flywheel_e2e::http::http_get(admin, "/metrics")
            .await
            .map_err(|e| e.to_string())?;
        Ok::<f64, String>(
            metric(
                &text,
                "flywheel_ingest_events_total",
                &["outcome=\"ingested\""],
            )
            .unwrap_or(0.0),
        )
    };
    let (mut first, admin) = start("ingest-1")?;
    until(
        "the first consumer ingested some events",
        Duration::from_secs(60),
        || async move {
            match ingested(admin).await? {
                n if n >= 600.0 => Ok(()),
                n => Err(format!("{n} ingested")),
            }
        },
    )
    .await?;
    first.kill();
    let (_second, admin) = start("ingest-2")?;
    let total_events = events.len();
    let redis_ref = &redis;
    until(
        "every event is in the online store",
        Duration::from_secs(90),
        || async move {
            let mut total = 0usize;
            for user in 0..60 {
                let count = redis_ref
                    .command(&["zcard", &format!("test/users:{user}#events")])
                    .map_err(|e| e.to_string())?;
                total += count.trim().parse::<usize>().unwrap_or(0);
            }
            if total == total_events {
                Ok(())
            } else {
                Err(format!("{total} of {total_events}"))
            }
        },
    )
    .await?;
    until(
        "the last batch is written",
        Duration::from_secs(30),
        || async move {
            let (_, text) = flywheel_e2e::http::http_get(admin, "/metrics")
                .await
                .map_err(|e| e.to_string())?;
            let lag: f64 = text
                .lines()
                .filter(|l| l.starts_with("flywheel_ingest_lag{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            let batches = metric(&text, "flywheel_ingest_batches_total", &[]).unwrap_or(0.0);
            if batches > 0.0 && lag == 0.0 {
                Ok(())
            } else {
                Err(format!("lag {lag}, {batches} batches"))
            }
        },
    )
    .await?;

    // Each user's features equal those computed from exactly its events: none lost, none counted twice.
    for user in 0..60i64 {
        let mine: Vec<&Value> = events.iter().filter(|e| e["user_id"] == user).collect();
        let newest = mine
            .iter()
            .filter_map(|e| e["event_timestamp"].as_f64())
            .fold(f64::MIN, f64::max);
        let in_hour: Vec<&&Value> = mine
            .iter()
            .filter(|e| {
                e["event_timestamp"]
                    .as_f64()
                    .is_some_and(|t| t > newest - 3600.0)
            })
            .collect();
        let spend: f64 = in_hour.iter().filter_map(|e| e["price"].as_f64()).sum();
        let stored = hash(&redis, &format!("test/users:{user}"))?;
        assert_eq!(
            number(&stored, "events_1d"),
            mine.len() as f64,
            "user {user}: {stored:?}"
        );
        assert!(
            (number(&stored, "spend_1h") - spend).abs() < 1e-6,
            "user {user}: {stored:?} vs {spend}"
        );
        let last = mine
            .last()
            .and_then(|e| e["price"].as_f64())
            .unwrap_or(f64::NAN);
        assert_eq!(number(&stored, "price"), last, "user {user}");
    }

    // Malformed events went to the dead-letter topic with their reason (at least once: a replay may repeat one).
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&["user-events.dlq"])?;
    let mut reasons: BTreeMap<String, String> = BTreeMap::new();
    while reasons.len() < malformed.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        let reason = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "error"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        reasons.insert(payload, reason);
    }
    assert!(
        reasons[&malformed[0]].starts_with("not JSON"),
        "{reasons:?}"
    );
    assert_eq!(reasons[&malformed[1]], "`user_id`: missing join key");
    assert!(
        reasons[&malformed[2]].contains("(column `price`): Sum needs finite numbers, got a string"),
        "{reasons:?}"
    );
    assert_eq!(
        reasons[&malformed[3]],
        "`event_timestamp`: missing event time"
    );
    Ok(())
}
