//! Types and helpers shared by every Flywheel kind: conditions, durations, references, spec errors.

use std::fmt;
use std::time::Duration as StdDuration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type set on every kind once its spec has been accepted and reconciled.
pub const CONDITION_READY: &str = "Ready";
/// Condition type set (status `True`) when the spec breaks a rule the API server could not check.
pub const CONDITION_INVALID_SPEC: &str = "InvalidSpec";

/// Regex of a duration such as `90s`, `5m`, `1h30m`, `7d` (the units the Rollout and FeatureView use).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// Regex of a DNS-1123 label: the names of Kubernetes objects referenced by name.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Regex of a DNS-1123 subdomain (object names in general).
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Regex of a GPU extended resource Flywheel knows how to schedule: whole NVIDIA or AMD GPUs, and NVIDIA MIG
/// profiles such as `nvidia.com/mig-1g.10gb` or `nvidia.com/mig-3g.40gb`.
pub const GPU_RESOURCE_PATTERN: &str =
    r"^(nvidia\.com/gpu|amd\.com/gpu|nvidia\.com/mig-[1-7]g\.[0-9]+gb(\.me)?)$";

/// A duration written the Kubernetes way (`30s`, `5m`, `1h30m`, `7d`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Duration(#[schemars(pattern(DURATION_PATTERN), length(max = 32))] pub String);

impl Duration {
    /// Parses the duration; fails on the same inputs the schema pattern refuses, plus overflow.
    pub fn parse(&self) -> Result<StdDuration, DurationError> {
        parse_duration(&self.0)
    }
}

impl From<&str> for Duration {
    fn from(value: &str) -> Self {
        Duration(value.to_owned())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("`{0}` is not a duration such as 30s, 5m, 1h30m or 7d")]
    Malformed(String),
    #[error("`{0}` is too long a duration")]
    Overflow(String),
}

/// Parses `[0-9]+(ms|s|m|h|d)` repeated, e.g. `1h30m`.
pub fn parse_duration(text: &str) -> Result<StdDuration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let malformed = || DurationError::Malformed(text.to_owned());
    let overflow = || DurationError::Overflow(text.to_owned());
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(malformed());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| overflow())?;
        rest = &rest[digits..];
        let (unit_ms, unit_len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('d') {
            (86_400_000, 1)
        } else {
            return Err(malformed());
        };
        rest = &rest[unit_len..];
        let part = value.checked_mul(unit_ms).ok_or_else(overflow)?;
        total_ms = total_ms.checked_add(part).ok_or_else(overflow)?;
    }
    Ok(StdDuration::from_millis(total_ms))
}

/// A reference to an object of a known kind in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalRef {
    /// Name of the referenced object.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// A half-open time range `[start, end)` in RFC 3339.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TimeRange {
    /// Inclusive start.
    pub start: Time,
    /// Exclusive end; must be after `start`.
    pub end: Time,
}

/// One rule a spec breaks, with the JSON path of the offending field (e.g. `spec.topology.dataParallel`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecViolation {
    pub field: String,
    pub message: String,
}

impl SpecViolation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// All rules a spec breaks. The controller reports them in an `InvalidSpec` condition, so the user sees every
/// problem at once instead of fixing them one apply at a time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpecViolations(pub Vec<SpecViolation>);

impl SpecViolations {
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(SpecViolation::new(field, message));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks a duration field, recording a violation when it does not parse.
    pub fn check_duration(&mut self, field: &str, duration: &Duration) -> Option<StdDuration> {
        match duration.parse() {
            Ok(parsed) => Some(parsed),
            Err(err) => {
                self.push(field, err.to_string());
                None
            }
        }
    }

    /// Checks a storage URI for a `..` path segment: resolved by the reader, it would leave the directory the
    /// URI names (another namespace's data, the operator's files) however the prefix looks.
    pub fn check_storage_uri(&mut self, field: &str, uri: &str) {
        let path = uri.split_once("://").map_or(uri, |(_, rest)| rest);
        if path.split('/').any(|segment| segment == "..") {
            self.push(
                field,
                "a `..` path segment is not allowed: name the directory itself",
            );
        }
    }

    pub fn into_result(self) -> Result<(), SpecViolations> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for SpecViolations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, violation) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{violation}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecViolations {}

/// Status of a condition, as the strings metav1.Condition uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// Builds a condition stamped with the object's generation; `now` is passed in so plans stay pure.
pub fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: Time(now),
    }
}

/// Upserts `new` into `conditions`, keeping `lastTransitionTime` when the status did not change (the
/// metav1.Condition contract), and keeping the list sorted by type so status patches are stable.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions
        .iter_mut()
        .find(|existing| existing.type_ == new.type_)
    {
        Some(existing) => {
            let transition = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *existing = Condition {
                last_transition_time: transition,
                ..new
            };
        }
        None => conditions.push(new),
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|condition| condition.type_ == type_)
}

/// Whether `pattern`-style checks pass for a DNS-1123 label, for controller-side mirrors of schema rules.
pub fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Whether `resource` is a GPU resource name Flywheel schedules (mirror of [`GPU_RESOURCE_PATTERN`]).
pub fn is_gpu_resource(resource: &str) -> bool {
    if resource == "nvidia.com/gpu" || resource == "amd.com/gpu" {
        return true;
    }
    let Some(profile) = resource.strip_prefix("nvidia.com/mig-") else {
        return false;
    };
    let profile = profile.strip_suffix(".me").unwrap_or(profile);
    let Some((slices, memory)) = profile.split_once("g.") else {
        return false;
    };
    let Some(memory_gb) = memory.strip_suffix("gb") else {
        return false;
    };
    matches!(slices, "1" | "2" | "3" | "4" | "5" | "6" | "7")
        && !memory_gb.is_empty()
        && memory_gb.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_compound_units() {
        assert_eq!(parse_duration("90s"), Ok(StdDuration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(StdDuration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(StdDuration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("250ms"), Ok(StdDuration::from_millis(250)));
        assert_eq!(
            parse_duration("1m30s500ms"),
            Ok(StdDuration::from_millis(90_500))
        );
    }

    #[test]
    fn durations_reject_malformed_and_overflow() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("5"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("m5"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("5w"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("-5s"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let t0 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let t1 = Timestamp::from_second(2_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            condition("Ready", ConditionStatus::True, "A", "a", Some(1), t0),
        );
        set_condition(
            &mut conditions,
            condition("Ready", ConditionStatus::True, "B", "b", Some(2), t1),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(t0));
        assert_eq!(conditions[0].reason, "B");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set_condition(
            &mut conditions,
            condition("Ready", ConditionStatus::False, "C", "c", Some(3), t1),
        );
        assert_eq!(conditions[0].last_transition_time, Time(t1));
    }

    #[test]
    fn conditions_stay_sorted_by_type() {
        let now = Timestamp::UNIX_EPOCH;
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            condition("Ready", ConditionStatus::False, "R", "", None, now),
        );
        set_condition(
            &mut conditions,
            condition("InvalidSpec", ConditionStatus::True, "R", "", None, now),
        );
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["InvalidSpec", "Ready"]);
    }

    #[test]
    fn gpu_resource_names() {
        for ok in [
            "nvidia.com/gpu",
            "amd.com/gpu",
            "nvidia.com/mig-1g.10gb",
            "nvidia.com/mig-3g.40gb",
            "nvidia.com/mig-1g.10gb.me",
        ] {
            assert!(is_gpu_resource(ok), "{ok}");
        }
        for bad in [
            "nvidia.com/gpus",
            "gpu",
            "nvidia.com/mig-8g.10gb",
            "nvidia.com/mig-1g.gb",
            "intel.com/gpu",
            "",
        ] {
            assert!(!is_gpu_resource(bad), "{bad}");
        }
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("ctr-model-1"));
        assert!(!is_dns_label("Ctr"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }
}
