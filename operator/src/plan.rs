//! The pieces every kind's pure `plan` shares: the plan's shape, and the Ready/InvalidSpec conditions that
//! report spec validation.

use std::time::Duration;

use flywheel_crds::common::{
    CONDITION_INVALID_SPEC, CONDITION_READY, ConditionStatus, SpecViolations, condition,
    find_condition, set_condition,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use kube::api::{ApiResource, DynamicObject};
use serde::Serialize;

/// What a reconcile should do: the full status to own, the Events to emit, the objects it owns to apply and
/// to delete, its finalizer, and when to look again.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<S> {
    pub status: S,
    pub events: Vec<PlannedEvent>,
    pub requeue: Option<Duration>,
    pub children: Children,
    pub finalizer: Option<FinalizerChange>,
}

/// The objects a reconcile owns, in the object's namespace: applied in order (server-side, the operator's
/// field manager), then deleted (an object already gone counts as deleted).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Children {
    pub apply: Vec<Child>,
    pub delete: Vec<ChildRef>,
}

/// An object to apply, kept as its kind's API and its JSON so one list holds every kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Child {
    pub resource: ApiResource,
    pub object: DynamicObject,
}

impl Child {
    pub fn of<K>(object: &K) -> Result<Child, serde_json::Error>
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        Ok(Child {
            resource: ApiResource::erase::<K>(&()),
            object: serde_json::from_value(serde_json::to_value(object)?)?,
        })
    }

    pub fn name(&self) -> &str {
        self.object.metadata.name.as_deref().unwrap_or_default()
    }
}

/// An owned object to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRef {
    pub resource: ApiResource,
    pub name: String,
}

impl ChildRef {
    pub fn of<K: Resource<DynamicType = ()>>(name: impl Into<String>) -> ChildRef {
        ChildRef {
            resource: ApiResource::erase::<K>(&()),
            name: name.into(),
        }
    }
}

/// An owned object seen in a cache, as a sweep judges it: its kind, name and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedObject {
    pub resource: ApiResource,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl OwnedObject {
    pub fn of<K: Resource<DynamicType = ()>>(object: &K) -> OwnedObject {
        OwnedObject {
            resource: ApiResource::erase::<K>(&()),
            name: object.meta().name.clone().unwrap_or_default(),
            labels: object.meta().labels.clone().unwrap_or_default(),
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    pub fn reference(&self) -> ChildRef {
        ChildRef {
            resource: self.resource.clone(),
            name: self.name.clone(),
        }
    }
}

/// Flywheel's finalizer on the reconciled object: added before the status is written; removed after it, or
/// instead of it when the object is being deleted (it then goes away with its status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalizerChange {
    Add(&'static str),
    Remove(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// Reason of `Ready=False` and `InvalidSpec=True` when the spec breaks a rule.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason of `InvalidSpec=False` once the spec passes validation.
pub const REASON_SPEC_VALID: &str = "SpecValid";

/// Events carry at most 1 kB of note.
const MAX_NOTE: usize = 1000;

/// Sets `InvalidSpec` and `Ready` from the validation result. When the spec is valid, `ready` decides Ready
/// (`(status, reason, message)`), so each kind reports its own readiness. Events are planned only on a
/// transition, so a steady object emits nothing on resync.
pub fn spec_conditions(
    conditions: &mut Vec<Condition>,
    validation: &Result<(), SpecViolations>,
    generation: Option<i64>,
    now: Timestamp,
    ready: (ConditionStatus, &str, &str),
) -> Vec<PlannedEvent> {
    let was_invalid = find_condition(conditions, CONDITION_INVALID_SPEC)
        .map(|c| (c.status.clone(), c.message.clone()));
    let mut events = Vec::new();
    match validation {
        Err(violations) => {
            let message = violations.to_string();
            if was_invalid != Some((ConditionStatus::True.as_str().to_owned(), message.clone())) {
                events.push(PlannedEvent {
                    warning: true,
                    reason: REASON_INVALID_SPEC,
                    action: "Validate",
                    note: truncate(&message),
                });
            }
            set_condition(
                conditions,
                condition(
                    CONDITION_INVALID_SPEC,
                    ConditionStatus::True,
                    REASON_INVALID_SPEC,
                    message.clone(),
                    generation,
                    now,
                ),
            );
            set_condition(
                conditions,
                condition(
                    CONDITION_READY,
                    ConditionStatus::False,
                    REASON_INVALID_SPEC,
                    message,
                    generation,
                    now,
                ),
            );
        }
        Ok(()) => {
            if was_invalid
                .as_ref()
                .is_some_and(|(status, _)| status == ConditionStatus::True.as_str())
            {
                events.push(PlannedEvent {
                    warning: false,
                    reason: REASON_SPEC_VALID,
                    action: "Validate",
                    note: "the spec is valid again".to_owned(),
                });
            }
            set_condition(
                conditions,
                condition(
                    CONDITION_INVALID_SPEC,
                    ConditionStatus::False,
                    REASON_SPEC_VALID,
                    "the spec passes every rule",
                    generation,
                    now,
                ),
            );
            let (status, reason, message) = ready;
            set_condition(
                conditions,
                condition(CONDITION_READY, status, reason, message, generation, now),
            );
        }
    }
    events
}

fn truncate(text: &str) -> String {
    if text.len() <= MAX_NOTE {
        return text.to_owned();
    }
    let mut end = MAX_NOTE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations() -> Result<(), SpecViolations> {
        let mut violations = SpecViolations::default();
        violations.push("spec.x", "bad");
        violations.into_result()
    }

    const READY: (ConditionStatus, &str, &str) = (ConditionStatus::True, "Accepted", "ok");

    #[test]
    fn invalid_spec_sets_both_conditions_and_one_warning() {
        let mut conditions = Vec::new();
        let events = spec_conditions(
            &mut conditions,
            &violations(),
            Some(3),
            Timestamp::UNIX_EPOCH,
            READY,
        );
        assert_eq!(events.len(), 1);
        assert!(events[0].warning);
        assert_eq!(events[0].note, "spec.x: bad");
        let invalid = find_condition(&conditions, CONDITION_INVALID_SPEC)
            .map(|c| (c.status.as_str(), c.observed_generation));
        assert_eq!(invalid, Some(("True", Some(3))));
        let ready = find_condition(&conditions, CONDITION_READY)
            .map(|c| (c.status.as_str(), c.message.as_str()));
        assert_eq!(ready, Some(("False", "spec.x: bad")));
        let again = spec_conditions(
            &mut conditions,
            &violations(),
            Some(3),
            Timestamp::UNIX_EPOCH,
            READY,
        );
        assert!(
            again.is_empty(),
            "a steady invalid object emits no new event"
        );
    }

    #[test]
    fn fixing_the_spec_emits_one_normal_event() {
        let mut conditions = Vec::new();
        spec_conditions(
            &mut conditions,
            &violations(),
            Some(1),
            Timestamp::UNIX_EPOCH,
            READY,
        );
        let events = spec_conditions(
            &mut conditions,
            &Ok(()),
            Some(2),
            Timestamp::UNIX_EPOCH,
            READY,
        );
        assert_eq!(events.len(), 1);
        assert!(!events[0].warning);
        let ready = find_condition(&conditions, CONDITION_READY)
            .map(|c| (c.status.as_str(), c.observed_generation));
        assert_eq!(ready, Some(("True", Some(2))));
    }

    #[test]
    fn a_valid_new_object_emits_nothing() {
        let mut conditions = Vec::new();
        assert!(
            spec_conditions(
                &mut conditions,
                &Ok(()),
                Some(1),
                Timestamp::UNIX_EPOCH,
                READY
            )
            .is_empty()
        );
    }

    #[test]
    fn long_notes_are_cut_on_a_char_boundary() {
        let text = "é".repeat(800);
        let cut = truncate(&text);
        assert!(cut.len() <= MAX_NOTE + '…'.len_utf8());
    }
}

/// Test support: the committed examples as typed objects, so plan tests exercise what users apply.
#[cfg(test)]
pub(crate) mod examples {
    use serde::de::DeserializeOwned;

    pub fn load<T: DeserializeOwned>(file: &str, generation: i64) -> T {
        let path = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../examples")
        .join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let mut value: serde_json::Value =
            serde_saphyr::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        value["metadata"]["generation"] = generation.into();
        serde_json::from_value(value).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    }

    pub fn condition<'a>(
        conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        type_: &str,
    ) -> (&'a str, &'a str, Option<i64>) {
        let found = flywheel_crds::common::find_condition(conditions, type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {conditions:?}"));
        (
            found.status.as_str(),
            found.message.as_str(),
            found.observed_generation,
        )
    }
}
