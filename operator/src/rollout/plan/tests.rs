//! The Rollout plan, step by step, with no server.

use super::*;
use crate::config::ServingSettings;
use crate::plan::examples::load;
use crate::rollout::analysis::Verdict;
use crate::rollout::online::OnlineView;
use flywheel_crds::ModelVersion;
use flywheel_crds::modelversion::ModelVersionPhase;
use flywheel_crds::modelversion::ModelVersionStatus;
use flywheel_crds::rollout::{Analysis, AnalysisMetric, BuiltinMetric};
use flywheel_crds::rollout::{MeasurementVerdict, OnError};

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn version(name: &str, phase: ModelVersionPhase) -> ModelVersion {
    let mut version: ModelVersion = load("modelversion.yaml", 1);
    version.metadata.name = Some(name.into());
    version.status = Some(ModelVersionStatus {
        phase: Some(phase),
        ..ModelVersionStatus::default()
    });
    version
}

/// A rollout of `target` over a stable `ctr-v1`, default steps, analysis every 10 s, 2 rounds per step.
fn rollout(target: &str) -> Rollout {
    let mut rollout: Rollout = load("rollout.yaml", 1);
    rollout.spec.model_version = target.into();
    rollout.spec.strategy.canary.steps.clear();
    rollout.spec.analysis = Some(Analysis {
        prometheus: "http://prometheus:9090".into(),
        prometheus_secret: None,
        tenant: None,
        interval: "10s".into(),
        initial_delay: None,
        count: 2,
        min_samples: 100,
        failure_limit: 0,
        inconclusive_limit: 1,
        consecutive_error_limit: 2,
        on_error: None,
        metrics: vec![AnalysisMetric {
            name: "auc-drop".into(),
            builtin: Some(BuiltinMetric::AucDrop),
            query: None,
            min: None,
            max: Some(0.005),
        }],
    });
    rollout.status = Some(RolloutStatus {
        stable_version: Some("ctr-v1".into()),
        phase: Some(RolloutPhase::Healthy),
        ..RolloutStatus::default()
    });
    rollout
}

fn round(verdict: MeasurementVerdict, value: f64) -> Option<Vec<(String, Verdict)>> {
    Some(vec![(
        "auc-drop".into(),
        Verdict {
            value: Some(value),
            verdict,
            message: format!("auc-drop = {value}"),
        },
    )])
}

/// Plans once and stores the status back, like the controller does; the canary's pods are available.
fn step(
    rollout: &mut Rollout,
    target: &ModelVersion,
    analysis: Option<Vec<(String, Verdict)>>,
    firing: &[&str],
    now: Timestamp,
) -> RolloutPlan {
    let available = VersionPods {
        desired: 1,
        available: 1,
        problems: Vec::new(),
    };
    step_with(rollout, target, analysis, firing, Some(available), now)
}

fn step_with(
    rollout: &mut Rollout,
    target: &ModelVersion,
    analysis: Option<Vec<(String, Verdict)>>,
    firing: &[&str],
    canary_pods: Option<VersionPods>,
    now: Timestamp,
) -> RolloutPlan {
    let planned = plan(&Observed {
        rollout,
        target: Some(target),
        analysis,
        firing: firing.iter().map(|s| s.to_string()).collect(),
        online: OnlineView::NotNamed,
        drifted_routers: Vec::new(),
        canary_pods,
        stable_pods: Some(VersionPods {
            desired: 1,
            available: 1,
            problems: Vec::new(),
        }),
        traffic_log_pods: None,
        versions: &[],
        owned: &[],
        serving: &serving(),
        credentials_digest: "d",
        now,
    })
    .unwrap_or_else(|err| panic!("the children serialize: {err}"));
    rollout.status = Some(planned.plan.status.clone());
    planned
}

fn serving() -> ServingSettings {
    ServingSettings {
        image: "flywheel-serving:test".into(),
        traffic_log_image: "flywheel-trainer:test".into(),
        storage_claim: None,
        storage_path: "/var/lib/flywheel".into(),
    }
}

fn status(rollout: &Rollout) -> RolloutStatus {
    rollout.status.clone().unwrap_or_default()
}

#[test]
fn a_drifted_router_is_reported_and_restored_without_touching_the_state() {
    let rollout = rollout("ctr-v1");
    let target = version("ctr-v1", ModelVersionPhase::Validated);
    let observe = |drifted: Vec<String>| {
        plan(&Observed {
            rollout: &rollout,
            target: Some(&target),
            analysis: None,
            firing: Vec::new(),
            online: OnlineView::NotNamed,
            drifted_routers: drifted,
            canary_pods: None,
            stable_pods: None,
            traffic_log_pods: None,
            versions: &[],
            owned: &[],
            serving: &serving(),
            credentials_digest: "d",
            now: at(0),
        })
        .unwrap_or_else(|err| panic!("the children serialize: {err}"))
    };
    let steady = observe(Vec::new());
    assert!(steady.push_routes.is_none());
    assert!(
        steady
            .plan
            .events
            .iter()
            .all(|e| e.reason != "RoutesDrifted")
    );
    let drifted = observe(vec!["ctr-router-7d9f".into()]);
    assert!(drifted.push_routes.is_some());
    assert_eq!(drifted.plan.status, steady.plan.status);
    let event = drifted
        .plan
        .events
        .iter()
        .find(|e| e.reason == "RoutesDrifted")
        .map(|e| (e.warning, e.note.clone()));
    assert!(
        matches!(&event, Some((true, note)) if note.contains("ctr-router-7d9f")),
        "{event:?}"
    );
}

#[test]
fn ready_means_the_stable_version_serves_from_every_replica() {
    let rollout = rollout("ctr-v1");
    let target = version("ctr-v1", ModelVersionPhase::Validated);
    let ready_with = |stable_pods: Option<VersionPods>| {
        let planned = plan(&Observed {
            rollout: &rollout,
            target: Some(&target),
            analysis: None,
            firing: Vec::new(),
            online: OnlineView::NotNamed,
            drifted_routers: Vec::new(),
            canary_pods: None,
            stable_pods,
            traffic_log_pods: None,
            versions: &[],
            owned: &[],
            serving: &serving(),
            credentials_digest: "d",
            now: at(0),
        })
        .unwrap_or_else(|err| panic!("the children serialize: {err}"));
        let ready = planned
            .plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status.clone(), c.message.clone()));
        (ready, planned.plan.requeue)
    };
    let (ready, requeue) = ready_with(None);
    assert_eq!(
        ready,
        Some((
            "False".to_owned(),
            "ctr-v1: its Deployment does not exist yet".to_owned()
        ))
    );
    assert_eq!(requeue, Some(WAIT_REQUEUE));
    let crashing = VersionPods {
        desired: 2,
        available: 1,
        problems: vec!["ctr-ctr-v1-abc: CrashLoopBackOff after 3 restarts".into()],
    };
    let (ready, _) = ready_with(Some(crashing));
    assert!(
        ready
            .as_ref()
            .is_some_and(|(status, message)| status == "False"
                && message.contains("1/2 pods available; ctr-ctr-v1-abc: CrashLoopBackOff")),
        "{ready:?}"
    );
    let serving = VersionPods {
        desired: 2,
        available: 2,
        problems: Vec::new(),
    };
    let (ready, _) = ready_with(Some(serving));
    assert_eq!(
        ready,
        Some(("True".to_owned(), "serving ctr-v1".to_owned()))
    );
}

#[test]
fn the_first_validated_version_is_served_directly() {
    let mut rollout = rollout("ctr-v1");
    rollout.status = None;
    let target = version("ctr-v1", ModelVersionPhase::Validated);
    step(&mut rollout, &target, None, &[], at(0));
    let s = status(&rollout);
    assert_eq!(
        (s.stable_version.as_deref(), s.phase),
        (Some("ctr-v1"), Some(RolloutPhase::Healthy))
    );
}

#[test]
fn a_good_canary_walks_every_step_and_becomes_stable() {
    let mut rollout = rollout("ctr-v2");
    let target = version("ctr-v2", ModelVersionPhase::Validated);
    step(&mut rollout, &target, None, &[], at(0));
    let mut weights = vec![status(&rollout).canary_weight];
    assert_eq!(status(&rollout).phase, Some(RolloutPhase::Progressing));
    let mut now = 0;
    while status(&rollout).canary_version.is_some() {
        now += 10;
        assert!(analysis_due(&rollout, at(now)), "analysis due at {now}");
        step(
            &mut rollout,
            &target,
            round(MeasurementVerdict::Successful, 0.001),
            &[],
            at(now),
        );
        weights.push(status(&rollout).canary_weight);
        assert!(now < 200, "never finished: {:?}", status(&rollout));
    }
    weights.dedup();
    assert_eq!(weights, vec![1, 5, 20, 100, 0]);
    let s = status(&rollout);
    assert_eq!(
        (s.stable_version.as_deref(), s.phase),
        (Some("ctr-v2"), Some(RolloutPhase::Healthy))
    );
    assert_eq!(s.measurements.len(), 8, "2 rounds x 4 steps");
}

#[test]
fn a_failing_round_aborts_at_once_and_stays_degraded() {
    let mut rollout = rollout("ctr-v2");
    let target = version("ctr-v2", ModelVersionPhase::Validated);
    step(&mut rollout, &target, None, &[], at(0));
    let planned = step(
        &mut rollout,
        &target,
        round(MeasurementVerdict::Failed, 0.02),
        &[],
        at(10),
    );
    assert!(planned.aborted.is_some());
    let s = status(&rollout);
    assert_eq!(
        (s.phase, s.canary_weight),
        (Some(RolloutPhase::Degraded), 0)
    );
    assert!(
        s.abort_reason
            .as_deref()
            .unwrap_or_default()
            .contains("auc-drop = 0.02")
    );
    assert!(
        planned
            .plan
            .events
            .iter()
            .any(|e| e.reason == "Aborted" && e.warning)
    );
    assert!(!analysis_due(&rollout, at(100)));
    step(&mut rollout, &target, None, &[], at(20));
    assert_eq!(
        status(&rollout).phase,
        Some(RolloutPhase::Degraded),
        "no new progression of the same version"
    );
    rollout.metadata.annotations =
        Some([(ACTION_ANNOTATION.to_owned(), "retry".to_owned())].into());
    step(&mut rollout, &target, None, &[], at(30));
    let s = status(&rollout);
    assert_eq!(
        (s.phase, s.canary_weight, s.failed_measurements),
        (Some(RolloutPhase::Progressing), 1, 0)
    );
}

#[test]
fn too_few_samples_pause_and_never_roll_back() {
    let mut rollout = rollout("ctr-v2");
    let target = version("ctr-v2", ModelVersionPhase::Validated);
    step(&mut rollout, &target, None, &[], at(0));
    step(
        &mut rollout,
        &target,
        round(MeasurementVerdict::Inconclusive, 0.0),
        &[],
        at(10),
    );
    assert_eq!(status(&rollout).phase, Some(RolloutPhase::Progressing));
    let planned = step(
        &mut rollout,
        &target,
        round(MeasurementVerdict::Inconclusive, 0.0),
        &[],
        at(20),
    );
    assert!(planned.aborted.is_none());
    let s = status(&rollout);
    assert_eq!((s.phase, s.canary_weight), (Some(RolloutPhase::Paused), 1));
    assert!(
        s.pause_reason
            .as_deref()
            .unwrap_or_default()
            .contains("inconclusive 2 times")
    );
    assert!(
        !analysis_due(&rollout, at(100)),
        "a halted analysis waits for a human"
    );
}

#[test]
fn analysis_errors_beyond_the_limit_abort_unless_on_error_says_pause() {
    for (on_error, phase) in [
        (None, RolloutPhase::Degraded),
        (Some(OnError::Abort), RolloutPhase::Degraded),
        (Some(OnError::Pause), RolloutPhase::Paused),
    ] {
        let mut rollout = rollout("ctr-v2");
        if let Some(analysis) = rollout.spec.analysis.as_mut() {
            analysis.on_error = on_error;
        }
        let target = version("ctr-v2", ModelVersionPhase::Validated);
        step(&mut rollout, &target, None, &[], at(0));
        let mut last = None;
        for round_index in 1..=3 {
            last = Some(step(
                &mut rollout,
                &target,
                round(MeasurementVerdict::Error, f64::NAN),
                &[],
                at(10 * round_index),
            ));
        }
        let s = status(&rollout);
        assert_eq!(s.phase, Some(phase), "onError {on_error:?}");
        let expected_weight = if phase == RolloutPhase::Degraded {
            0
        } else {
            1
        };
        assert_eq!(s.canary_weight, expected_weight);
        assert_eq!(
            last.and_then(|p| p.aborted).is_some(),
            phase == RolloutPhase::Degraded
        );
    }
}

#[test]
fn the_weight_moves_only_when_every_canary_pod_is_available() {
    let mut rollout = rollout("ctr-v2");
    let target = version("ctr-v2", ModelVersionPhase::Validated);
    let starting = VersionPods {
        desired: 2,
        available: 1,
        problems: vec!["ctr-ctr-v2-abc: ContainerCreating after 0 restarts".into()],
    };
    let planned = step_with(&mut rollout, &target, None, &[], None, at(0));
    assert_eq!(planned.plan.requeue, Some(WAIT_REQUEUE));
    step_with(&mut rollout, &target, None, &[], Some(starting), at(5));
    let s = status(&rollout);
    assert_eq!(
        (s.phase, s.canary_weight),
        (Some(RolloutPhase::Progressing), 0)
    );
    assert!(
        s.waiting_for
            .as_deref()
            .is_some_and(|w| w.contains("1/2 pods available; ctr-ctr-v2-abc")),
        "{:?}",
        s.waiting_for
    );
    let ready = VersionPods {
        desired: 2,
        available: 2,
        problems: Vec::new(),
    };
    step_with(&mut rollout, &target, None, &[], Some(ready), at(6));
    let s = status(&rollout);
    assert_eq!((s.canary_weight, s.waiting_for), (1, None));
}

#[test]
fn a_canary_that_never_becomes_available_is_aborted_at_its_progress_deadline() {
    let mut rollout = rollout("ctr-v2");
    rollout.spec.strategy.canary.progress_deadline = Some("2m".into());
    let target = version("ctr-v2", ModelVersionPhase::Validated);
    let crashing = || VersionPods {
        desired: 1,
        available: 0,
        problems: vec!["ctr-ctr-v2-abc: CrashLoopBackOff after 5 restarts".into()],
    };
    step_with(&mut rollout, &target, None, &[], Some(crashing()), at(0));
    let planned = step_with(&mut rollout, &target, None, &[], Some(crashing()), at(119));
    assert!(planned.aborted.is_none());
    let planned = step_with(&mut rollout, &target, None, &[], Some(crashing()), at(120));
    let s = status(&rollout);
    assert_eq!(
        (s.phase, s.canary_weight),
        (Some(RolloutPhase::Degraded), 0)
    );
    assert_eq!(
        planned.aborted.as_deref(),
        Some(
            "ctr-v2 did not become available within the progress deadline (2m): 0/1 pods available; \
             ctr-ctr-v2-abc: CrashLoopBackOff after 5 restarts"
        )
    );
}

#[test]
fn a_firing_alert_aborts_without_waiting_for_analysis() {
    let mut rollout = rollout("ctr-v2");
    let target = version("ctr-v2", ModelVersionPhase::Validated);
    step(&mut rollout, &target, None, &[], at(0));
    step(&mut rollout, &target, None, &["SomethingElse"], at(1));
    assert_eq!(
        status(&rollout).phase,
        Some(RolloutPhase::Progressing),
        "only configured alerts count"
    );
    let planned = step(
        &mut rollout,
        &target,
        None,
        &["FlywheelCalibrationDeviation"],
        at(2),
    );
    assert_eq!(
        planned.aborted.as_deref(),
        Some("alert FlywheelCalibrationDeviation is firing")
    );
    assert_eq!(status(&rollout).canary_weight, 0);
}

#[test]
fn only_validated_versions_start_a_progression() {
    let mut rollout = rollout("ctr-v2");
    let target = version("ctr-v2", ModelVersionPhase::Rejected);
    step(&mut rollout, &target, None, &[], at(0));
    let s = status(&rollout);
    assert_eq!(
        (s.canary_version, s.phase),
        (None, Some(RolloutPhase::Healthy))
    );
    assert!(
        s.pause_reason
            .as_deref()
            .unwrap_or_default()
            .contains("Rejected")
    );
}

#[test]
fn a_pause_without_duration_waits_for_promote() {
    let mut rollout = rollout("ctr-v2");
    rollout.spec.analysis = None;
    rollout.spec.strategy.canary.steps = vec![
        CanaryStep::SetWeight(10),
        CanaryStep::Pause(flywheel_crds::rollout::Pause { duration: None }),
        CanaryStep::SetWeight(100),
    ];
    let target = version("ctr-v2", ModelVersionPhase::Validated);
    step(&mut rollout, &target, None, &[], at(0));
    step(&mut rollout, &target, None, &[], at(5));
    let s = status(&rollout);
    assert_eq!((s.phase, s.canary_weight), (Some(RolloutPhase::Paused), 10));
    rollout.metadata.annotations =
        Some([(ACTION_ANNOTATION.to_owned(), "promote".to_owned())].into());
    step(&mut rollout, &target, None, &[], at(6));
    let s = status(&rollout);
    assert_eq!(
        (s.stable_version.as_deref(), s.phase),
        (Some("ctr-v2"), Some(RolloutPhase::Healthy))
    );
    assert_eq!(s.last_action.as_deref(), Some("promote"));
}

#[test]
fn the_traffic_logged_condition_follows_the_sink_and_warns_when_it_stops() {
    use flywheel_crds::rollout::{Feedback, TrafficLog};
    let target: ModelVersion = load("modelversion.yaml", 1);
    let mut rollout: Rollout = load("rollout.yaml", 1);
    let sink = |rollout: &Rollout, pods: Option<VersionPods>| {
        plan(&Observed {
            rollout,
            target: Some(&target),
            analysis: None,
            firing: Vec::new(),
            online: OnlineView::NotNamed,
            drifted_routers: Vec::new(),
            canary_pods: None,
            stable_pods: None,
            traffic_log_pods: pods,
            versions: &[],
            owned: &[],
            serving: &serving(),
            credentials_digest: "d",
            now: Timestamp::UNIX_EPOCH,
        })
        .unwrap_or_else(|err| panic!("{err}"))
        .plan
    };
    let logged = |plan: &Plan<RolloutStatus>| {
        plan.status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_TRAFFIC_LOGGED)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    assert_eq!(
        logged(&sink(&rollout, None)),
        None,
        "no trafficLog, no condition"
    );

    rollout.spec.feedback = Some(Feedback {
        brokers: vec!["kafka:9092".into()],
        clicks_topic: Some("clicks".into()),
        prediction_log_topic: Some("predictions".into()),
        traffic_log: Some(TrafficLog {
            uri: "file:///var/lib/flywheel/traffic/ctr".into(),
            flush_interval: None,
        }),
        security: None,
    });
    let running = VersionPods {
        desired: 1,
        available: 1,
        problems: Vec::new(),
    };
    let first = sink(&rollout, Some(running));
    assert_eq!(
        logged(&first),
        Some(("True".to_owned(), "Logging".to_owned()))
    );
    rollout.status = Some(first.status);
    let failing = VersionPods {
        desired: 1,
        available: 0,
        problems: vec![
            "ctr-traffic-log-x: CrashLoopBackOff after 2 restarts, last exit code 1".into(),
        ],
    };
    let stopped = sink(&rollout, Some(failing));
    assert_eq!(
        logged(&stopped),
        Some(("False".to_owned(), "SinkUnavailable".to_owned()))
    );
    let message = stopped
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_TRAFFIC_LOGGED)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("CrashLoopBackOff"), "{message}");
    assert!(
        stopped
            .events
            .iter()
            .any(|e| e.warning && e.reason == "TrafficLogStopped"),
        "{:?}",
        stopped.events
    );
    rollout.status = Some(stopped.status);
    let still = sink(&rollout, None);
    assert!(
        still.events.iter().all(|e| e.reason != "TrafficLogStopped"),
        "warned once, when it stopped"
    );
}
