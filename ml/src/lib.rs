//! The ML core shared by trainer and serving, so the two can never disagree: feature transforms and the
//! feature schema, metrics, and the synthetic CTR generator. No Kubernetes in here.

pub mod artifact;
pub mod calibration;
pub mod config;
pub mod embedding;
pub mod metrics;
pub mod model;
pub mod reduce;
pub mod schema;
pub mod synthetic;
pub mod tables;
pub mod train;
pub mod transform;
