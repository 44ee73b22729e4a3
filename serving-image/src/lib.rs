//! Flywheel's online data plane: the Open Inference Protocol server, the traffic router, streaming feature
//! ingestion, and the online quality metrics they export. The `flywheel-serving` binary wires these together;
//! tests and clients use the protocol types from here.

pub mod admin;
pub mod batcher;
pub mod feedback;
pub mod grpc;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod online;
pub mod proxy;
pub mod request;
pub mod rest;
pub mod routes;
pub mod server;
