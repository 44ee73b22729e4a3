//! The parameter-server topology as real processes on 127.0.0.1: 2 shards + 2 workers reach the AUC of a
//! single-process run; shards exit 0 when the workers are done; losing a shard fails the workers, and losing a
//! worker fails the shards, each with a message naming what was lost.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{auc, free_port, generate, log, s, spawn, train_args, wait};
use serde_json::Value;

fn scratch(name: &str) -> std::path::PathBuf {
    common::scratch("ps", name)
}

/// Waits for every worker (rank order) and requires each to succeed, showing a failed one's log.
fn workers_succeed(dir: &Path, workers: &mut [Child]) {
    for (rank, child) in workers.iter_mut().enumerate() {
        let status = wait(child, Duration::from_secs(240));
        assert!(
            status.success(),
            "worker {rank}: {}",
            log(dir, &format!("worker{rank}"))
        );
    }
}

fn shard(dir: &Path, index: usize, port: u16, extra: &[&str]) -> Child {
    let mut args: Vec<String> = [
        "ps",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--shard",
        &index.to_string(),
        "--workers",
        "2",
        "--embedding-dim",
        "4",
        "--seed",
        "3",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    spawn(&args, &dir.join(format!("ps{index}.log")))
}

fn worker(dir: &Path, rank: usize, ports: &[u16]) -> Child {
    worker_with(dir, rank, ports, &[])
}

fn worker_with(dir: &Path, rank: usize, ports: &[u16], extra: &[&str]) -> Child {
    let mut args = train_args(dir, &format!("worker{rank}"));
    args.extend(extra.iter().map(|a| a.to_string()));
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    args.extend([
        "--ps".to_owned(),
        addrs.join(","),
        "--rank".into(),
        rank.to_string(),
        "--workers".into(),
        "2".into(),
    ]);
    spawn(&args, &dir.join(format!("worker{rank}.log")))
}

#[test]
fn two_shards_and_two_workers_match_a_single_worker() {
    let dir = scratch("match");
    generate(&dir, "40000");
    common::train_alone(&dir, "single");

    let ports = [free_port(), free_port()];
    let mut shards = [shard(&dir, 0, ports[0], &[]), shard(&dir, 1, ports[1], &[])];
    let mut workers = [worker(&dir, 0, &ports), worker(&dir, 1, &ports)];
    workers_succeed(&dir, &mut workers);
    for (index, child) in shards.iter_mut().enumerate() {
        let status = wait(child, Duration::from_secs(30));
        assert!(
            status.success(),
            "shards exit 0 once the workers are done: {}",
            log(&dir, &format!("ps{index}"))
        );
    }
    let (single_auc, ps_auc) = (auc(&dir, "single"), auc(&dir, "worker0"));
    eprintln!("single AUC {single_auc:.4}, 2 PS + 2 workers AUC {ps_auc:.4}");
    assert!(
        (single_auc - ps_auc).abs() <= 0.01,
        "single {single_auc} vs PS {ps_auc}"
    );
    assert!(ps_auc > 0.6);
}

#[test]
fn losing_a_shard_fails_the_workers_with_its_address() {
    let dir = scratch("lost-shard");
    generate(&dir, "200000");
    let ports = [free_port(), free_port()];
    // A worker waiting at shard 0's dense barrier for a peer that died on the lost shard learns of it through
    // shard 0's worker timeout, so keep that short.
    let timeout = ["--worker-timeout", "5s"];
    let mut shards = [
        shard(&dir, 0, ports[0], &timeout),
        shard(&dir, 1, ports[1], &timeout),
    ];
    let mut first = worker(&dir, 0, &ports);
    let mut second = worker(&dir, 1, &ports);
    // Let both workers start training (past their connection retries), then lose shard 1.
    let started = Instant::now();
    let training = |name| log(&dir, name).contains("\"event\":\"progress\"");
    while !(training("worker0") && training("worker1"))
        && started.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = shards[1].kill();
    assert!(!wait(&mut first, Duration::from_secs(90)).success());
    assert!(!wait(&mut second, Duration::from_secs(90)).success());
    // Whichever worker talked to the lost shard names it (the other may fail first at the barrier).
    let lost = format!("shard 1 (127.0.0.1:{})", ports[1]);
    let logs = [log(&dir, "worker0"), log(&dir, "worker1")];
    assert!(logs.iter().any(|l| l.contains(&lost)), "{logs:?}");
    let _ = shards[0].kill();
}

#[test]
fn losing_a_worker_fails_the_shards() {
    let dir = scratch("lost-worker");
    generate(&dir, "200000");
    let ports = [free_port(), free_port()];
    let mut shards = [
        shard(&dir, 0, ports[0], &["--worker-timeout", "3s"]),
        shard(&dir, 1, ports[1], &["--worker-timeout", "3s"]),
    ];
    let mut first = worker(&dir, 0, &ports);
    let mut second = worker(&dir, 1, &ports);
    let started = Instant::now();
    while !log(&dir, "worker1").contains("\"event\":\"progress\"")
        && started.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = second.kill();
    let _ = second.wait();
    for (index, child) in shards.iter_mut().enumerate() {
        let status = wait(child, Duration::from_secs(60));
        assert!(
            !status.success(),
            "shard {index} must fail when a worker is lost"
        );
        assert!(
            log(&dir, &format!("ps{index}")).contains("worker 1 sent nothing for 3 s"),
            "{}",
            log(&dir, &format!("ps{index}"))
        );
    }
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn a_killed_gang_restarts_from_its_checkpoints() {
    let dir = scratch("restart");
    generate(&dir, "40000");
    common::train_alone(&dir, "single");
    let checkpoints = s(&dir.join("checkpoints"));
    let shard_args = ["--checkpoint-dir", checkpoints.as_str()];
    let worker_args = [
        "--checkpoint-dir",
        checkpoints.as_str(),
        "--checkpoint-every",
        "30",
    ];
    let ports = [free_port(), free_port()];
    let mut gang = vec![
        shard(&dir, 0, ports[0], &shard_args),
        shard(&dir, 1, ports[1], &shard_args),
        worker_with(&dir, 0, &ports, &worker_args),
        worker_with(&dir, 1, &ports, &worker_args),
    ];
    let started = Instant::now();
    while !log(&dir, "worker0").contains("\"event\":\"checkpoint\"")
        && started.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for child in &mut gang {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        std::path::Path::new(&checkpoints)
            .join("ps-shard-0.fwt")
            .exists()
    );

    let ports = [free_port(), free_port()];
    let mut shards = [
        shard(&dir, 0, ports[0], &shard_args),
        shard(&dir, 1, ports[1], &shard_args),
    ];
    let mut workers = [
        worker_with(&dir, 0, &ports, &worker_args),
        worker_with(&dir, 1, &ports, &worker_args),
    ];
    workers_succeed(&dir, &mut workers);
    for child in &mut shards {
        assert!(wait(child, Duration::from_secs(30)).success());
    }
    let resumed = log(&dir, "worker0");
    let event: Value = resumed
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|event| event["event"] == "resumed")
        .unwrap_or_else(|| panic!("the restarted chief did not resume: {resumed}"));
    assert!(event["step"].as_u64().unwrap_or(0) >= 30, "{event}");
    let (single_auc, restarted_auc) = (auc(&dir, "single"), auc(&dir, "worker0"));
    eprintln!("single AUC {single_auc:.4}, restarted PS AUC {restarted_auc:.4}");
    assert!(
        (single_auc - restarted_auc).abs() <= 0.01,
        "single {single_auc} vs restarted {restarted_auc}"
    );
}

/// The loss of the first step `name` reported.
fn first_loss(dir: &Path, name: &str) -> f64 {
    common::event(dir, name, "progress")
        .and_then(|progress| progress["loss"].as_f64())
        .unwrap_or_else(|| panic!("{name} reported no progress: {}", log(dir, name)))
}

/// A gang trains on from an earlier model: the shards load their share of its rows, the workers its dense
/// weights, so the first step already has the trained model's loss, and the new model records its parent.
#[test]
fn a_warm_started_gang_continues_from_the_earlier_model() {
    let dir = scratch("warm");
    generate(&dir, "40000");
    common::train_alone(&dir, "base");
    let artifact = s(&dir.join("base/model.fwm"));
    let digest = common::result(&dir, "base")["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let warm = [
        "--warm-start",
        artifact.as_str(),
        "--warm-start-sha256",
        digest.as_str(),
    ];
    let shard_warm = [&warm[..], &["--shards", "2"]].concat();
    let ports = [free_port(), free_port()];
    let mut shards = [
        shard(&dir, 0, ports[0], &shard_warm),
        shard(&dir, 1, ports[1], &shard_warm),
    ];
    let progress = ["--progress-every", "1"];
    let extra = [&warm[..], &progress[..]].concat();
    let mut workers = [
        worker_with(&dir, 0, &ports, &extra),
        worker_with(&dir, 1, &ports, &extra),
    ];
    workers_succeed(&dir, &mut workers);
    for (index, child) in shards.iter_mut().enumerate() {
        let status = wait(child, Duration::from_secs(60));
        assert!(
            status.success(),
            "shard {index}: {}",
            log(&dir, &format!("ps{index}"))
        );
        let loaded = common::event(&dir, &format!("ps{index}"), "warmStart")
            .and_then(|event| event["rows"].as_u64())
            .unwrap_or(0);
        assert!(
            loaded > 0,
            "shard {index} loaded no rows: {}",
            log(&dir, &format!("ps{index}"))
        );
    }
    let model = std::fs::read(dir.join("worker0/model.fwm")).unwrap_or_default();
    let saved = flywheel_ml::artifact::decode::<burn::backend::Flex>(&model, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        saved.card.lineage.warm_start.as_deref(),
        Some(digest.as_str())
    );

    // The same gang from scratch starts at the untrained loss.
    let cold = scratch("cold");
    generate(&cold, "40000");
    let ports = [free_port(), free_port()];
    let mut shards = [
        shard(&cold, 0, ports[0], &[]),
        shard(&cold, 1, ports[1], &[]),
    ];
    let mut workers = [
        worker_with(&cold, 0, &ports, &progress),
        worker_with(&cold, 1, &ports, &progress),
    ];
    for child in workers.iter_mut().chain(shards.iter_mut()) {
        assert!(wait(child, Duration::from_secs(240)).success());
    }
    // Workers run asynchronously, so on a loaded machine one may take many steps before the other takes its
    // first. Whichever pulled first saw the untrained model, and its first loss is the larger.
    let warm_loss = first_loss(&dir, "worker0");
    let cold_loss = first_loss(&cold, "worker0").max(first_loss(&cold, "worker1"));
    eprintln!("first-step loss: warm {warm_loss:.4}, cold {cold_loss:.4}");
    // A fresh model starts at the training set's click rate: its first loss is the labels' entropy (≈ 0.36 at
    // this data's ~12% clicks), not the 0.69 of predicting 0.5 everywhere. The earlier model does better still.
    assert!(cold_loss < 0.45, "cold start at {cold_loss}");
    assert!(
        warm_loss < cold_loss - 0.05,
        "warm {warm_loss} vs cold {cold_loss}"
    );
}
