//! Micro-batching: concurrent requests are scored together. A scorer thread takes whatever is queued when it
//! becomes free (up to `max_rows`), so batching adds no waiting when the server is idle and grows batches by
//! itself under load.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use flywheel_ml::train::EncodedDataset;
use tokio::sync::oneshot;

use crate::model::ServedModel;

struct Job {
    model: Arc<ServedModel>,
    data: EncodedDataset,
    reply: oneshot::Sender<Vec<f64>>,
}

#[derive(Clone)]
pub struct Batcher {
    queue: Sender<Job>,
}

#[derive(Debug, thiserror::Error)]
#[error("the scorer threads have stopped")]
pub struct ScorerGone;

impl Batcher {
    /// Starts `threads` scorer threads that merge queued requests into batches of at most `max_rows` rows.
    pub fn start(threads: usize, max_rows: usize) -> std::io::Result<Batcher> {
        let (queue, jobs) = crossbeam_channel::unbounded();
        for index in 0..threads.max(1) {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("scorer-{index}"))
                .spawn(move || score_forever(&jobs, max_rows))?;
        }
        Ok(Batcher { queue })
    }

    /// Scores `data` with `model` (the model the request was validated against).
    pub async fn score(
        &self,
        model: Arc<ServedModel>,
        data: EncodedDataset,
    ) -> Result<Vec<f64>, ScorerGone> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { model, data, reply })
            .map_err(|_| ScorerGone)?;
        answer.await.map_err(|_| ScorerGone)
    }
}

fn score_forever(jobs: &Receiver<Job>, max_rows: usize) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        let mut rows = batch[0].data.len();
        while rows < max_rows {
            match jobs.try_recv() {
                Ok(job) if Arc::ptr_eq(&job.model, &batch[0].model) => {
                    rows += job.data.len();
                    batch.push(job);
                }
                // A request for another model (a swap happened): it starts the next batch.
                Ok(job) => {
                    carried = Some(job);
                    break;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        score_batch(batch);
    }
}

fn score_batch(mut batch: Vec<Job>) {
    if batch.len() == 1 {
        let job = batch.remove(0);
        let scores = job.model.score(&job.data);
        let _ = job.reply.send(scores);
        return;
    }
    let first = &batch[0].data;
    let mut merged = EncodedDataset {
        fields: first.fields,
        numeric_width: first.numeric_width,
        ..EncodedDataset::default()
    };
    for job in &batch {
        merged.categorical.extend_from_slice(&job.data.categorical);
        merged.numeric.extend_from_slice(&job.data.numeric);
        merged.labels.extend_from_slice(&job.data.labels);
        merged.groups.extend_from_slice(&job.data.groups);
    }
    let scores = batch[0].model.score(&merged);
    let mut rest = scores.as_slice();
    for job in batch {
        let (mine, others) = rest.split_at(job.data.len().min(rest.len()));
        rest = others;
        // The caller may have gone (client disconnected); its scores are simply dropped.
        let _ = job.reply.send(mine.to_vec());
    }
}
