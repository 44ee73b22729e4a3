//! A parameter-server worker: its embedding rows live on the `ps` shards (pulled for each batch, gradients
//! pushed back), its dense parameters are averaged through shard 0 every few steps. Workers train
//! asynchronously on disjoint shares of the data (row `i` belongs to worker `i mod W`).

use std::time::{Duration, Instant};

use flywheel_ml::embedding::{EmbeddingTable, shard_of};
use flywheel_ml::train::{RowStore, TableKind};
use futures::future::join_all;
use tokio::runtime::Runtime;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::gang_auth::AttachToken;

use crate::ps::MAX_MESSAGE;
use crate::ps::proto::parameter_server_client::ParameterServerClient;
use crate::ps::proto::{
    CheckpointRequest, DenseParameters, DoneRequest, ExportRequest, PullRequest, PushRequest,
    StatusRequest,
};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot start the gRPC runtime: {0}")]
    Runtime(std::io::Error),
    #[error("parameter server shard {shard} ({addr}) unreachable after {seconds} s: {message}")]
    Unreachable {
        shard: usize,
        addr: String,
        seconds: u64,
        message: String,
    },
    #[error("parameter server shard {shard} ({addr}) failed: {status}")]
    Call {
        shard: usize,
        addr: String,
        status: Box<tonic::Status>,
    },
    #[error("parameter server shard {shard} answered {got} values for {expected}")]
    Shape {
        shard: usize,
        expected: usize,
        got: usize,
    },
    #[error("shard {shard} sent a corrupt table: {message}")]
    Export { shard: usize, message: String },
}

/// The shards of one job, reached over gRPC from synchronous training code.
pub struct RemoteStore {
    runtime: Runtime,
    clients: Vec<ParameterServerClient<InterceptedService<Channel, AttachToken>>>,
    addrs: Vec<String>,
    worker: u32,
    factor_dim: usize,
}

impl RemoteStore {
    /// Connects to every shard, retrying until `patience` runs out (shards and workers start in any order);
    /// every call carries the gang `token`.
    pub fn connect(
        addrs: &[String],
        worker: u32,
        factor_dim: usize,
        patience: Duration,
        token: Option<&flywheel_auth::Token>,
    ) -> Result<Self, RemoteError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        let mut clients = Vec::with_capacity(addrs.len());
        for (shard, addr) in addrs.iter().enumerate() {
            let started = Instant::now();
            let endpoint = if addr.contains("://") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
            let unreachable = |message: String| RemoteError::Unreachable {
                shard,
                addr: addr.clone(),
                seconds: patience.as_secs(),
                message,
            };
            let endpoint =
                Endpoint::from_shared(endpoint).map_err(|err| unreachable(err.to_string()))?;
            let channel = loop {
                match runtime.block_on(endpoint.connect()) {
                    Ok(channel) => break channel,
                    Err(_) if started.elapsed() < patience => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(err) => return Err(unreachable(err.to_string())),
                }
            };
            clients.push(
                ParameterServerClient::with_interceptor(channel, AttachToken::new(token))
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            );
        }
        Ok(RemoteStore {
            runtime,
            clients,
            addrs: addrs.to_vec(),
            worker,
            factor_dim,
        })
    }

    fn call_error(&self, shard: usize, status: tonic::Status) -> RemoteError {
        RemoteError::Call {
            shard,
            addr: self.addrs[shard].clone(),
            status: Box::new(status),
        }
    }

    fn dim(&self, table: TableKind) -> usize {
        match table {
            TableKind::FirstOrder => 1,
            TableKind::Factors => self.factor_dim,
        }
    }

    /// Positions of `keys` grouped by owning shard.
    fn by_shard(&self, keys: &[u64]) -> Vec<Vec<usize>> {
        let mut groups = vec![Vec::new(); self.clients.len()];
        for (position, &key) in keys.iter().enumerate() {
            groups[shard_of(key, self.clients.len())].push(position);
        }
        groups
    }

    /// Averages `values` into shard 0's global dense parameters and returns the result.
    pub fn sync_dense(&mut self, values: Vec<f32>) -> Result<Vec<f32>, RemoteError> {
        let request = DenseParameters {
            worker: self.worker,
            values,
        };
        let mut client = self.clients[0].clone();
        let answer = self
            .runtime
            .block_on(client.sync_dense(request))
            .map_err(|s| self.call_error(0, s))?;
        Ok(answer.into_inner().values)
    }

    /// Tells every shard this worker is done; returns how many workers shard 0 counts as done.
    pub fn done(&mut self) -> Result<u32, RemoteError> {
        let mut done = 0;
        for shard in 0..self.clients.len() {
            let mut client = self.clients[shard].clone();
            let answer = self
                .runtime
                .block_on(client.done(DoneRequest {
                    worker: self.worker,
                }))
                .map_err(|s| self.call_error(shard, s))?;
            if shard == 0 {
                done = answer.into_inner().workers_done;
            }
        }
        Ok(done)
    }

    /// Waits until `workers` workers reported done to shard 0.
    pub fn wait_for_workers(&mut self, workers: u32) -> Result<(), RemoteError> {
        loop {
            let mut client = self.clients[0].clone();
            let progress = self
                .runtime
                .block_on(client.status(StatusRequest {}))
                .map_err(|s| self.call_error(0, s))?
                .into_inner();
            if progress.workers_done >= workers {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Has every shard write its checkpoint.
    pub fn checkpoint(&mut self, step: u64) -> Result<(), RemoteError> {
        for shard in 0..self.clients.len() {
            let mut client = self.clients[shard].clone();
            self.runtime
                .block_on(client.checkpoint(CheckpointRequest { step }))
                .map_err(|s| self.call_error(shard, s))?;
        }
        Ok(())
    }

    /// Every shard's rows of `table`, assembled into `into`.
    pub fn export(
        &mut self,
        table: TableKind,
        into: &mut EmbeddingTable,
    ) -> Result<(), RemoteError> {
        let index = table_index(table);
        for shard in 0..self.clients.len() {
            let mut client = self.clients[shard].clone();
            let bytes = self
                .runtime
                .block_on(client.export(ExportRequest { table: index }))
                .map_err(|s| self.call_error(shard, s))?
                .into_inner()
                .table;
            let part = EmbeddingTable::read_from(&mut bytes.as_slice()).map_err(|err| {
                RemoteError::Export {
                    shard,
                    message: err.to_string(),
                }
            })?;
            into.absorb(&part);
        }
        Ok(())
    }
}

fn table_index(table: TableKind) -> u32 {
    match table {
        TableKind::FirstOrder => 0,
        TableKind::Factors => 1,
    }
}

impl RowStore for RemoteStore {
    type Error = RemoteError;

    fn gather(
        &mut self,
        table: TableKind,
        keys: &[u64],
        out: &mut Vec<f32>,
    ) -> Result<(), RemoteError> {
        let dim = self.dim(table);
        let groups = self.by_shard(keys);
        let requests = groups
            .iter()
            .enumerate()
            .filter(|(_, positions)| !positions.is_empty())
            .map(|(shard, positions)| {
                let mut client = self.clients[shard].clone();
                let request = PullRequest {
                    table: table_index(table),
                    ids: positions.iter().map(|&p| keys[p]).collect(),
                    worker: self.worker,
                };
                async move { (shard, client.pull(request).await) }
            });
        let answers = self.runtime.block_on(join_all(requests));
        let start = out.len();
        out.resize(start + keys.len() * dim, 0.0);
        for (shard, answer) in answers {
            let values = answer
                .map_err(|s| self.call_error(shard, s))?
                .into_inner()
                .values;
            let positions = &groups[shard];
            if values.len() != positions.len() * dim {
                return Err(RemoteError::Shape {
                    shard,
                    expected: positions.len() * dim,
                    got: values.len(),
                });
            }
            for (row, &position) in positions.iter().enumerate() {
                out[start + position * dim..start + (position + 1) * dim]
                    .copy_from_slice(&values[row * dim..(row + 1) * dim]);
            }
        }
        Ok(())
    }

    fn apply(&mut self, table: TableKind, keys: &[u64], grads: &[f32]) -> Result<(), RemoteError> {
        let dim = self.dim(table);
        let groups = self.by_shard(keys);
        let requests = groups
            .iter()
            .enumerate()
            .filter(|(_, positions)| !positions.is_empty())
            .map(|(shard, positions)| {
                let mut client = self.clients[shard].clone();
                let request = PushRequest {
                    table: table_index(table),
                    ids: positions.iter().map(|&p| keys[p]).collect(),
                    gradients: positions
                        .iter()
                        .flat_map(|&p| grads[p * dim..(p + 1) * dim].iter().copied())
                        .collect(),
                    worker: self.worker,
                };
                async move { (shard, client.push(request).await) }
            });
        for (shard, answer) in self.runtime.block_on(join_all(requests)) {
            answer.map_err(|s| self.call_error(shard, s))?;
        }
        Ok(())
    }
}
