//! The synchronous data-parallel topology as real processes on 127.0.0.1: 2 ranks reach the AUC of a
//! single-process run with the same global batch, whether started as two workers or as one worker with two
//! local ranks (one process per device); losing a rank fails the chief with a message naming it, and the
//! restarted gang resumes from the chief's checkpoint.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::{
    auc, event, free_port, generate, log, result, s, spawn, train_args, wait, wait_for_log,
};

/// Member `rank` of a gang of `workers` whose chief listens on `port`, logging to `dir/name.log`.
fn member(dir: &Path, name: &str, port: u16, rank: usize, workers: usize, extra: &[&str]) -> Child {
    let mut args = train_args(dir, name);
    let chief = format!("127.0.0.1:{port}");
    args.extend(
        [
            "--data-parallel",
            &chief,
            "--listen",
            &chief,
            "--rank",
            &rank.to_string(),
            "--workers",
            &workers.to_string(),
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string()),
    );
    spawn(&args, &dir.join(format!("{name}.log")))
}

fn rank(dir: &Path, rank: usize, port: u16, extra: &[&str]) -> Child {
    member(dir, &format!("rank{rank}"), port, rank, 2, extra)
}

fn single(dir: &Path) -> f64 {
    common::train_alone(dir, "single");
    auc(dir, "single")
}

fn succeeds(dir: &Path, gang: &mut [Child]) {
    for (index, child) in gang.iter_mut().enumerate() {
        let status = wait(child, Duration::from_secs(240));
        assert!(
            status.success(),
            "rank {index}: {}",
            log(dir, &format!("rank{index}"))
        );
    }
}

#[test]
fn two_ranks_match_a_single_worker() {
    let dir = common::scratch("dp", "match");
    generate(&dir, "40000");
    let single_auc = single(&dir);
    let port = free_port();
    let mut gang = [rank(&dir, 0, port, &[]), rank(&dir, 1, port, &[])];
    succeeds(&dir, &mut gang);
    let parallel_auc = auc(&dir, "rank0");
    eprintln!("single AUC {single_auc:.5}, 2-rank data-parallel AUC {parallel_auc:.5}");
    assert!(
        (single_auc - parallel_auc).abs() <= 0.01,
        "single {single_auc} vs data-parallel {parallel_auc}"
    );
    let chief = result(&dir, "rank0");
    assert_eq!(chief["workers"], 2, "{chief}");
    assert_eq!(result(&dir, "rank1")["event"], "done");
    assert_eq!(
        chief["steps"],
        result(&dir, "single")["steps"],
        "the gang takes the single worker's global batches"
    );
}

#[test]
fn one_worker_with_two_local_ranks_trains_like_two_workers() {
    let dir = common::scratch("dp", "local");
    generate(&dir, "40000");
    let single_auc = single(&dir);
    let mut launcher = member(&dir, "local", free_port(), 0, 1, &["--local-ranks", "2"]);
    let status = wait(&mut launcher, Duration::from_secs(240));
    assert!(status.success(), "{}", log(&dir, "local"));
    let chief = result(&dir, "local");
    assert_eq!(chief["workers"], 2, "two ranks in the gang: {chief}");
    assert_eq!(chief["steps"], result(&dir, "single")["steps"]);
    let ranks: Vec<u64> = log(&dir, "local")
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["event"] == "done")
        .filter_map(|e| e["rank"].as_u64())
        .collect();
    assert!(ranks.contains(&0) && ranks.contains(&1), "{ranks:?}");
    let local_auc = auc(&dir, "local");
    eprintln!("single AUC {single_auc:.5}, 2 local ranks AUC {local_auc:.5}");
    assert!((single_auc - local_auc).abs() <= 0.01);
}

/// The first local rank to fail takes the others down at once: here rank 0 cannot listen (its port is taken),
/// and rank 1, which would wait a minute for it, is stopped with it.
#[test]
fn a_failing_local_rank_stops_its_siblings_and_fails_the_worker() {
    let dir = common::scratch("dp", "local-fail");
    generate(&dir, "2000");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = taken
        .local_addr()
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    let mut launcher = member(
        &dir,
        "local",
        port,
        0,
        1,
        &["--local-ranks", "2", "--connect-timeout", "60s"],
    );
    let status = wait(&mut launcher, Duration::from_secs(50));
    assert!(!status.success());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the launcher waited for the rank that could still run"
    );
    let message = log(&dir, "local");
    assert!(
        message.contains("local rank 0 failed") && message.contains("stopped the other ranks"),
        "{message}"
    );
    drop(taken);
}

#[test]
fn a_lost_rank_fails_the_gang_which_resumes_from_the_checkpoint() {
    let dir = common::scratch("dp", "lost");
    generate(&dir, "40000");
    let single_auc = single(&dir);
    let checkpoints = s(&dir.join("checkpoints"));
    let extra = [
        "--checkpoint-dir",
        checkpoints.as_str(),
        "--checkpoint-every",
        "20",
        "--worker-timeout",
        "3s",
        "--progress-every",
        "1",
    ];
    let port = free_port();
    let mut chief = rank(&dir, 0, port, &extra);
    let mut peer = rank(&dir, 1, port, &extra);
    wait_for_log(
        &dir,
        "rank0",
        "\"event\":\"checkpoint\"",
        Duration::from_secs(120),
    );
    let _ = peer.kill();
    let _ = peer.wait();
    let status = wait(&mut chief, Duration::from_secs(60));
    assert!(!status.success(), "the chief must fail when a rank is lost");
    let message = log(&dir, "rank0");
    assert!(
        message.contains("rank(s) [1] sent no gradients") && message.contains("a worker was lost"),
        "{message}"
    );

    let port = free_port();
    let mut gang = [rank(&dir, 0, port, &extra), rank(&dir, 1, port, &extra)];
    succeeds(&dir, &mut gang);
    for name in ["rank0", "rank1"] {
        let resumed = event(&dir, name, "resumed")
            .unwrap_or_else(|| panic!("{name} did not resume: {}", log(&dir, name)));
        assert!(resumed["step"].as_u64().unwrap_or(0) >= 20, "{resumed}");
    }
    let restarted_auc = auc(&dir, "rank0");
    eprintln!("single AUC {single_auc:.5}, restarted data-parallel AUC {restarted_auc:.5}");
    assert!((single_auc - restarted_auc).abs() <= 0.01);
}

#[test]
fn a_rank_without_its_chief_fails_naming_the_address() {
    let dir = common::scratch("dp", "no-chief");
    generate(&dir, "2000");
    let port = free_port();
    let mut peer = rank(&dir, 1, port, &["--connect-timeout", "1s"]);
    let status = wait(&mut peer, Duration::from_secs(60));
    assert!(!status.success());
    let message = log(&dir, "rank1");
    assert!(
        message.contains(&format!(
            "data-parallel chief at 127.0.0.1:{port} is unreachable"
        )),
        "{message}"
    );
}
