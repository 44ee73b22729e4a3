//! The parameter-server shard (`flywheel-trainer ps`): holds the embedding rows whose key hashes to it,
//! applies the sparse optimizer to pushed gradients, keeps the averaged dense parameters (shard 0), and exits 0
//! once every worker reported done. A worker silent for `worker_timeout` fails the shard with a clear error,
//! so the operator restarts the gang from its checkpoint instead of waiting forever.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flywheel_ml::embedding::{EmbeddingTable, SparseOptimizer};
use flywheel_ml::train::{TableKind, Tables};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub mod proto {
    tonic::include_proto!("flywheel.ps.v1");
}

use proto::parameter_server_server::{ParameterServer, ParameterServerServer};
use proto::{
    CheckpointRequest, CheckpointResponse, DenseParameters, DoneRequest, ExportRequest,
    ExportResponse, Progress, PullRequest, PullResponse, PushRequest, PushResponse, StatusRequest,
};

/// gRPC messages may carry whole tables (export) and large batches.
pub const MAX_MESSAGE: usize = 1 << 30;

#[derive(Clone, Debug)]
pub struct ShardConfig {
    pub shard: u32,
    pub workers: u32,
    pub embedding_dim: usize,
    pub factors: bool,
    pub optimizer: SparseOptimizer,
    pub init_std: f32,
    pub seed: u64,
    pub worker_timeout: Duration,
    /// Where the shard keeps `ps-shard-<I>.fwt`; an existing one is loaded at start (a restarted gang).
    pub checkpoint_dir: Option<PathBuf>,
    /// The gang token every call must carry (`None`: calls are not authenticated).
    pub token: Option<flywheel_auth::Token>,
}

impl ShardConfig {
    fn checkpoint_path(&self) -> Option<PathBuf> {
        self.checkpoint_dir
            .as_ref()
            .map(|dir| dir.join(format!("ps-shard-{}.fwt", self.shard)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("loading the shard checkpoint {path}: {message}")]
    Restore { path: PathBuf, message: String },
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error(
        "worker {worker} sent nothing for {seconds} s; giving up so the job can restart from its checkpoint"
    )]
    WorkerLost { worker: u32, seconds: u64 },
}

struct Shard {
    config: ShardConfig,
    tables: Mutex<Tables>,
    dense: Mutex<Option<Vec<f32>>>,
    done: Mutex<BTreeSet<u32>>,
    last_seen: Mutex<BTreeMap<u32, Instant>>,
    finished: watch::Sender<bool>,
}

/// A poisoned lock only means another request panicked mid-update; the data is still the best we have.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shard {
    /// Records a call of `worker`, which must be one of the job's `0..workers` (an unknown id would count as
    /// a worker that finished, or be awaited forever).
    fn seen(&self, worker: u32) -> Result<(), Status> {
        if worker >= self.config.workers {
            return Err(Status::invalid_argument(format!(
                "worker {worker} is outside this job's 0..{} workers",
                self.config.workers
            )));
        }
        lock(&self.last_seen).insert(worker, Instant::now());
        Ok(())
    }

    fn progress(&self) -> Progress {
        Progress {
            workers_done: lock(&self.done).len() as u32,
            workers: self.config.workers,
        }
    }

    fn table_kind(table: u32) -> Result<TableKind, Status> {
        match table {
            0 => Ok(TableKind::FirstOrder),
            1 => Ok(TableKind::Factors),
            other => Err(Status::invalid_argument(format!(
                "no table {other}; tables are 0 (first order) and 1 (factors)"
            ))),
        }
    }

    /// Runs `f` on table `table` (0 first order, 1 factors) under the tables' lock.
    fn with_table<T>(
        &self,
        table: u32,
        f: impl FnOnce(&mut EmbeddingTable) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let kind = Shard::table_kind(table)?;
        let mut tables = lock(&self.tables);
        let table = tables
            .table_mut(kind)
            .ok_or_else(|| Status::invalid_argument("this model has no factor table"))?;
        f(table)
    }
}

struct Service(Arc<Shard>);

#[tonic::async_trait]
impl ParameterServer for Service {
    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let request = request.into_inner();
        self.0.seen(request.worker)?;
        // A pull only reads: an untouched row reads as its initial value and is created by its first push, so
        // pulling ids never grows the shard.
        let values = self.0.with_table(request.table, |table| {
            let mut values = Vec::with_capacity(request.ids.len() * table.dim());
            table.read_into(&request.ids, &mut values);
            Ok(values)
        })?;
        Ok(Response::new(PullResponse { values }))
    }

    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let request = request.into_inner();
        self.0.seen(request.worker)?;
        if request.gradients.iter().any(|g| !g.is_finite()) {
            return Err(Status::invalid_argument("gradients must be finite"));
        }
        self.0.with_table(request.table, |table| {
            if request.gradients.len() != request.ids.len() * table.dim() {
                return Err(Status::invalid_argument(format!(
                    "{} gradients for {} ids of width {}",
                    request.gradients.len(),
                    request.ids.len(),
                    table.dim()
                )));
            }
            table.apply_gradients(&request.ids, &request.gradients);
            Ok(())
        })?;
        Ok(Response::new(PushResponse {}))
    }

    async fn sync_dense(
        &self,
        request: Request<DenseParameters>,
    ) -> Result<Response<DenseParameters>, Status> {
        if self.0.config.shard != 0 {
            return Err(Status::failed_precondition(
                "dense parameters live on shard 0",
            ));
        }
        let request = request.into_inner();
        self.0.seen(request.worker)?;
        let mut dense = lock(&self.0.dense);
        if request.values.is_empty() {
            // A read: the chief fetching the final global parameters without moving them.
            return Ok(Response::new(DenseParameters {
                worker: request.worker,
                values: dense.clone().unwrap_or_default(),
            }));
        }
        let global = match dense.take() {
            None => request.values,
            Some(mut global) => {
                if global.len() != request.values.len() {
                    let expected = global.len();
                    *dense = Some(global);
                    return Err(Status::invalid_argument(format!(
                        "{} dense values, the model has {expected}",
                        request.values.len()
                    )));
                }
                // Each sync moves the global copy 1/W of the way to the worker's weights (asynchronous averaging).
                let share = 1.0 / self.0.config.workers.max(1) as f32;
                for (g, w) in global.iter_mut().zip(&request.values) {
                    *g += (w - *g) * share;
                }
                global
            }
        };
        *dense = Some(global.clone());
        Ok(Response::new(DenseParameters {
            worker: request.worker,
            values: global,
        }))
    }

    async fn done(&self, request: Request<DoneRequest>) -> Result<Response<Progress>, Status> {
        let worker = request.into_inner().worker;
        self.0.seen(worker)?;
        lock(&self.0.done).insert(worker);
        let progress = self.0.progress();
        if progress.workers_done >= progress.workers {
            let _ = self.0.finished.send(true);
        }
        Ok(Response::new(progress))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<Progress>, Status> {
        Ok(Response::new(self.0.progress()))
    }

    async fn checkpoint(
        &self,
        _request: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointResponse>, Status> {
        let path =
            self.0.config.checkpoint_path().ok_or_else(|| {
                Status::failed_precondition("this shard has no checkpoint directory")
            })?;
        let bytes = encode_shard(&lock(&self.0.tables), lock(&self.0.dense).as_deref());
        flywheel_ml::artifact::write_file(&path, &bytes)
            .map_err(|err| Status::internal(err.to_string()))?;
        Ok(Response::new(CheckpointResponse {
            path: path.display().to_string(),
        }))
    }

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<ExportResponse>, Status> {
        let bytes = self.0.with_table(request.into_inner().table, |table| {
            let mut bytes = Vec::new();
            table.write_to(&mut bytes, false);
            Ok(bytes)
        })?;
        Ok(Response::new(ExportResponse { table: bytes }))
    }
}

fn fresh_tables(config: &ShardConfig) -> Tables {
    Tables {
        first_order: EmbeddingTable::new(1, 0.0, config.seed, config.optimizer),
        factors: config.factors.then(|| {
            EmbeddingTable::new(
                config.embedding_dim,
                config.init_std,
                config.seed ^ 1,
                config.optimizer,
            )
        }),
    }
}

/// A shard checkpoint: table count, the tables with optimizer state, then the dense parameters (shard 0).
fn encode_shard(tables: &Tables, dense: Option<&[f32]>) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(if tables.factors.is_some() { 2 } else { 1 });
    tables.first_order.write_to(&mut out, true);
    if let Some(factors) = &tables.factors {
        factors.write_to(&mut out, true);
    }
    let dense = dense.unwrap_or_default();
    out.extend_from_slice(&(dense.len() as u64).to_le_bytes());
    for value in dense {
        out.extend_from_slice(&value.to_le_bytes());
    }
    flywheel_ml::artifact::seal(out)
}

/// A shard checkpoint, refused when its seal does not match. One written before checkpoints were sealed has no
/// seal; a damaged sealed one never decodes as such, since the dense section must end the file exactly.
fn decode_shard(bytes: &[u8]) -> Result<(Tables, Option<Vec<f32>>), String> {
    match flywheel_ml::artifact::unseal(bytes) {
        Ok(content) => decode_shard_content(content),
        Err(damaged) => {
            decode_shard_content(bytes).map_err(|_| format!("the checkpoint is damaged: {damaged}"))
        }
    }
}

fn decode_shard_content(bytes: &[u8]) -> Result<(Tables, Option<Vec<f32>>), String> {
    let (&count, mut input) = bytes.split_first().ok_or("empty file")?;
    let first_order = EmbeddingTable::read_from(&mut input).map_err(|e| e.to_string())?;
    let factors = if count == 2 {
        Some(EmbeddingTable::read_from(&mut input).map_err(|e| e.to_string())?)
    } else {
        None
    };
    if input.len() < 8 {
        return Err("truncated".to_owned());
    }
    let (len, rest) = input.split_at(8);
    let len = u64::from_le_bytes(len.try_into().map_err(|_| "truncated")?) as usize;
    if rest.len() != len * 4 {
        return Err("dense parameters are truncated".to_owned());
    }
    let dense: Vec<f32> = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((
        Tables {
            first_order,
            factors,
        },
        (!dense.is_empty()).then_some(dense),
    ))
}

/// Serves the shard on `addr` until every worker is done (Ok) or a worker goes silent (Err). The shard starts
/// from its checkpoint when there is one (a restarted gang), else from `warm_start` (its share of an earlier
/// model's rows), else from fresh rows.
pub async fn serve(
    config: ShardConfig,
    warm_start: Option<Tables>,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ShardError> {
    let (finished, mut finished_rx) = watch::channel(false);
    let (tables, dense) = match config.checkpoint_path().filter(|path| path.exists()) {
        Some(path) => {
            let bytes = std::fs::read(&path).map_err(|err| ShardError::Restore {
                path: path.clone(),
                message: err.to_string(),
            })?;
            decode_shard(&bytes).map_err(|message| ShardError::Restore { path, message })?
        }
        None => (warm_start.unwrap_or_else(|| fresh_tables(&config)), None),
    };
    let shard = Arc::new(Shard {
        config: config.clone(),
        tables: Mutex::new(tables),
        dense: Mutex::new(dense),
        done: Mutex::new(BTreeSet::new()),
        last_seen: Mutex::new(BTreeMap::new()),
        finished,
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ShardError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    on_listening(local);
    let service = tonic::service::interceptor::InterceptedService::new(
        ParameterServerServer::new(Service(shard.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        crate::gang_auth::RequireToken::new(config.token.clone()),
    );
    let mut stop = finished_rx.clone();
    let server = tonic::transport::Server::builder()
        .add_service(service)
        // Workers wait on every pull and push: Nagle's delay would dominate those round trips.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = stop.wait_for(|done| *done).await;
            },
        );
    let watchdog = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if *finished_rx.borrow_and_update() {
                return Ok(());
            }
            let done = lock(&shard.done).clone();
            let silent = lock(&shard.last_seen)
                .iter()
                .filter(|(worker, _)| !done.contains(worker))
                .find(|(_, seen)| seen.elapsed() > config.worker_timeout)
                .map(|(worker, _)| *worker);
            if let Some(worker) = silent {
                return Err(ShardError::WorkerLost {
                    worker,
                    seconds: config.worker_timeout.as_secs(),
                });
            }
        }
    };
    tokio::select! {
        served = server => served.map_err(|source| ShardError::Serve { addr: local, source }),
        watched = watchdog => watched,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gang_auth::AttachToken;
    use flywheel_auth::Token;
    use proto::parameter_server_client::ParameterServerClient;
    use tonic::Code;
    use tonic::transport::Endpoint;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn start_shard(token: &Token) -> Result<String, Box<dyn std::error::Error>> {
        let config = ShardConfig {
            shard: 0,
            workers: 2,
            embedding_dim: 4,
            factors: true,
            optimizer: SparseOptimizer::adagrad(0.05),
            init_std: 0.01,
            seed: 1,
            worker_timeout: Duration::from_secs(60),
            checkpoint_dir: None,
            token: Some(token.clone()),
        };
        let (listening, address) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(
            config,
            None,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            move |addr| {
                let _ = listening.send(addr);
            },
        ));
        Ok(format!("http://{}", address.await?))
    }

    fn pull(worker: u32, ids: Vec<u64>) -> PullRequest {
        PullRequest {
            table: 1,
            ids,
            worker,
        }
    }

    proptest::proptest! {
        #[test]
        fn any_shard_checkpoint_bytes_restore_or_are_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
        ) {
            let _ = decode_shard(&bytes);
        }
    }

    #[test]
    fn a_damaged_shard_checkpoint_is_refused_not_trusted() {
        let mut tables = Tables {
            first_order: EmbeddingTable::new(1, 0.0, 1, SparseOptimizer::adagrad(0.05)),
            factors: Some(EmbeddingTable::new(
                4,
                0.01,
                2,
                SparseOptimizer::adagrad(0.05),
            )),
        };
        tables
            .first_order
            .apply_gradients(&[1, 2, 3], &[0.1, 0.2, 0.3]);
        let bytes = encode_shard(&tables, Some(&[1.0, 2.0]));
        assert!(decode_shard(&bytes).is_ok());
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode_shard(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // One flipped bit in a dense weight still decodes as floats: only the seal catches it.
        let mut flipped = bytes.clone();
        let weight = bytes.len() - 32 - 4;
        flipped[weight] ^= 0x01;
        let refused = decode_shard(&flipped).err().unwrap_or_default();
        assert!(refused.contains("damaged"), "{refused}");
    }

    #[tokio::test]
    async fn only_gang_members_reach_the_shard_and_only_pushes_create_rows() -> TestResult {
        let token = Token::generate()?;
        let channel = Endpoint::from_shared(start_shard(&token).await?)?
            .connect()
            .await?;
        let rows =
            |bytes: Vec<u8>| EmbeddingTable::read_from(&mut bytes.as_slice()).map(|t| t.len());

        let other = Token::generate()?;
        for interceptor in [AttachToken::new(None), AttachToken::new(Some(&other))] {
            let mut outsider =
                ParameterServerClient::with_interceptor(channel.clone(), interceptor);
            let push = outsider
                .push(PushRequest {
                    table: 1,
                    ids: vec![1],
                    gradients: vec![1e6; 4],
                    worker: 0,
                })
                .await;
            assert_eq!(push.err().map(|s| s.code()), Some(Code::Unauthenticated));
            let done = outsider.done(DoneRequest { worker: 0 }).await;
            assert_eq!(done.err().map(|s| s.code()), Some(Code::Unauthenticated));
        }

        let mut member =
            ParameterServerClient::with_interceptor(channel, AttachToken::new(Some(&token)));
        let ids: Vec<u64> = (0..10_000).collect();
        let pulled = member.pull(pull(0, ids.clone())).await?.into_inner();
        assert_eq!(pulled.values.len(), ids.len() * 4);
        let again = member.pull(pull(1, ids)).await?.into_inner();
        assert_eq!(
            pulled.values, again.values,
            "an untouched row reads the same"
        );
        let table = member
            .export(ExportRequest { table: 1 })
            .await?
            .into_inner();
        assert_eq!(rows(table.table)?, 0, "pulls created rows");

        // Worker ids outside the job's 0..2 are refused: they would count as finished workers.
        let stranger = member.done(DoneRequest { worker: 7 }).await;
        assert_eq!(
            stranger.err().map(|s| s.code()),
            Some(Code::InvalidArgument)
        );
        let stranger = member.pull(pull(2, vec![1])).await;
        assert_eq!(
            stranger.err().map(|s| s.code()),
            Some(Code::InvalidArgument)
        );
        let progress = member.status(StatusRequest {}).await?.into_inner();
        assert_eq!((progress.workers_done, progress.workers), (0, 2));

        member
            .push(PushRequest {
                table: 1,
                ids: vec![42],
                gradients: vec![0.5; 4],
                worker: 1,
            })
            .await?;
        let table = member
            .export(ExportRequest { table: 1 })
            .await?
            .into_inner();
        assert_eq!(rows(table.table)?, 1);
        Ok(())
    }
}
