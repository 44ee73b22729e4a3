//! Leader election on a `coordination.k8s.io/v1` Lease: one replica reconciles, the others wait and take over
//! once the holder stops renewing for a lease duration.

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// Validity of one renewal.
    pub duration: Duration,
    /// Renewal and retry period.
    pub retry: Duration,
}

/// What to do with the Lease as observed now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it holding it.
    Create,
    /// Free or expired: take it over.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Held by someone else and still valid.
    Wait { holder: String },
}

/// Pure decision over the observed Lease; `now` is the caller's clock.
pub fn decide(
    lease: Option<&Lease>,
    identity: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = spec
        .lease_duration_seconds
        .map(|seconds| SignedDuration::from_secs(i64::from(seconds)))
        .unwrap_or_else(|| {
            SignedDuration::try_from(default_duration).unwrap_or(SignedDuration::from_secs(15))
        });
    let last_renewal = spec.renew_time.or(spec.acquire_time).map(|time| time.0);
    match last_renewal {
        Some(renewed)
            if renewed
                .saturating_add(duration)
                .is_ok_and(|expiry| expiry > now) =>
        {
            Decision::Wait { holder }
        }
        _ => Decision::Acquire,
    }
}

/// The Lease spec after carrying out `decision` (for `Create`, `Acquire` and `Renew`).
pub fn desired_spec(
    current: Option<&LeaseSpec>,
    decision: &Decision,
    settings: &LeaseSettings,
    now: Timestamp,
) -> LeaseSpec {
    let current = current.cloned().unwrap_or_default();
    let duration_seconds = i32::try_from(settings.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let transitions = current.lease_transitions.unwrap_or(0);
    match decision {
        Decision::Renew => LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(duration_seconds),
            ..current
        },
        Decision::Create | Decision::Acquire | Decision::Wait { .. } => LeaseSpec {
            holder_identity: Some(settings.identity.clone()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(duration_seconds),
            lease_transitions: Some(if matches!(decision, Decision::Create) {
                0
            } else {
                transitions + 1
            }),
            ..current
        },
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
}

impl LeaderElector {
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        let api = Api::namespaced(client, &settings.namespace);
        LeaderElector { api, settings }
    }

    /// One attempt to hold the Lease. `Ok(true)` when we hold it afterwards; conflicts count as not holding it.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.settings.name).await?;
        let now = Timestamp::now();
        let decision = decide(
            current.as_ref(),
            &self.settings.identity,
            now,
            self.settings.duration,
        );
        let spec = desired_spec(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &decision,
            &self.settings,
            now,
        );
        let result = match (&decision, current) {
            (Decision::Wait { .. }, _) => return Ok(false),
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Acquire | Decision::Renew, Some(mut lease)) => {
                // replace carries the observed resourceVersion: a racing replica gets 409, not a split brain.
                lease.spec = Some(spec);
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                if decision != Decision::Renew {
                    info!(lease = %self.settings.name, identity = %self.settings.identity, "acquired leader lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Waits until this replica holds the Lease. `on_contact` is told when the API server answered at all.
    pub async fn acquire(&self, on_contact: impl Fn()) {
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    on_contact();
                    return;
                }
                Ok(false) => on_contact(),
                Err(err) => warn!(error = %err, "leader election attempt failed"),
            }
            tokio::time::sleep(self.settings.retry).await;
        }
    }

    /// Renews until renewal is lost: someone else took the Lease, or no renewal succeeded for two thirds of a
    /// lease duration (stop before a standby may legitimately take over). A renewal that hangs (an API
    /// server that accepted the connection and never answers) is given up at that deadline too: it must
    /// not keep a replica leading past its Lease.
    pub async fn hold_until_lost(&self) {
        let deadline = self.settings.duration.mul_f64(2.0 / 3.0);
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.settings.retry).await;
            let left = deadline
                .saturating_sub(last_renewal.elapsed())
                .max(Duration::from_millis(100));
            match tokio::time::timeout(left, self.try_hold()).await {
                Ok(Ok(true)) => last_renewal = Instant::now(),
                Ok(Ok(false)) => {
                    warn!(lease = %self.settings.name, "leader lease taken by another replica");
                    return;
                }
                Ok(Err(err)) => warn!(error = %err, "leader lease renewal failed"),
                Err(_) => warn!(
                    seconds = left.as_secs_f64(),
                    "leader lease renewal got no answer"
                ),
            }
            if last_renewal.elapsed() >= deadline {
                return;
            }
        }
    }

    /// Gives the Lease up so a standby takes over at once instead of after a lease duration. A renewal sent
    /// just before (its future dropped mid-request) may land first and make the write conflict: read again and
    /// retry, or the standby would wait out a whole lease duration.
    pub async fn release(&self) {
        for _ in 0..RELEASE_ATTEMPTS {
            let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else {
                return;
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
                return;
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            match self
                .api
                .replace(&self.settings.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => {
                    info!(lease = %self.settings.name, "released leader lease");
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(err) => {
                    warn!(error = %err, "could not release leader lease");
                    return;
                }
            }
        }
        warn!(lease = %self.settings.name, "could not release leader lease: every write conflicted");
    }
}

/// Conflicting writes a release retries before the Lease is left to lapse.
const RELEASE_ATTEMPTS: usize = 5;

/// Label on the leading replica's pod. The chart's webhook Service selects it, so Alertmanager's
/// notifications reach the replica that acts on them.
pub const LEADER_LABEL: &str = "flywheel.dev/leader";

/// How many times marking the pod is tried before giving up (a standby refuses notifications meanwhile).
const MARK_ATTEMPTS: u32 = 5;

/// Sets or clears [`LEADER_LABEL`] on this replica's pod (`namespace`, `name`). Best effort: failing leaves
/// the webhook Service pointing at the wrong replica or none, whose refusals Alertmanager retries.
pub async fn mark_pod(client: &kube::Client, namespace: &str, name: &str, leading: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let value = if leading { Some("true") } else { None };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    for attempt in 1..=MARK_ATTEMPTS {
        match pods
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(leading, "pod's leader label set");
                return;
            }
            Err(err) if attempt == MARK_ATTEMPTS => {
                warn!(error = %err, leading, "could not set the pod's leader label");
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn lease(holder: Option<&str>, renewed: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: Some(MicroTime(at(renewed))),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            }),
        }
    }

    const FIFTEEN: Duration = Duration::from_secs(15);

    #[tokio::test]
    async fn a_renewal_that_never_answers_gives_up_leading_before_the_lease_lapses()
    -> Result<(), Box<dyn std::error::Error>> {
        // An API server that takes every call and never answers: the call hangs.
        let address = crate::hostile_server::silent().await?;
        let client =
            kube::Client::try_from(kube::Config::new(format!("http://{address}").parse()?))?;
        let elector = LeaderElector::new(
            client,
            LeaseSettings {
                name: "flywheel".into(),
                namespace: "default".into(),
                identity: "a".into(),
                duration: Duration::from_secs(3),
                retry: Duration::from_millis(200),
            },
        );
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), elector.hold_until_lost())
            .await
            .map_err(|_| "still leading after 30 s on a hung API server")?;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        Ok(())
    }

    #[test]
    fn missing_lease_is_created() {
        assert_eq!(decide(None, "a", at(100), FIFTEEN), Decision::Create);
    }

    #[test]
    fn own_lease_is_renewed() {
        assert_eq!(
            decide(Some(&lease(Some("a"), 100, 15)), "a", at(200), FIFTEEN),
            Decision::Renew
        );
    }

    #[test]
    fn valid_foreign_lease_waits_and_expired_one_is_taken() {
        let held = lease(Some("b"), 100, 15);
        assert_eq!(
            decide(Some(&held), "a", at(114), FIFTEEN),
            Decision::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&held), "a", at(115), FIFTEEN),
            Decision::Acquire
        );
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        assert_eq!(
            decide(Some(&lease(None, 100, 15)), "a", at(101), FIFTEEN),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&lease(Some(""), 100, 15)), "a", at(101), FIFTEEN),
            Decision::Acquire
        );
    }

    #[test]
    fn acquiring_counts_a_transition_and_renewing_does_not() {
        let settings = LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "a".into(),
            duration: FIFTEEN,
            retry: Duration::from_secs(2),
        };
        let mut current = lease(Some("b"), 100, 15).spec.unwrap_or_default();
        current.lease_transitions = Some(3);
        let taken = desired_spec(Some(&current), &Decision::Acquire, &settings, at(200));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(200))));
        let renewed = desired_spec(Some(&taken), &Decision::Renew, &settings, at(202));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(200))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(202))));
    }
}
