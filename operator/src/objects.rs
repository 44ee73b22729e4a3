//! What every object the operator creates carries: its owner reference, and the restricted security context
//! of its containers.

use kube::Resource;
use serde_json::{Value, json};

/// The controller owner reference to `owner`, as JSON for a manifest.
pub fn owner<K: Resource<DynamicType = ()>>(owner: &K) -> Value {
    serde_json::to_value(owner.controller_owner_ref(&()).unwrap_or_default()).unwrap_or_default()
}

/// The restricted container security context every Flywheel data-plane container gets.
pub fn security() -> Value {
    json!({
        "runAsNonRoot": true,
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}
