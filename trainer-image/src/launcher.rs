//! Local ranks: a data-parallel worker given several devices (a pod with N GPUs) trains with one process per
//! device, as torchrun's `--nproc-per-node` does. The launcher starts N copies of this binary, with the same
//! flags plus the overrides of [`local_rank_flags`]: global rank `rank × N + i` of `workers × N` ranks, device
//! `i`. It then waits for them; the first to fail takes the others down and fails the launcher, naming it, so
//! the whole-gang restart the operator makes covers every rank.

#![allow(
    unsafe_code,
    reason = "a rank's parent-death signal is set with prctl before exec"
)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail};

/// How often the launcher looks at its ranks.
const POLL: Duration = Duration::from_millis(50);

/// The flags that turn a copy of the launcher's command line into local rank `local` of `local_ranks` on the
/// worker `rank` of `workers`: later flags override earlier ones. Only local rank 0 writes the termination
/// message, so global rank 0's result is what the operator reads.
pub fn local_rank_flags(
    rank: u32,
    workers: u32,
    local_ranks: u32,
    local: u32,
    cuda: bool,
    termination_log: &Path,
) -> Vec<String> {
    let device = if cuda {
        format!("cuda:{local}")
    } else {
        "cpu".to_owned()
    };
    let termination_log = if local == 0 {
        termination_log.display().to_string()
    } else {
        "/dev/null".to_owned()
    };
    [
        "--rank".to_owned(),
        (rank * local_ranks + local).to_string(),
        "--workers".to_owned(),
        (workers * local_ranks).to_string(),
        "--local-ranks".to_owned(),
        "1".to_owned(),
        "--device".to_owned(),
        device,
        "--termination-log".to_owned(),
        termination_log,
    ]
    .into()
}

/// Starts one process per entry of `flags` (this binary, its own arguments, then the entry) and waits for all;
/// fails with the first that fails, after killing the others.
pub fn run_local_ranks(flags: Vec<Vec<String>>) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("finding this binary to start the local ranks")?;
    let arguments: Vec<_> = std::env::args_os().skip(1).collect();
    let mut ranks: Vec<(String, Child)> = Vec::with_capacity(flags.len());
    for extra in flags {
        let name = format!("rank {}", extra.get(1).map_or("?", String::as_str));
        let mut command = Command::new(&binary);
        command.args(&arguments).args(&extra);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe and only sets this child's parent-death signal, so a killed
            // launcher (a deleted pod) never leaves ranks behind.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                    Ok(())
                });
            }
        }
        match command.spawn() {
            Ok(child) => ranks.push((name, child)),
            Err(err) => {
                stop(&mut ranks);
                return Err(err).with_context(|| format!("starting local {name}"));
            }
        }
    }
    let mut running = ranks.len();
    let mut finished = vec![false; ranks.len()];
    while running > 0 {
        for (index, (name, child)) in ranks.iter_mut().enumerate() {
            if finished[index] {
                continue;
            }
            let status = match child.try_wait() {
                Ok(status) => status,
                Err(err) => {
                    let message = format!("waiting for local {name}: {err}");
                    stop(&mut ranks);
                    bail!(message);
                }
            };
            if let Some(status) = status {
                if !status.success() {
                    let message =
                        format!("local {name} failed ({status}); stopped the other ranks");
                    stop(&mut ranks);
                    bail!(message);
                }
                finished[index] = true;
                running -= 1;
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

fn stop(ranks: &mut [(String, Child)]) {
    for (_, child) in ranks {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ranks_number_the_gang_worker_major_and_take_one_device_each() {
        let log = Path::new("/dev/termination-log");
        let flags: Vec<Vec<String>> = (0..4)
            .map(|local| local_rank_flags(1, 2, 4, local, true, log))
            .collect();
        let value = |flags: &[String], flag: &str| {
            let at = flags.iter().position(|f| f == flag);
            at.and_then(|at| flags.get(at + 1)).cloned()
        };
        let ranks: Vec<_> = flags.iter().filter_map(|f| value(f, "--rank")).collect();
        assert_eq!(ranks, ["4", "5", "6", "7"]);
        assert!(
            flags
                .iter()
                .all(|f| value(f, "--workers").as_deref() == Some("8"))
        );
        assert!(
            flags
                .iter()
                .all(|f| value(f, "--local-ranks").as_deref() == Some("1"))
        );
        assert_eq!(value(&flags[2], "--device").as_deref(), Some("cuda:2"));
        assert_eq!(
            value(&flags[0], "--termination-log").as_deref(),
            Some("/dev/termination-log")
        );
        assert_eq!(
            value(&flags[3], "--termination-log").as_deref(),
            Some("/dev/null")
        );
        let cpu = local_rank_flags(0, 1, 2, 1, false, log);
        assert_eq!(value(&cpu, "--device").as_deref(), Some("cpu"));
    }
}
