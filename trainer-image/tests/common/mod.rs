//! Helpers of the multi-process tests: the trainer binary as real processes on 127.0.0.1, their logs and
//! results.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_flywheel-trainer");

/// A fresh directory for one test.
pub fn scratch(topology: &str, name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("flywheel-{topology}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("{err}"));
    dir
}

pub fn s(path: &Path) -> String {
    path.display().to_string()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|err| panic!("{err}"))
}

/// Generated data of `rows` rows (300 users, 80 items, 2000-row tables) in `dir`.
pub fn generate(dir: &Path, rows: &str) {
    let out = Command::new(BIN)
        .args([
            "generate",
            "--rows",
            rows,
            "--users",
            "300",
            "--items",
            "80",
            "--buckets",
            "2000",
            "--out",
            &s(dir),
        ])
        .output()
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `train` on the generated data of `dir`, writing to `dir/name` and `dir/name.result`.
pub fn train_args(dir: &Path, name: &str) -> Vec<String> {
    [
        "train",
        "--train",
        &s(&dir.join("train.parquet")),
        "--eval",
        &s(&dir.join("eval.parquet")),
        "--schema",
        &s(&dir.join("schema.json")),
        "--output",
        &s(&dir.join(name)),
        "--termination-log",
        &s(&dir.join(format!("{name}.result"))),
        "--hidden",
        "16",
        "--embedding-dim",
        "4",
        "--batch-size",
        "256",
        "--epochs",
        "2",
        "--seed",
        "3",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Trains one process on the generated data of `dir` into `dir/name` (see [`train_args`]), which must succeed.
pub fn train_alone(dir: &Path, name: &str) {
    let out = Command::new(BIN)
        .args(train_args(dir, name))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the trainer with `args`, stdout and stderr into `log`.
pub fn spawn(args: &[String], log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap_or_else(|err| panic!("{err}"));
    let err = file.try_clone().unwrap_or_else(|err| panic!("{err}"));
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"))
}

pub fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `dir/name.log` holds so far.
pub fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Waits until `dir/name.log` contains `needle`.
pub fn wait_for_log(dir: &Path, name: &str, needle: &str, limit: Duration) {
    let started = Instant::now();
    while !log(dir, name).contains(needle) {
        assert!(
            started.elapsed() < limit,
            "{name} never logged {needle}: {}",
            log(dir, name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn result(dir: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(format!("{name}.result"))).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

pub fn auc(dir: &Path, name: &str) -> f64 {
    let result = result(dir, name);
    result["metrics"]["auc"]
        .as_f64()
        .unwrap_or_else(|| panic!("no AUC in {name}: {result}"))
}

/// The first JSON event in `dir/name.log` of kind `kind`.
pub fn event(dir: &Path, name: &str, kind: &str) -> Option<Value> {
    log(dir, name)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|event| event["event"] == kind)
}
