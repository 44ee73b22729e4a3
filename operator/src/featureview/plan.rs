//! The FeatureView's plan, pure: status from the newest finished materialization Job (run, statistics, drift),
//! the next run on the schedule, the Jobs beyond the history to delete, and the ingestion Deployment.

use std::str::FromStr;
use std::time::Duration;

use flywheel_crds::FeatureView;
use flywheel_crds::common::{ConditionStatus, condition, set_condition};
use flywheel_crds::featureview::{FeatureViewStatus, MaterializationReport, MaterializationRun};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::builders::{ingest_deployment, ingest_name, materialization_job};
use crate::config::{ServingSettings, TrainerSettings};
use crate::plan::{Child, ChildRef, Children, Plan, PlannedEvent, spec_conditions};

/// Finished materialization Jobs kept for inspection.
pub const JOB_HISTORY: usize = 3;
pub const CONDITION_DRIFTED: &str = "Drifted";
pub const CONDITION_MATERIALIZED: &str = "Materialized";

/// A materialization Job as the plan sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRun {
    pub name: String,
    pub created: Timestamp,
    pub state: JobState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Running,
    /// Succeeded; its report, if its pod's termination message held one.
    Succeeded {
        finished: Timestamp,
        report: Option<MaterializationReport>,
    },
    Failed {
        message: String,
    },
}

pub struct Observed<'a> {
    pub view: &'a FeatureView,
    pub now: Timestamp,
    /// The view's materialization Jobs, newest first.
    pub jobs: &'a [JobRun],
    /// What a materialization Job's pod gets.
    pub trainer: &'a TrainerSettings,
    /// What the ingestion pod gets.
    pub serving: &'a ServingSettings,
}

/// The schedule's next time strictly after `after`: `@every <duration>`, `@hourly`-style macros, or five-field
/// cron (UTC).
pub fn next_run(schedule: &str, after: Timestamp) -> Result<Timestamp, String> {
    if let Some(every) = schedule.strip_prefix("@every ") {
        let period = flywheel_crds::common::parse_duration(every).map_err(|e| e.to_string())?;
        let period = jiff::SignedDuration::try_from(period).map_err(|e| e.to_string())?;
        if period.is_zero() {
            return Err("`@every` needs a positive period".into());
        }
        return after.checked_add(period).map_err(|e| e.to_string());
    }
    let cron = croner::Cron::from_str(schedule).map_err(|e| e.to_string())?;
    let zoned = after.to_zoned(jiff::tz::TimeZone::UTC);
    cron.find_next_occurrence(&zoned, false)
        .map(|next| next.timestamp())
        .map_err(|e| e.to_string())
}

/// A Job's name from the view's and the scheduled time (unique per run, stable across operator restarts).
pub fn job_name(view: &str, scheduled: Timestamp) -> String {
    let stem: String = view.chars().take(40).collect();
    format!("{stem}-m-{}", scheduled.as_second())
}

/// The status, Events and children of a view: a materialization Job when one is due, the finished Jobs beyond
/// the history limit to delete, and the ingestion Deployment applied (stream and online store) or deleted (no
/// stream).
pub fn plan(observed: &Observed<'_>) -> Result<Plan<FeatureViewStatus>, serde_json::Error> {
    let view = observed.view;
    let generation = view.metadata.generation;
    let mut status = view.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.entities_summary = Some(
        view.spec
            .entities
            .iter()
            .map(|e| e.join_key.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    status.feature_count = i64::try_from(view.spec.features.len()).ok();
    status.schema_hash = Some(view.spec.schema_hash());
    let validation = view.spec.validate();
    let valid = validation.is_ok();
    let mut events = spec_conditions(
        &mut status.conditions,
        &validation,
        generation,
        observed.now,
        (ConditionStatus::True, "SpecAccepted", "the spec is valid"),
    );
    let mut plan = Plan {
        status,
        events: Vec::new(),
        requeue: None,
        children: Children::default(),
        finalizer: None,
    };
    if !valid {
        plan.events = events;
        return Ok(plan);
    }
    record_newest_result(observed, &mut plan.status, &mut events);
    if view.spec.source.batch.is_some()
        && let Some((job_name, scheduled)) = schedule(observed, &mut plan, &mut events)
    {
        let job = materialization_job(view, &job_name, scheduled, observed.trainer)?;
        plan.children.apply.push(Child::of(&job)?);
    }
    plan.children.delete = observed
        .jobs
        .iter()
        .filter(|job| job.state != JobState::Running)
        .skip(JOB_HISTORY)
        .map(|job| ChildRef::of::<Job>(&job.name))
        .collect();
    let name = view.metadata.name.as_deref().unwrap_or_default();
    if view.spec.source.stream.is_some() && view.spec.online.is_some() {
        let ingest = ingest_deployment(view, observed.serving)?;
        plan.children.apply.push(Child::of(&ingest)?);
    } else if view.spec.source.stream.is_none() {
        plan.children
            .delete
            .push(ChildRef::of::<Deployment>(ingest_name(name)));
    }
    plan.events = events;
    Ok(plan)
}

/// Status from the newest finished Job: its run, statistics and drift, or why it failed.
fn record_newest_result(
    observed: &Observed<'_>,
    status: &mut FeatureViewStatus,
    events: &mut Vec<PlannedEvent>,
) {
    let generation = observed.view.metadata.generation;
    let now = observed.now;
    let Some(job) = observed
        .jobs
        .iter()
        .find(|job| job.state != JobState::Running)
    else {
        return;
    };
    let already = status
        .last_materialization
        .as_ref()
        .and_then(|run| run.job.as_deref())
        == Some(job.name.as_str());
    match &job.state {
        JobState::Running => {}
        JobState::Failed { message } => {
            let message = format!("Job {} failed: {}", job.name, message.trim());
            let was =
                flywheel_crds::common::find_condition(&status.conditions, CONDITION_MATERIALIZED)
                    .map(|c| c.message.clone());
            if was.as_deref() != Some(message.as_str()) {
                events.push(PlannedEvent {
                    warning: true,
                    reason: "MaterializationFailed",
                    action: "Materialize",
                    note: message.chars().take(1000).collect(),
                });
            }
            set_condition(
                &mut status.conditions,
                condition(
                    CONDITION_MATERIALIZED,
                    ConditionStatus::False,
                    "JobFailed",
                    message,
                    generation,
                    now,
                ),
            );
        }
        JobState::Succeeded { finished, report } => {
            let Some(report) = report else {
                set_condition(
                    &mut status.conditions,
                    condition(
                        CONDITION_MATERIALIZED,
                        ConditionStatus::Unknown,
                        "NoReport",
                        format!(
                            "Job {} succeeded without a report in its termination message",
                            job.name
                        ),
                        generation,
                        now,
                    ),
                );
                return;
            };
            if already {
                return;
            }
            status.last_materialization = Some(MaterializationRun {
                time: Time(*finished),
                rows: report.rows,
                entities_written: report.entities_written,
                duration_seconds: report.duration_seconds,
                watermark: report.watermark.clone().or_else(|| {
                    status
                        .last_materialization
                        .as_ref()
                        .and_then(|run| run.watermark.clone())
                }),
                job: Some(job.name.clone()),
            });
            if !report.statistics.is_empty() {
                status.statistics = report.statistics.clone();
            }
            set_condition(
                &mut status.conditions,
                condition(
                    CONDITION_MATERIALIZED,
                    ConditionStatus::True,
                    "Succeeded",
                    format!(
                        "{} rows, {} entities written by Job {}",
                        report.rows, report.entities_written, job.name
                    ),
                    generation,
                    now,
                ),
            );
            if report.rows == 0 {
                return;
            }
            status.drift = report.drift.clone();
            let drifted: Vec<String> = report
                .drift
                .iter()
                .filter(|d| d.drifted)
                .map(|d| match d.ks {
                    Some(ks) => format!("{} (PSI {:.3}, KS {:.3})", d.name, d.psi, ks),
                    None => format!("{} (PSI {:.3})", d.name, d.psi),
                })
                .collect();
            let (state, reason, message) = if drifted.is_empty() {
                (
                    ConditionStatus::False,
                    "WithinThresholds",
                    if report.baseline_created {
                        "this run's data is the drift baseline".to_owned()
                    } else {
                        "no feature drifted from the baseline".to_owned()
                    },
                )
            } else {
                (
                    ConditionStatus::True,
                    "FeatureDrift",
                    format!("drifted from the baseline: {}", drifted.join(", ")),
                )
            };
            let was_drifted =
                flywheel_crds::common::find_condition(&status.conditions, CONDITION_DRIFTED)
                    .is_some_and(|c| c.status == "True");
            if state == ConditionStatus::True && !was_drifted {
                events.push(PlannedEvent {
                    warning: true,
                    reason: "FeatureDrift",
                    action: "Materialize",
                    note: message.clone(),
                });
            }
            set_condition(
                &mut status.conditions,
                condition(CONDITION_DRIFTED, state, reason, message, generation, now),
            );
        }
    }
}

/// The materialization run due now (its Job's name and the scheduled time it stands for), and when to look
/// again.
fn schedule(
    observed: &Observed<'_>,
    plan: &mut Plan<FeatureViewStatus>,
    events: &mut Vec<PlannedEvent>,
) -> Option<(String, Timestamp)> {
    let view = observed.view;
    let name = view.metadata.name.as_deref().unwrap_or_default();
    if observed
        .jobs
        .iter()
        .any(|job| job.state == JobState::Running)
    {
        return None;
    }
    let newest = observed.jobs.first();
    let due = match (&view.spec.materialization, newest) {
        (_, None) => observed.now,
        (None, Some(_)) => return None,
        (Some(materialization), Some(job)) => {
            match next_run(&materialization.schedule, job.created) {
                Ok(next) => next,
                Err(error) => {
                    events.push(PlannedEvent {
                        warning: true,
                        reason: "InvalidSchedule",
                        action: "Schedule",
                        note: format!("spec.materialization.schedule: {error}"),
                    });
                    return None;
                }
            }
        }
    };
    if due > observed.now {
        plan.requeue = Some(wait_until(observed.now, due));
        return None;
    }
    if let Some(materialization) = &view.spec.materialization
        && let Ok(next) = next_run(&materialization.schedule, observed.now)
    {
        plan.requeue = Some(wait_until(observed.now, next));
    }
    Some((job_name(name, due), due))
}

fn wait_until(now: Timestamp, then: Timestamp) -> Duration {
    let seconds = (then.as_millisecond() - now.as_millisecond()).max(1_000) as u64;
    Duration::from_millis(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::{condition as condition_of, load};
    use flywheel_crds::featureview::FeatureDrift;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn view() -> FeatureView {
        let mut view: FeatureView = load("featureview.yaml", 4);
        view.metadata.namespace = Some("ml".into());
        view
    }

    fn serving() -> ServingSettings {
        ServingSettings {
            image: "flywheel-serving:test".into(),
            traffic_log_image: "flywheel-trainer:test".into(),
            storage_claim: None,
            storage_path: "/var/lib/flywheel".into(),
        }
    }

    fn plan_at(view: &FeatureView, now: Timestamp, jobs: &[JobRun]) -> Plan<FeatureViewStatus> {
        plan(&Observed {
            view,
            now,
            jobs,
            trainer: &TrainerSettings::default(),
            serving: &serving(),
        })
        .unwrap_or_else(|err| panic!("the children serialize: {err}"))
    }

    /// The materialization run the plan starts: its Job's name and scheduled time.
    fn run(planned: &Plan<FeatureViewStatus>) -> Option<(String, Timestamp)> {
        planned
            .children
            .apply
            .iter()
            .find(|child| child.resource.kind == "Job")
            .map(|job| {
                let scheduled = job
                    .object
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("flywheel.dev/scheduled-time"))
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(Timestamp::UNIX_EPOCH);
                (job.name().to_owned(), scheduled)
            })
    }

    fn ingests(planned: &Plan<FeatureViewStatus>) -> bool {
        planned
            .children
            .apply
            .iter()
            .any(|child| child.resource.kind == "Deployment" && child.name() == "ctr-events-ingest")
    }

    fn deleted(planned: &Plan<FeatureViewStatus>, kind: &str) -> Vec<String> {
        planned
            .children
            .delete
            .iter()
            .filter(|gone| gone.resource.kind == kind)
            .map(|gone| gone.name.clone())
            .collect()
    }

    fn report(drift: Vec<FeatureDrift>) -> MaterializationReport {
        MaterializationReport {
            rows: 1200,
            entities_written: 300,
            watermark: Some("2026-11-23T10:00:00.5Z".into()),
            duration_seconds: 1.5,
            schema_hash: "h".into(),
            drift,
            ..MaterializationReport::default()
        }
    }

    fn drift(name: &str, psi: f64, drifted: bool) -> FeatureDrift {
        FeatureDrift {
            name: name.into(),
            psi,
            ks: Some(0.1),
            drifted,
        }
    }

    #[test]
    fn a_new_view_materializes_at_once_and_runs_its_ingestion() {
        let view = view();
        let planned = plan_at(&view, at(1_000), &[]);
        assert_eq!(run(&planned), Some(("ctr-events-m-1000".into(), at(1_000))));
        assert!(
            ingests(&planned),
            "the view has a stream source and an online store"
        );
        assert_eq!(planned.status.schema_hash, Some(view.spec.schema_hash()));
        assert_eq!(condition_of(&planned.status.conditions, "Ready").0, "True");
        assert_eq!(planned.requeue, Some(Duration::from_secs(900)));
    }

    #[test]
    fn the_next_run_waits_for_the_schedule_and_for_the_running_one() {
        let view = view();
        let running = [JobRun {
            name: "a".into(),
            created: at(1_000),
            state: JobState::Running,
        }];
        let planned = plan_at(&view, at(5_000), &running);
        assert_eq!(run(&planned), None, "one run at a time");
        let done = [JobRun {
            name: "a".into(),
            created: at(1_000),
            state: JobState::Succeeded {
                finished: at(1_010),
                report: Some(report(vec![])),
            },
        }];
        let planned = plan_at(&view, at(1_500), &done);
        assert_eq!(run(&planned), None);
        assert_eq!(
            planned.requeue,
            Some(Duration::from_secs(400)),
            "due at 1000 + 15m"
        );
        let planned = plan_at(&view, at(1_900), &done);
        assert_eq!(run(&planned), Some(("ctr-events-m-1900".into(), at(1_900))));
    }

    #[test]
    fn a_finished_run_reports_its_materialization_and_drift() {
        let view = view();
        let jobs = [JobRun {
            name: "ctr-events-m-1000".into(),
            created: at(1_000),
            state: JobState::Succeeded {
                finished: at(1_010),
                report: Some(report(vec![
                    drift("ad_price", 0.6, true),
                    drift("user_age", 0.01, false),
                ])),
            },
        }];
        let planned = plan_at(&view, at(1_020), &jobs);
        let status = &planned.status;
        let run = status
            .last_materialization
            .clone()
            .unwrap_or_else(|| panic!("no run"));
        assert_eq!((run.rows, run.entities_written), (1200, 300));
        assert_eq!(run.watermark.as_deref(), Some("2026-11-23T10:00:00.5Z"));
        assert_eq!(run.job.as_deref(), Some("ctr-events-m-1000"));
        let (state, message, _) = condition_of(&status.conditions, CONDITION_DRIFTED);
        assert_eq!(state, "True");
        assert_eq!(
            message,
            "drifted from the baseline: ad_price (PSI 0.600, KS 0.100)"
        );
        assert_eq!(status.drift.len(), 2);
        assert!(planned.events.iter().any(|e| e.reason == "FeatureDrift"));
        // The next run reads after the watermark.
        let mut view = view;
        view.status = Some(status.clone());
        let job = materialization_job(&view, "j", at(2_000), &TrainerSettings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            job.spec
                .as_ref()
                .and_then(|spec| spec.active_deadline_seconds),
            Some(30 * 60),
            "a run is bounded by default"
        );
        if let Some(materialization) = view.spec.materialization.as_mut() {
            materialization.timeout = Some("5m".into());
        }
        let job = materialization_job(&view, "j", at(2_000), &TrainerSettings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            job.spec
                .as_ref()
                .and_then(|spec| spec.active_deadline_seconds),
            Some(5 * 60)
        );
        let env = serde_json::to_value(&job).unwrap_or_default()["spec"]["template"]["spec"]["containers"][0]["env"].clone();
        assert!(
            env.as_array()
                .into_iter()
                .flatten()
                .any(|e| e["name"] == "FLYWHEEL_SINCE" && e["value"] == "2026-11-23T10:00:00.5Z"),
            "{env}"
        );
    }

    #[test]
    fn a_failed_run_says_why_and_old_runs_are_pruned() {
        let view = view();
        let mut jobs = vec![JobRun {
            name: "newest".into(),
            created: at(5_000),
            state: JobState::Failed {
                message: "/data/events: column `price` is missing".into(),
            },
        }];
        for i in 0..4 {
            jobs.push(JobRun {
                name: format!("old-{i}"),
                created: at(4_000 - i),
                state: JobState::Succeeded {
                    finished: at(4_000 - i),
                    report: None,
                },
            });
        }
        let planned = plan_at(&view, at(5_010), &jobs);
        let (state, message, _) = condition_of(&planned.status.conditions, CONDITION_MATERIALIZED);
        assert_eq!(state, "False");
        assert_eq!(
            message,
            "Job newest failed: /data/events: column `price` is missing"
        );
        assert!(
            planned
                .events
                .iter()
                .any(|e| e.reason == "MaterializationFailed" && e.warning)
        );
        assert_eq!(deleted(&planned, "Job"), ["old-2", "old-3"]);
    }

    #[test]
    fn an_invalid_view_runs_nothing() {
        let mut view = view();
        view.spec.features[2].value_type = flywheel_crds::featureview::FeatureValueType::String;
        let planned = plan_at(&view, at(1_000), &[]);
        let (state, message, _) = condition_of(&planned.status.conditions, "InvalidSpec");
        assert_eq!(state, "True");
        assert!(
            message
                .starts_with("spec.features[2].valueType: is String but the feature yields Int64"),
            "{message}"
        );
        assert_eq!((run(&planned), ingests(&planned)), (None, false));
    }

    #[test]
    fn a_view_without_a_stream_deletes_its_ingestion_and_starts_none() {
        let mut view = view();
        view.spec.source.stream = None;
        let planned = plan_at(&view, at(1_000), &[]);
        assert!(!ingests(&planned));
        assert_eq!(deleted(&planned, "Deployment"), ["ctr-events-ingest"]);
    }

    #[test]
    fn schedules() {
        assert_eq!(next_run("@every 15m", at(100)), Ok(at(1_000)));
        assert_eq!(next_run("*/15 * * * *", at(100)), Ok(at(900)));
        assert_eq!(next_run("@hourly", at(100)), Ok(at(3_600)));
        assert!(next_run("61 * * * *", at(0)).is_err());
    }
}
