//! The router's traffic split: which model-version backend a request goes to. Weights are exact (basis points
//! of `hash(key) mod 10000` buckets, not replica ratios) and sticky: backends own contiguous bucket ranges in
//! the order listed, so with the canary listed first a user on the canary stays there while its weight grows.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

pub const BUCKETS: u32 = 10_000;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// The model version this backend serves (metrics label).
    pub name: String,
    /// Base URL for REST requests, e.g. `http://ctr-v2:8080`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Base URL for gRPC requests, e.g. `http://ctr-v2:8081`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    /// Percent of traffic, with up to two decimals (0.01% steps).
    pub weight: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    /// Percent of requests copied to the mirror.
    #[serde(default = "all_requests")]
    pub percent: f64,
}

fn all_requests() -> f64 {
    100.0
}

/// The router's configuration (a mounted ConfigMap file, or `PUT /admin/routes`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfig {
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("backends: at least one is needed")]
    NoBackends,
    #[error("backends[{index}].weight: {message}")]
    Weight { index: usize, message: String },
    #[error("backends: weights add up to {0}%, they must add up to 100%")]
    Total(f64),
    #[error("backends[{index}]: neither an http nor a grpc URL")]
    NoUrl { index: usize },
    #[error("backends[{index}].name: `{name}` is listed twice")]
    Duplicate { index: usize, name: String },
    #[error("{field}: `{url}` is not an http:// URL")]
    Url { field: String, url: String },
    #[error("mirror.percent: {0}")]
    MirrorPercent(String),
}

/// A validated configuration, with each backend's bucket range.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutePlan {
    pub config: RouteConfig,
    /// Exclusive upper bucket of each backend, in order; the last is `BUCKETS`.
    upper: Vec<u32>,
    mirror_buckets: u32,
}

fn basis_points(percent: f64) -> Option<u32> {
    let points = percent * 100.0;
    let rounded = points.round();
    ((0.0..=f64::from(BUCKETS)).contains(&rounded) && (points - rounded).abs() < 1e-6)
        .then_some(rounded as u32)
}

fn check_url(field: String, url: &Option<String>) -> Result<(), RouteError> {
    match url {
        Some(url) if !url.starts_with("http://") => Err(RouteError::Url {
            field,
            url: url.clone(),
        }),
        _ => Ok(()),
    }
}

impl RoutePlan {
    pub fn new(config: RouteConfig) -> Result<RoutePlan, RouteError> {
        if config.backends.is_empty() {
            return Err(RouteError::NoBackends);
        }
        let mut upper = Vec::with_capacity(config.backends.len());
        let mut total = 0u32;
        for (index, backend) in config.backends.iter().enumerate() {
            if config.backends[..index]
                .iter()
                .any(|other| other.name == backend.name)
            {
                return Err(RouteError::Duplicate {
                    index,
                    name: backend.name.clone(),
                });
            }
            if backend.http.is_none() && backend.grpc.is_none() {
                return Err(RouteError::NoUrl { index });
            }
            check_url(format!("backends[{index}].http"), &backend.http)?;
            check_url(format!("backends[{index}].grpc"), &backend.grpc)?;
            let points = basis_points(backend.weight).ok_or_else(|| RouteError::Weight {
                index,
                message: format!(
                    "{} is not a percentage between 0 and 100 in steps of 0.01",
                    backend.weight
                ),
            })?;
            total += points;
            upper.push(total);
        }
        if total != BUCKETS {
            return Err(RouteError::Total(f64::from(total) / 100.0));
        }
        let mirror_buckets = match &config.mirror {
            None => 0,
            Some(mirror) => {
                check_url("mirror.http".into(), &mirror.http)?;
                check_url("mirror.grpc".into(), &mirror.grpc)?;
                basis_points(mirror.percent).ok_or_else(|| {
                    RouteError::MirrorPercent(format!(
                        "{} is not a percentage between 0 and 100 in steps of 0.01",
                        mirror.percent
                    ))
                })?
            }
        };
        Ok(RoutePlan {
            config,
            upper,
            mirror_buckets,
        })
    }

    /// The backend owning `bucket`.
    pub fn backend(&self, bucket: u32) -> &Backend {
        let index = self
            .upper
            .iter()
            .position(|&upper| bucket < upper)
            .unwrap_or(self.upper.len() - 1);
        &self.config.backends[index]
    }

    /// The mirror, when this bucket's requests are copied to it.
    pub fn mirror(&self, bucket: u32) -> Option<&Mirror> {
        // Mirror from the top of the bucket range down, so the mirrored users are a stable set.
        self.config
            .mirror
            .as_ref()
            .filter(|_| bucket >= BUCKETS - self.mirror_buckets)
    }
}

/// The bucket of a sticky key.
pub fn bucket_of(key: &[u8]) -> u32 {
    (xxh3_64(key) % u64::from(BUCKETS)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(weights: &[f64]) -> RouteConfig {
        RouteConfig {
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Backend {
                    name: format!("v{i}"),
                    http: Some(format!("http://127.0.0.1:{}", 8000 + i)),
                    grpc: None,
                    weight,
                })
                .collect(),
            mirror: None,
        }
    }

    #[test]
    fn weights_are_exact_bucket_shares() {
        let plan = RoutePlan::new(config(&[1.0, 99.0])).unwrap_or_else(|e| panic!("{e}"));
        let canary = (0..BUCKETS)
            .filter(|&b| plan.backend(b).name == "v0")
            .count();
        assert_eq!(canary, 100);
        let plan = RoutePlan::new(config(&[0.25, 99.75])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (0..BUCKETS)
                .filter(|&b| plan.backend(b).name == "v0")
                .count(),
            25
        );
    }

    #[test]
    fn a_user_on_the_canary_stays_there_as_its_weight_grows() {
        let steps: Vec<RoutePlan> = [1.0, 5.0, 20.0, 100.0]
            .iter()
            .map(|&w| {
                let mut c = config(&[w, 100.0 - w]);
                if w == 100.0 {
                    c.backends.truncate(1);
                }
                RoutePlan::new(c).unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        for user in 0..20_000u32 {
            let bucket = bucket_of(format!("user-{user}").as_bytes());
            let mut on_canary = false;
            for plan in &steps {
                let now = plan.backend(bucket).name == "v0";
                assert!(now || !on_canary, "user {user} left the canary");
                on_canary = now;
            }
            assert!(on_canary);
        }
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let message = |c: RouteConfig| RoutePlan::new(c).map(|_| ()).unwrap_err().to_string();
        assert_eq!(
            message(config(&[10.0, 80.0])),
            "backends: weights add up to 90%, they must add up to 100%"
        );
        assert!(message(config(&[0.001, 99.999])).starts_with("backends[0].weight"));
        assert!(message(config(&[-5.0, 105.0])).starts_with("backends[0].weight"));
        let mut duplicate = config(&[50.0, 50.0]);
        duplicate.backends[1].name = "v0".into();
        assert!(message(duplicate).starts_with("backends[1].name"));
        let mut bad_url = config(&[100.0]);
        bad_url.backends[0].http = Some("ftp://x".into());
        assert!(message(bad_url).starts_with("backends[0].http"));
        assert_eq!(message(config(&[])), "backends: at least one is needed");
    }

    #[test]
    fn the_mirror_takes_its_percent_of_buckets() {
        let mut c = config(&[100.0]);
        c.mirror = Some(Mirror {
            name: "shadow".into(),
            http: Some("http://127.0.0.1:9".into()),
            grpc: None,
            percent: 10.0,
        });
        let plan = RoutePlan::new(c).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (0..BUCKETS).filter(|&b| plan.mirror(b).is_some()).count(),
            1000
        );
    }
}
