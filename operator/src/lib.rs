//! The Flywheel operator: one controller per kind, each written as observe → pure plan → apply, run only by
//! the replica that holds the leader Lease.

pub mod alerts;
pub mod batch_job;
pub mod config;
pub mod controller;
pub mod credentials;
pub mod featureview;
pub mod gpuquota;
#[cfg(test)]
mod hostile_server;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod modelversion;
pub mod objects;
pub mod plan;
pub mod rollout;
pub mod store_access;
pub mod supervisor;
pub mod telemetry;
pub mod trainingjob;
