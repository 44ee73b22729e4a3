//! Flywheel objects in tests: the committed examples, creation through the dynamic API (so a refusal's HTTP
//! status is visible), and reading conditions back.

use flywheel_crds::{FeatureView, GPUQuota, ModelVersion, Rollout, TrainingJob};
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::{Api, Client};
use serde_json::Value;

use crate::repo_root;

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: String, message: String },
    #[error("`{0}` is not a Flywheel kind")]
    UnknownKind(String),
    #[error("encoding object: {0}")]
    Encode(#[from] serde_json::Error),
}

/// An example manifest from `examples/` as JSON.
pub fn example(file: &str) -> Result<Value, FixtureError> {
    let path = repo_root().join("examples").join(file);
    let text = std::fs::read_to_string(&path).map_err(|source| FixtureError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|err| FixtureError::Parse {
        path: path.display().to_string(),
        message: err.to_string(),
    })
}

/// Every example file name under `examples/`, sorted.
pub fn example_files() -> Result<Vec<String>, FixtureError> {
    let dir = repo_root().join("examples");
    let entries = std::fs::read_dir(&dir).map_err(|source| FixtureError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The API resource of a Flywheel kind, and whether it is namespaced.
pub fn resource_of(kind: &str) -> Result<(ApiResource, bool), FixtureError> {
    Ok(match kind {
        "FeatureView" => (ApiResource::erase::<FeatureView>(&()), true),
        "TrainingJob" => (ApiResource::erase::<TrainingJob>(&()), true),
        "ModelVersion" => (ApiResource::erase::<ModelVersion>(&()), true),
        "Rollout" => (ApiResource::erase::<Rollout>(&()), true),
        "GPUQuota" => (ApiResource::erase::<GPUQuota>(&()), false),
        other => return Err(FixtureError::UnknownKind(other.to_owned())),
    })
}

/// A dynamic API for `kind`, in `namespace` when the kind is namespaced.
pub fn api_for(
    client: &Client,
    kind: &str,
    namespace: &str,
) -> Result<Api<DynamicObject>, FixtureError> {
    let (resource, namespaced) = resource_of(kind)?;
    Ok(if namespaced {
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    })
}

/// Creates `manifest` (its kind picks the API). The outer error is a harness problem; the inner one is the API
/// server's answer, so a test can assert on a 422.
pub async fn create(
    client: &Client,
    namespace: &str,
    manifest: &Value,
) -> Result<Result<DynamicObject, kube::Error>, FixtureError> {
    let kind = manifest["kind"].as_str().unwrap_or_default();
    let api = api_for(client, kind, namespace)?;
    let object: DynamicObject = serde_json::from_value(manifest.clone())?;
    Ok(api.create(&PostParams::default(), &object).await)
}

/// `(status, reason, message, observedGeneration)` of condition `type_` in `object.status.conditions`.
pub fn condition(
    object: &DynamicObject,
    type_: &str,
) -> Option<(String, String, String, Option<i64>)> {
    let conditions = object.data.get("status")?.get("conditions")?.as_array()?;
    let found = conditions.iter().find(|c| c["type"] == type_)?;
    Some((
        found["status"].as_str().unwrap_or_default().to_owned(),
        found["reason"].as_str().unwrap_or_default().to_owned(),
        found["message"].as_str().unwrap_or_default().to_owned(),
        found["observedGeneration"].as_i64(),
    ))
}

/// Sets `value` at the JSON path `pointer` (RFC 6901), creating objects on the way.
pub fn set(manifest: &mut Value, pointer: &str, value: Value) {
    let mut target = manifest;
    for token in pointer.split('/').skip(1) {
        target = match target {
            Value::Array(items) => match token.parse::<usize>().ok().and_then(|i| items.get_mut(i))
            {
                Some(item) => item,
                None => return,
            },
            other => {
                if !other.is_object() {
                    *other = Value::Object(serde_json::Map::new());
                }
                match other.as_object_mut() {
                    Some(map) => map.entry(token.to_owned()).or_insert(Value::Null),
                    None => return,
                }
            }
        };
    }
    *target = value;
}
