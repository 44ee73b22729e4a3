//! Gang admission under a `GPUQuota`: which TrainingJobs may run (all their pods or none), which wait and in
//! what order, and which the quota can never admit.
//!
//! Order is priority (higher first), then creation time, then name. A waiting job that does not fit does not
//! block smaller jobs behind it (Kueue's `BestEffortFIFO`). Admitted jobs stay admitted while they run, even
//! when the quota shrinks; only preemption (when the quota's policy allows it) takes GPUs back, and it takes
//! them from the lowest-priority, most recently created jobs first, never more jobs than the preemptor needs.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use flywheel_crds::gpuquota::{GPUQuotaSpec, JobRef, PreemptionMode};
use jiff::Timestamp;

/// How a preempted job's queue reason starts, for as long as it waits.
const PREEMPTED: &str = "preempted by ";

/// A TrainingJob that names the quota and is waiting or running.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub priority: i32,
    pub created: Timestamp,
    /// GPUs the whole gang asks for: resource name and count. CPU-only jobs still count towards
    /// `maxConcurrentJobs`.
    pub demand: Option<(String, u64)>,
    pub namespace_covered: bool,
}

impl Candidate {
    fn reference(&self, reason: Option<String>) -> JobRef {
        JobRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: Some(self.uid.clone()),
            reason,
        }
    }

    fn is(&self, job: &JobRef) -> bool {
        job.namespace == self.namespace
            && job.name == self.name
            && job.uid.as_deref().is_none_or(|uid| uid == self.uid)
    }

    fn order_key(&self) -> (Reverse<i32>, Timestamp, &str, &str) {
        (
            Reverse(self.priority),
            self.created,
            self.namespace.as_str(),
            self.name.as_str(),
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub admitted: Vec<JobRef>,
    /// In admission order; each with why it waits.
    pub queued: Vec<JobRef>,
    pub rejected: Vec<JobRef>,
    /// Jobs admitted before that give their GPUs to a higher-priority job now: (victim, preemptor).
    pub preempted: Vec<(JobRef, JobRef)>,
    /// GPUs held by admitted jobs, per resource (every limited resource listed, zero included).
    pub used: BTreeMap<String, u64>,
}

/// Decides admission for `candidates` given who was admitted before, and who was queued (a preempted job
/// keeps saying so while it waits).
pub fn decide(
    quota_name: &str,
    spec: &GPUQuotaSpec,
    previously_admitted: &[JobRef],
    previously_queued: &[JobRef],
    candidates: &[Candidate],
) -> Decision {
    let mut decision = Decision {
        used: spec
            .limits
            .iter()
            .map(|limit| (limit.resource.clone(), 0))
            .collect(),
        ..Decision::default()
    };
    let mut eligible = Vec::new();
    for candidate in candidates {
        match rejection(quota_name, spec, candidate) {
            Some(reason) => decision.rejected.push(candidate.reference(Some(reason))),
            None => eligible.push(candidate),
        }
    }
    // Running jobs first, in the order they were admitted.
    let mut admitted: Vec<&Candidate> = previously_admitted
        .iter()
        .filter_map(|job| eligible.iter().copied().find(|c| c.is(job)))
        .collect();
    let mut pending: Vec<&Candidate> = eligible
        .iter()
        .copied()
        .filter(|c| !admitted.iter().any(|a| std::ptr::eq(*a, *c)))
        .collect();
    pending.sort_by(|a, b| a.order_key().cmp(&b.order_key()));

    let mut waiting: Vec<&Candidate> = Vec::new();
    let mut preempted: Vec<(&Candidate, &Candidate)> = Vec::new();
    for candidate in pending {
        if fits(spec, &admitted, candidate) {
            admitted.push(candidate);
            continue;
        }
        if spec.preemption.policy == PreemptionMode::LowerPriority
            && let Some(victims) = victims_for(spec, &admitted, candidate)
        {
            admitted.retain(|a| !victims.iter().any(|v| std::ptr::eq(*a, *v)));
            admitted.push(candidate);
            preempted.extend(victims.iter().map(|victim| (*victim, candidate)));
            waiting.extend(victims);
            continue;
        }
        waiting.push(candidate);
    }
    waiting.sort_by(|a, b| a.order_key().cmp(&b.order_key()));

    for job in &admitted {
        if let Some((resource, count)) = &job.demand {
            *decision.used.entry(resource.clone()).or_default() += count;
        }
    }
    decision.queued = waiting
        .iter()
        .map(|job| {
            let waiting = wait_reason(spec, &admitted, &decision.used, job);
            let preemption = match preempted
                .iter()
                .find(|(victim, _)| std::ptr::eq(*victim, *job))
            {
                Some((_, by)) => Some(format!(
                    "{PREEMPTED}{}/{} (priority {})",
                    by.namespace, by.name, by.priority
                )),
                None => previously_queued
                    .iter()
                    .find(|queued| job.is(queued))
                    .and_then(|queued| queued.reason.as_deref())
                    .and_then(|reason| reason.split("; ").next())
                    .filter(|reason| reason.starts_with(PREEMPTED))
                    .map(str::to_owned),
            };
            let reason = match preemption {
                Some(preemption) => format!("{preemption}; {waiting}"),
                None => waiting,
            };
            job.reference(Some(reason))
        })
        .collect();
    decision.admitted = admitted.iter().map(|job| job.reference(None)).collect();
    decision.preempted = preempted
        .iter()
        .map(|(victim, by)| (victim.reference(None), by.reference(None)))
        .collect();
    decision
}

/// Why the quota can never admit this job, if it cannot.
fn rejection(quota_name: &str, spec: &GPUQuotaSpec, candidate: &Candidate) -> Option<String> {
    if !candidate.namespace_covered {
        return Some(format!(
            "namespace `{}` is not covered by GPUQuota `{quota_name}`",
            candidate.namespace
        ));
    }
    let (resource, count) = candidate.demand.as_ref()?;
    match spec.limit_of(resource) {
        None => Some(format!(
            "GPUQuota `{quota_name}` has no limit for `{resource}`"
        )),
        Some(limit) if *count > u64::from(limit) => Some(format!(
            "the gang needs {count} {resource}; GPUQuota `{quota_name}` allows at most {limit}"
        )),
        Some(_) => None,
    }
}

fn in_use(admitted: &[&Candidate], resource: &str) -> u64 {
    admitted
        .iter()
        .filter_map(|job| job.demand.as_ref())
        .filter(|(r, _)| r == resource)
        .map(|(_, count)| count)
        .sum()
}

fn fits(spec: &GPUQuotaSpec, admitted: &[&Candidate], candidate: &Candidate) -> bool {
    if spec
        .max_concurrent_jobs
        .is_some_and(|max| admitted.len() >= max as usize)
    {
        return false;
    }
    match &candidate.demand {
        None => true,
        Some((resource, count)) => spec
            .limit_of(resource)
            .is_some_and(|limit| in_use(admitted, resource) + count <= u64::from(limit)),
    }
}

/// The fewest lower-priority jobs whose eviction lets `candidate` fit: lowest priority first, newest first
/// among equals. `None` when evicting every lower-priority job would still not be enough.
fn victims_for<'a>(
    spec: &GPUQuotaSpec,
    admitted: &[&'a Candidate],
    candidate: &Candidate,
) -> Option<Vec<&'a Candidate>> {
    let mut evictable: Vec<&Candidate> = admitted
        .iter()
        .copied()
        .filter(|job| job.priority < candidate.priority)
        .collect();
    evictable.sort_by_key(|job| (job.priority, Reverse(job.created)));
    let mut remaining: Vec<&Candidate> = admitted.to_vec();
    let mut victims = Vec::new();
    for victim in evictable {
        if fits(spec, &remaining, candidate) {
            break;
        }
        // Evicting a job that holds none of the resource the candidate lacks helps only with maxConcurrentJobs.
        let helps = match (&candidate.demand, &victim.demand) {
            (Some((wanted, _)), Some((held, _))) => wanted == held,
            _ => false,
        } || spec
            .max_concurrent_jobs
            .is_some_and(|max| remaining.len() >= max as usize);
        if !helps {
            continue;
        }
        remaining.retain(|job| !std::ptr::eq(*job, victim));
        victims.push(victim);
    }
    fits(spec, &remaining, candidate).then_some(victims)
}

fn wait_reason(
    spec: &GPUQuotaSpec,
    admitted: &[&Candidate],
    used: &BTreeMap<String, u64>,
    job: &Candidate,
) -> String {
    if let Some(max) = spec.max_concurrent_jobs
        && admitted.len() >= max as usize
    {
        return format!("maxConcurrentJobs ({max}) jobs are running");
    }
    match &job.demand {
        Some((resource, count)) => format!(
            "waiting for {count} {resource}: {} of {} in use",
            used.get(resource).copied().unwrap_or_default(),
            spec.limit_of(resource).unwrap_or_default()
        ),
        None => "waiting for a free job slot".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_crds::gpuquota::{GpuLimit, NamespaceScope, PreemptionPolicy};

    fn quota(gpus: u32, max_jobs: Option<u32>, preemption: PreemptionMode) -> GPUQuotaSpec {
        GPUQuotaSpec {
            namespaces: NamespaceScope {
                names: vec!["team".into()],
                selector: None,
            },
            limits: vec![GpuLimit {
                resource: "nvidia.com/gpu".into(),
                count: gpus,
            }],
            max_concurrent_jobs: max_jobs,
            preemption: PreemptionPolicy { policy: preemption },
            isolation: Default::default(),
        }
    }

    fn job(name: &str, priority: i32, created_second: i64, gpus: u64) -> Candidate {
        Candidate {
            namespace: "team".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            priority,
            created: Timestamp::from_second(created_second).unwrap_or(Timestamp::UNIX_EPOCH),
            demand: (gpus > 0).then(|| ("nvidia.com/gpu".to_owned(), gpus)),
            namespace_covered: true,
        }
    }

    fn names(jobs: &[JobRef]) -> Vec<&str> {
        jobs.iter().map(|job| job.name.as_str()).collect()
    }

    #[test]
    fn three_jobs_of_four_under_eight_admit_the_first_two() {
        let spec = quota(8, None, PreemptionMode::Never);
        let jobs = [job("a", 0, 1, 4), job("b", 0, 2, 4), job("c", 0, 3, 4)];
        let decision = decide("q", &spec, &[], &[], &jobs);
        assert_eq!(names(&decision.admitted), ["a", "b"]);
        assert_eq!(names(&decision.queued), ["c"]);
        assert_eq!(
            decision.queued[0].reason.as_deref(),
            Some("waiting for 4 nvidia.com/gpu: 8 of 8 in use")
        );
        assert_eq!(decision.used["nvidia.com/gpu"], 8);
    }

    #[test]
    fn a_finished_job_frees_its_gpus_for_the_next_in_line() {
        let spec = quota(8, None, PreemptionMode::Never);
        let first = decide(
            "q",
            &spec,
            &[],
            &[],
            &[job("a", 0, 1, 4), job("b", 0, 2, 4), job("c", 0, 3, 4)],
        );
        // `a` finished: it is no longer a candidate.
        let second = decide(
            "q",
            &spec,
            &first.admitted,
            &[],
            &[job("b", 0, 2, 4), job("c", 0, 3, 4)],
        );
        assert_eq!(names(&second.admitted), ["b", "c"]);
        assert!(second.queued.is_empty());
    }

    #[test]
    fn priority_orders_the_queue_before_creation_time() {
        let spec = quota(4, None, PreemptionMode::Never);
        let jobs = [
            job("old", 0, 1, 4),
            job("urgent", 5, 9, 4),
            job("mid", 1, 5, 4),
        ];
        let decision = decide("q", &spec, &[], &[], &jobs);
        assert_eq!(names(&decision.admitted), ["urgent"]);
        assert_eq!(names(&decision.queued), ["mid", "old"]);
    }

    #[test]
    fn admitted_jobs_keep_running_without_preemption() {
        let spec = quota(8, None, PreemptionMode::Never);
        let before = decide(
            "q",
            &spec,
            &[],
            &[],
            &[job("a", 0, 1, 4), job("b", 0, 2, 4)],
        );
        let jobs = [job("a", 0, 1, 4), job("b", 0, 2, 4), job("vip", 100, 3, 4)];
        let decision = decide("q", &spec, &before.admitted, &[], &jobs);
        assert_eq!(names(&decision.admitted), ["a", "b"]);
        assert_eq!(names(&decision.queued), ["vip"]);
        assert!(decision.preempted.is_empty());
    }

    #[test]
    fn preemption_evicts_the_newest_lowest_priority_job_only() {
        let spec = quota(8, None, PreemptionMode::LowerPriority);
        let before = decide(
            "q",
            &spec,
            &[],
            &[],
            &[job("a", 0, 1, 4), job("b", 0, 2, 4)],
        );
        let jobs = [job("a", 0, 1, 4), job("b", 0, 2, 4), job("vip", 100, 3, 4)];
        let decision = decide("q", &spec, &before.admitted, &[], &jobs);
        assert_eq!(names(&decision.admitted), ["a", "vip"]);
        assert_eq!(names(&decision.queued), ["b"]);
        assert_eq!(
            decision.queued[0].reason.as_deref(),
            Some(
                "preempted by team/vip (priority 100); waiting for 4 nvidia.com/gpu: 8 of 8 in use"
            )
        );
        assert_eq!(decision.preempted.len(), 1);
        assert_eq!(decision.preempted[0].0.name, "b");
        // Still waiting later: it still says it was preempted, and why it waits now.
        let later = decide("q", &spec, &decision.admitted, &decision.queued, &jobs);
        assert_eq!(later.queued, decision.queued);
    }

    #[test]
    fn preemption_never_evicts_equal_or_higher_priority() {
        let spec = quota(4, None, PreemptionMode::LowerPriority);
        let before = decide("q", &spec, &[], &[], &[job("a", 10, 1, 4)]);
        let decision = decide(
            "q",
            &spec,
            &before.admitted,
            &[],
            &[job("a", 10, 1, 4), job("b", 10, 2, 4)],
        );
        assert_eq!(names(&decision.admitted), ["a"]);
        assert!(decision.preempted.is_empty());
    }

    #[test]
    fn a_big_job_waiting_does_not_block_a_small_one_behind_it() {
        let spec = quota(8, None, PreemptionMode::Never);
        let before = decide("q", &spec, &[], &[], &[job("a", 0, 1, 4)]);
        let jobs = [
            job("a", 0, 1, 4),
            job("big", 0, 2, 8),
            job("small", 0, 3, 2),
        ];
        let decision = decide("q", &spec, &before.admitted, &[], &jobs);
        assert_eq!(names(&decision.admitted), ["a", "small"]);
        assert_eq!(names(&decision.queued), ["big"]);
    }

    #[test]
    fn max_concurrent_jobs_limits_cpu_jobs_too() {
        let spec = quota(8, Some(1), PreemptionMode::Never);
        let decision = decide(
            "q",
            &spec,
            &[],
            &[],
            &[job("a", 0, 1, 0), job("b", 0, 2, 0)],
        );
        assert_eq!(names(&decision.admitted), ["a"]);
        assert_eq!(
            decision.queued[0].reason.as_deref(),
            Some("maxConcurrentJobs (1) jobs are running")
        );
    }

    #[test]
    fn jobs_the_quota_can_never_admit_are_rejected_with_the_reason() {
        let spec = quota(8, None, PreemptionMode::Never);
        let mut outside = job("outside", 0, 1, 4);
        outside.namespace_covered = false;
        outside.namespace = "other".into();
        let mut mig = job("mig", 0, 2, 1);
        mig.demand = Some(("nvidia.com/mig-1g.10gb".into(), 1));
        let huge = job("huge", 0, 3, 16);
        let decision = decide("q", &spec, &[], &[], &[outside, mig, huge]);
        let reasons: Vec<_> = decision
            .rejected
            .iter()
            .filter_map(|job| job.reason.as_deref())
            .collect();
        assert_eq!(
            reasons,
            [
                "namespace `other` is not covered by GPUQuota `q`",
                "GPUQuota `q` has no limit for `nvidia.com/mig-1g.10gb`",
                "the gang needs 16 nvidia.com/gpu; GPUQuota `q` allows at most 8",
            ]
        );
        assert!(decision.admitted.is_empty());
    }

    #[test]
    fn a_recreated_job_with_the_same_name_is_not_admitted_by_its_predecessor() {
        let spec = quota(4, None, PreemptionMode::Never);
        let before = decide("q", &spec, &[], &[], &[job("a", 0, 1, 4)]);
        let mut recreated = job("a", 0, 5, 4);
        recreated.uid = "uid-new".into();
        let decision = decide(
            "q",
            &spec,
            &before.admitted,
            &[],
            &[job("b", 0, 2, 4), recreated],
        );
        assert_eq!(names(&decision.admitted), ["b"]);
        assert_eq!(names(&decision.queued), ["a"]);
    }
}
