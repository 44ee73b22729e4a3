//! Synchronous data-parallel training (`train --data-parallel CHIEF`): every worker holds a full replica and
//! differentiates its share of each global batch; the chief (rank 0) serves a gRPC collective that combines
//! all ranks' gradients ([`StepGradients::combine`]) and answers every rank with the same result, so all
//! replicas apply the same update. Dense gradients travel whole, embedding gradients only for touched rows.
//!
//! Why not `burn-collective` 0.21 (the only release, pinned to burn 0.21): its multi-node all-reduce hangs on
//! the second call of a registration (the global sync clears a copy of its peer list), its global ring refuses
//! tensors smaller than the peer count, and a lost peer panics inside its websocket layer instead of failing
//! with an error. A training step needs repeated all-reduces and a lost worker must fail cleanly, so the
//! exchange is this small service on the tonic stack the parameter server already uses.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flywheel_ml::reduce::{GradientReducer, StepGradients};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{Notify, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::gang_auth::{AttachToken, RequireToken};
use crate::ps::MAX_MESSAGE;

pub mod proto {
    tonic::include_proto!("flywheel.collective.v1");
}

use proto::collective_client::CollectiveClient;
use proto::collective_server::{Collective as CollectiveService, CollectiveServer};
use proto::{Contribution, FinishRequest, FinishResponse, Gradients, Reduced};

#[derive(Clone, Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank} is outside the gang's 0..{workers} ranks")]
    UnknownRank { rank: u32, workers: u32 },
    #[error(
        "rank {rank} sent step {step} but the gang is at step {expected}: the workers are out of step"
    )]
    OutOfStep { rank: u32, step: u64, expected: u64 },
    #[error("rank {rank} sent malformed gradients for step {step}: {reason}")]
    Malformed {
        rank: u32,
        step: u64,
        reason: String,
    },
    #[error(
        "rank(s) {missing:?} sent no gradients for step {step} within {seconds} s: a worker was lost"
    )]
    WorkerLost {
        missing: Vec<u32>,
        step: u64,
        seconds: u64,
    },
    #[error("the data-parallel chief at {addr} is unreachable after {seconds} s: {message}")]
    Unreachable {
        addr: String,
        seconds: u64,
        message: String,
    },
    #[error("the data-parallel chief at {addr} failed step {step}: {message}")]
    Call {
        addr: String,
        step: u64,
        message: String,
    },
    #[error("cannot start the gRPC runtime: {0}")]
    Runtime(String),
}

impl From<CollectiveError> for Status {
    fn from(err: CollectiveError) -> Self {
        let message = err.to_string();
        match err {
            CollectiveError::UnknownRank { .. } | CollectiveError::Malformed { .. } => {
                Status::invalid_argument(message)
            }
            CollectiveError::OutOfStep { .. } => Status::failed_precondition(message),
            CollectiveError::WorkerLost { .. } => Status::aborted(message),
            _ => Status::internal(message),
        }
    }
}

/// The chief's side: collects one contribution per rank for the current step, then answers all of them.
pub struct Collective {
    workers: u32,
    dense_len: usize,
    factor_dim: usize,
    timeout: Duration,
    round: Mutex<Round>,
    finished: Mutex<BTreeSet<u32>>,
    finished_changed: Notify,
}

struct Round {
    step: u64,
    parts: Vec<Option<StepGradients>>,
    waiters: Vec<oneshot::Sender<Arc<StepGradients>>>,
    /// Once a step failed the gang is broken for good: every later call gets the same error.
    failure: Option<CollectiveError>,
}

impl Collective {
    /// A collective of `workers` ranks starting at `first_step` (a resumed gang starts at its checkpoint's
    /// step); a step that lacks a rank's contribution for `timeout` fails the gang.
    pub fn new(
        workers: u32,
        first_step: u64,
        dense_len: usize,
        factor_dim: usize,
        timeout: Duration,
    ) -> Self {
        Collective {
            workers,
            dense_len,
            factor_dim,
            timeout,
            round: Mutex::new(Round {
                step: first_step,
                parts: vec![None; workers as usize],
                waiters: Vec::new(),
                failure: None,
            }),
            finished: Mutex::new(BTreeSet::new()),
            finished_changed: Notify::new(),
        }
    }

    /// `rank`'s gradients for `step`; resolves to the combination over all ranks once every rank sent its own.
    pub async fn contribute(
        &self,
        rank: u32,
        step: u64,
        gradients: StepGradients,
    ) -> Result<Arc<StepGradients>, CollectiveError> {
        self.check(rank, step, &gradients)?;
        let mut reduced = {
            let mut round = lock(&self.round);
            if let Some(failure) = &round.failure {
                return Err(failure.clone());
            }
            if step != round.step || round.parts[rank as usize].is_some() {
                return Err(CollectiveError::OutOfStep {
                    rank,
                    step,
                    expected: round.step,
                });
            }
            round.parts[rank as usize] = Some(gradients);
            let (sender, receiver) = oneshot::channel();
            round.waiters.push(sender);
            if round.parts.iter().all(Option::is_some) {
                let parts: Vec<StepGradients> =
                    round.parts.iter_mut().filter_map(Option::take).collect();
                let combined = Arc::new(StepGradients::combine(&parts));
                for waiter in round.waiters.drain(..) {
                    let _ = waiter.send(combined.clone());
                }
                round.step += 1;
            }
            receiver
        };
        if let Ok(Ok(result)) = tokio::time::timeout(self.timeout, &mut reduced).await {
            return Ok(result);
        }
        if let Ok(result) = reduced.try_recv() {
            return Ok(result);
        }
        let mut round = lock(&self.round);
        let missing = round
            .parts
            .iter()
            .enumerate()
            .filter(|(_, part)| part.is_none())
            .map(|(rank, _)| rank as u32)
            .collect();
        let failure = round
            .failure
            .get_or_insert(CollectiveError::WorkerLost {
                missing,
                step,
                seconds: self.timeout.as_secs(),
            })
            .clone();
        // Dropping the other waiters' senders fails their calls too.
        round.waiters.clear();
        Err(failure)
    }

    fn check(
        &self,
        rank: u32,
        step: u64,
        gradients: &StepGradients,
    ) -> Result<(), CollectiveError> {
        if rank >= self.workers {
            return Err(CollectiveError::UnknownRank {
                rank,
                workers: self.workers,
            });
        }
        let malformed = |reason: String| CollectiveError::Malformed { rank, step, reason };
        if gradients.dense.len() != self.dense_len {
            return Err(malformed(format!(
                "{} dense gradients for a model of {} parameters",
                gradients.dense.len(),
                self.dense_len
            )));
        }
        if gradients.first_order.len() != gradients.keys.len() {
            return Err(malformed(format!(
                "{} first-order gradients for {} keys",
                gradients.first_order.len(),
                gradients.keys.len()
            )));
        }
        if gradients.factors.len() != gradients.keys.len() * self.factor_dim {
            return Err(malformed(format!(
                "{} factor gradients for {} keys of dimension {}",
                gradients.factors.len(),
                gradients.keys.len(),
                self.factor_dim
            )));
        }
        if gradients.dense.iter().any(|g| !g.is_finite()) {
            return Err(malformed("non-finite dense gradient".into()));
        }
        Ok(())
    }

    pub fn finish(&self, rank: u32) {
        lock(&self.finished).insert(rank);
        self.finished_changed.notify_waiters();
    }

    /// Waits until every rank but the chief reported its last step, or `patience` runs out; returns the ranks
    /// still missing.
    pub async fn wait_for_peers(&self, patience: Duration) -> Vec<u32> {
        let deadline = Instant::now() + patience;
        loop {
            let notified = self.finished_changed.notified();
            let missing: Vec<u32> = {
                let finished = lock(&self.finished);
                (1..self.workers)
                    .filter(|r| !finished.contains(r))
                    .collect()
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if missing.is_empty() || left.is_zero() {
                return missing;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn to_proto(gradients: &StepGradients) -> Gradients {
    Gradients {
        examples: gradients.examples as u64,
        dense: gradients.dense.clone(),
        keys: gradients.keys.clone(),
        first_order: gradients.first_order.clone(),
        factors: gradients.factors.clone(),
    }
}

fn from_proto(gradients: Gradients) -> StepGradients {
    StepGradients {
        examples: gradients.examples as usize,
        dense: gradients.dense,
        keys: gradients.keys,
        first_order: gradients.first_order,
        factors: gradients.factors,
    }
}

struct Service(Arc<Collective>);

#[tonic::async_trait]
impl CollectiveService for Service {
    async fn all_reduce(
        &self,
        request: Request<Contribution>,
    ) -> Result<Response<Reduced>, Status> {
        let contribution = request.into_inner();
        let gradients = from_proto(contribution.gradients.unwrap_or_default());
        let reduced = self
            .0
            .contribute(contribution.rank, contribution.step, gradients)
            .await?;
        Ok(Response::new(Reduced {
            gradients: Some(to_proto(&reduced)),
        }))
    }

    async fn finish(
        &self,
        request: Request<FinishRequest>,
    ) -> Result<Response<FinishResponse>, Status> {
        self.0.finish(request.into_inner().rank);
        Ok(Response::new(FinishResponse {}))
    }
}

/// Serves `collective` on `listener` until the runtime stops; with a gang `token`, only to callers holding it.
pub fn spawn_server(
    runtime: &Runtime,
    collective: Arc<Collective>,
    listener: tokio::net::TcpListener,
    token: Option<flywheel_auth::Token>,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let service = tonic::service::interceptor::InterceptedService::new(
        CollectiveServer::new(Service(collective))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        RequireToken::new(token),
    );
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            // A step waits on this round trip: Nagle's delay would dominate it.
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    )
}

/// How a rank takes part in the reduction: the chief in-process, the others over gRPC.
pub enum Reducer {
    Chief {
        handle: Handle,
        collective: Arc<Collective>,
        step: u64,
    },
    Peer(Box<Peer>),
}

pub struct Peer {
    runtime: Runtime,
    client: CollectiveClient<tonic::service::interceptor::InterceptedService<Channel, AttachToken>>,
    addr: String,
    rank: u32,
    step: u64,
}

impl Peer {
    /// Connects to the chief at `addr`, retrying until `patience` runs out (ranks start in any order); a call
    /// unanswered for `call_timeout` fails. Every call carries the gang `token`.
    pub fn connect(
        addr: &str,
        rank: u32,
        first_step: u64,
        patience: Duration,
        call_timeout: Duration,
        token: Option<&flywheel_auth::Token>,
    ) -> Result<Self, CollectiveError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| CollectiveError::Runtime(err.to_string()))?;
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let unreachable = |message: String| CollectiveError::Unreachable {
            addr: addr.to_owned(),
            seconds: patience.as_secs(),
            message,
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|err| unreachable(err.to_string()))?
            .timeout(call_timeout)
            .tcp_nodelay(true);
        let started = Instant::now();
        let channel = loop {
            match runtime.block_on(endpoint.connect()) {
                Ok(channel) => break channel,
                Err(err) if started.elapsed() >= patience => {
                    return Err(unreachable(err.to_string()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let client = CollectiveClient::with_interceptor(channel, AttachToken::new(token))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Peer {
            runtime,
            client,
            addr: addr.to_owned(),
            rank,
            step: first_step,
        })
    }

    /// Tells the chief this rank is done.
    pub fn finish(&mut self) -> Result<(), CollectiveError> {
        self.runtime
            .block_on(self.client.finish(FinishRequest { rank: self.rank }))
            .map_err(|status| CollectiveError::Call {
                addr: self.addr.clone(),
                step: self.step,
                message: status.message().to_owned(),
            })?;
        Ok(())
    }

    fn reduce(&mut self, gradients: &mut StepGradients) -> Result<(), CollectiveError> {
        let request = Contribution {
            rank: self.rank,
            step: self.step,
            gradients: Some(to_proto(gradients)),
        };
        let reply = self
            .runtime
            .block_on(self.client.all_reduce(request))
            .map_err(|status| CollectiveError::Call {
                addr: self.addr.clone(),
                step: self.step,
                message: status.message().to_owned(),
            })?;
        let reduced = from_proto(reply.into_inner().gradients.unwrap_or_default());
        if reduced.dense.len() != gradients.dense.len() {
            return Err(CollectiveError::Call {
                addr: self.addr.clone(),
                step: self.step,
                message: format!(
                    "answered {} dense gradients for {}",
                    reduced.dense.len(),
                    gradients.dense.len()
                ),
            });
        }
        *gradients = reduced;
        self.step += 1;
        Ok(())
    }
}

impl GradientReducer for Reducer {
    type Error = CollectiveError;

    fn reduce(&mut self, gradients: &mut StepGradients) -> Result<(), CollectiveError> {
        match self {
            Reducer::Chief {
                handle,
                collective,
                step,
            } => {
                let reduced =
                    handle.block_on(collective.contribute(0, *step, std::mem::take(gradients)))?;
                *gradients = (*reduced).clone();
                *step += 1;
                Ok(())
            }
            Reducer::Peer(peer) => peer.reduce(gradients),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradients(examples: usize, dense: f32) -> StepGradients {
        StepGradients {
            examples,
            dense: vec![dense; 2],
            ..StepGradients::default()
        }
    }

    #[test]
    fn only_a_rank_holding_the_gang_token_reaches_the_chief()
    -> Result<(), Box<dyn std::error::Error>> {
        let token = flywheel_auth::Token::generate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?.to_string();
        let collective = Arc::new(Collective::new(2, 0, 2, 0, Duration::from_secs(5)));
        let _server = spawn_server(&runtime, collective, listener, Some(token.clone()));
        let finish = |token: Option<&flywheel_auth::Token>| {
            let patience = Duration::from_secs(5);
            Peer::connect(&addr, 1, 0, patience, patience, token)?.finish()
        };
        let other = flywheel_auth::Token::generate()?;
        for outsider in [None, Some(&other)] {
            let refused = finish(outsider).err().map(|err| err.to_string());
            assert!(
                refused.as_deref().is_some_and(|m| m.contains("gang token")),
                "{refused:?}"
            );
        }
        finish(Some(&token))?;
        Ok(())
    }

    #[tokio::test]
    async fn every_rank_gets_the_combination_of_all() {
        let collective = Arc::new(Collective::new(2, 5, 2, 0, Duration::from_secs(5)));
        let other = collective.clone();
        let peer = tokio::spawn(async move { other.contribute(1, 5, gradients(1, 4.0)).await });
        let chief = collective.contribute(0, 5, gradients(3, 0.0)).await;
        let peer = peer.await.map(|r| r.map(|g| g.dense.clone()));
        assert_eq!(chief.map(|g| g.dense.clone()).ok(), Some(vec![1.0, 1.0]));
        assert_eq!(peer.ok().and_then(Result::ok), Some(vec![1.0, 1.0]));
    }

    #[tokio::test]
    async fn a_silent_rank_fails_the_step_for_good() {
        let collective = Collective::new(2, 0, 2, 0, Duration::from_millis(100));
        let lost = collective.contribute(0, 0, gradients(1, 1.0)).await;
        assert!(
            matches!(&lost, Err(CollectiveError::WorkerLost { missing, step: 0, .. }) if missing == &vec![1]),
            "{lost:?}"
        );
        let later = collective.contribute(1, 0, gradients(1, 1.0)).await;
        assert!(matches!(later, Err(CollectiveError::WorkerLost { .. })));
    }

    #[tokio::test]
    async fn out_of_step_and_malformed_contributions_are_refused() {
        let collective = Collective::new(2, 3, 2, 4, Duration::from_secs(1));
        let early = collective.contribute(1, 2, gradients(1, 1.0)).await;
        assert!(matches!(
            early,
            Err(CollectiveError::OutOfStep { expected: 3, .. })
        ));
        let mut bad = gradients(1, 1.0);
        bad.keys = vec![1];
        bad.first_order = vec![0.5];
        let malformed = collective.contribute(1, 3, bad).await;
        assert!(
            matches!(&malformed, Err(CollectiveError::Malformed { reason, .. }) if reason.contains("factor")),
            "{malformed:?}"
        );
        let unknown = collective.contribute(7, 3, gradients(1, 1.0)).await;
        assert!(matches!(unknown, Err(CollectiveError::UnknownRank { .. })));
    }
}
