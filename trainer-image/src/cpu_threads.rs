//! How many threads burn's CPU kernels train with. burn-flex splits every matmul above a fixed size over the whole
//! rayon pool; for a narrow model the wake-ups cost more than the split saves (DeepFM with an MLP of 64-64 on two
//! cores: 450k samples/s on one thread, 350k on two) while a wide one gains (400-400: 77k on one, 99k on two).
//! No size rule fits every CPU, so the trainer times a few real training steps of the job's own model and batch
//! size with each candidate pool and trains with the fastest. The thread count never changes the result: the
//! split is over rows and columns of the output, not over the summed dimension.

use std::time::{Duration, Instant};

use flywheel_ml::model::ModelConfig;
use flywheel_ml::train::{EncodedDataset, TrainConfig, Trainer};

use crate::CpuBackend;

/// Steps each candidate runs before it is timed (first-touch allocations, caches).
const WARM_UP_STEPS: usize = 2;
const TIMED_STEPS: usize = 5;
/// A candidate stops warming up, and timing, once it spent this long on either (large models and batches: tuning
/// stays a small cost).
const TIME_PER_CANDIDATE: Duration = Duration::from_millis(400);

#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    #[error("cannot start a pool of {threads} CPU threads: {source}")]
    Pool {
        threads: usize,
        source: rayon::ThreadPoolBuildError,
    },
}

/// The chosen thread count and the median step time measured for each candidate.
pub struct Choice {
    pub threads: usize,
    pub step_seconds: Vec<(usize, f64)>,
}

/// Candidate pool sizes for `cores`: 1, 2, 4, … and `cores` itself.
pub fn candidates(cores: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n < cores)
        .collect();
    sizes.push(cores.max(1));
    sizes
}

/// Times `model`'s training step at `config`'s batch size in a pool of each candidate size and makes the fastest
/// the process's global pool. Must run before anything else uses rayon's global pool.
pub fn choose(
    model: &ModelConfig,
    config: &TrainConfig,
    cores: usize,
) -> Result<Choice, ThreadsError> {
    let mut step_seconds = Vec::new();
    let candidates = candidates(cores);
    // One core (a pod limited to a CPU or less) leaves nothing to choose, so nothing is measured.
    if candidates.len() > 1 {
        for threads in candidates {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|source| ThreadsError::Pool { threads, source })?;
            let seconds = pool.install(|| median_step_seconds(model, config));
            step_seconds.push((threads, seconds));
        }
    }
    let threads = step_seconds
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(1, |&(threads, _)| threads);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|source| ThreadsError::Pool { threads, source })?;
    Ok(Choice {
        threads,
        step_seconds,
    })
}

/// Median wall time of a training step on a synthetic batch (every example with its own embedding rows, as in a
/// shuffled batch of real data).
fn median_step_seconds(model: &ModelConfig, config: &TrainConfig) -> f64 {
    let batch = config.batch_size.max(1);
    let data = synthetic_batch(model, batch);
    let rows: Vec<usize> = (0..batch).collect();
    let mut trainer = Trainer::<CpuBackend>::new(model.clone(), config.clone(), Default::default());
    let warming = Instant::now();
    for _ in 0..WARM_UP_STEPS {
        trainer.train_step(&data, &rows);
        if warming.elapsed() > TIME_PER_CANDIDATE {
            break;
        }
    }
    let started = Instant::now();
    let mut times = Vec::with_capacity(TIMED_STEPS);
    while times.len() < TIMED_STEPS && (times.is_empty() || started.elapsed() < TIME_PER_CANDIDATE)
    {
        let step = Instant::now();
        trainer.train_step(&data, &rows);
        times.push(step.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn synthetic_batch(model: &ModelConfig, batch: usize) -> EncodedDataset {
    EncodedDataset {
        fields: model.fields,
        numeric_width: model.numeric,
        categorical: (0..batch * model.fields).map(|i| i as u64).collect(),
        numeric: (0..batch * model.numeric)
            .map(|i| (i % 17) as f32 / 17.0)
            .collect(),
        labels: (0..batch).map(|i| (i % 5 == 0) as u8 as f32).collect(),
        groups: vec![0; batch],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_double_up_to_the_core_count() {
        assert_eq!(candidates(1), vec![1]);
        assert_eq!(candidates(2), vec![1, 2]);
        assert_eq!(candidates(6), vec![1, 2, 4, 6]);
        assert_eq!(candidates(16), vec![1, 2, 4, 8, 16]);
    }
}
