//! The served model: an artifact the trainer wrote, verified (SHA-256, feature schema hash) and loaded into
//! burn's CPU backend, and the slot that swaps one model for the next atomically.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use burn::backend::Flex;
use flywheel_ml::artifact::{self, ArtifactError, ModelCard};
use flywheel_ml::model::CtrModel;
use flywheel_ml::train::{EncodedDataset, Tables};
use serde::{Deserialize, Serialize};

/// Where a model version's artifact is and what it must hash to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// The ModelVersion name; metrics and responses carry it.
    pub version: String,
    /// Local path of the artifact (a mounted volume).
    pub uri: PathBuf,
    /// Expected SHA-256; when absent, the `<artifact>.sha256` file the trainer wrote beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Expected feature schema hash (from the ModelVersion); refused when the artifact's differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_schema_hash: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Artifact(#[from] ArtifactError),
    #[error("no expected sha256 given and {path} is unreadable: {source}")]
    NoDigest {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("feature schema hash is {actual}, the model version expects {expected}")]
    SchemaMismatch { expected: String, actual: String },
    #[error("the artifact's feature schema is invalid: {0}")]
    InvalidSchema(String),
}

pub struct ServedModel {
    pub source: ModelSource,
    pub sha256: String,
    pub card: ModelCard,
    model: CtrModel<Flex>,
    tables: Tables,
}

impl ServedModel {
    pub fn load(source: &ModelSource) -> Result<ServedModel, LoadError> {
        let expected = match &source.sha256 {
            Some(digest) => digest.clone(),
            None => sidecar_digest(&source.uri)?,
        };
        let bytes = artifact::read_file(&source.uri, Some(&expected))?;
        let saved = artifact::decode::<Flex>(&bytes, &Default::default())?;
        saved
            .card
            .schema
            .validate()
            .map_err(|err| LoadError::InvalidSchema(err.to_string()))?;
        let actual = saved.card.schema.hash();
        if actual != saved.card.feature_schema_hash {
            return Err(LoadError::SchemaMismatch {
                expected: saved.card.feature_schema_hash.clone(),
                actual,
            });
        }
        if let Some(expected) = &source.feature_schema_hash
            && !expected.eq_ignore_ascii_case(&actual)
        {
            return Err(LoadError::SchemaMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        Ok(ServedModel {
            source: source.clone(),
            sha256: expected.to_ascii_lowercase(),
            card: saved.card,
            model: saved.model,
            tables: saved.tables,
        })
    }

    pub fn version(&self) -> &str {
        &self.source.version
    }

    /// Click probabilities of every row, through the trainer's own inference function and the artifact's
    /// calibrator.
    pub fn score(&self, data: &EncodedDataset) -> Vec<f64> {
        flywheel_ml::train::predict(
            &self.model,
            &self.tables,
            self.card.calibrator.as_ref(),
            data,
            &Default::default(),
        )
    }
}

/// The digest in `<artifact>.sha256` (`sha256sum` format: digest, two spaces, name).
fn sidecar_digest(artifact: &Path) -> Result<String, LoadError> {
    let mut name = artifact.as_os_str().to_owned();
    name.push(".sha256");
    let path = PathBuf::from(name);
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::NoDigest {
        path: path.clone(),
        source,
    })?;
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// What readiness reports about loading.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadStatus {
    /// Version and digest being served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving: Option<Served>,
    /// Why the last load failed (cleared by the next successful one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_source: Option<ModelSource>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Served {
    pub version: String,
    pub sha256: String,
    pub feature_schema_hash: String,
}

/// The model requests are scored with. A request takes the current model once and keeps it, so a swap never
/// splits a request across versions and in-flight requests finish on the model they started with.
#[derive(Default)]
pub struct ModelSlot {
    current: ArcSwapOption<ServedModel>,
    status: Mutex<LoadStatus>,
}

impl ModelSlot {
    pub fn current(&self) -> Option<Arc<ServedModel>> {
        self.current.load_full()
    }

    /// Loads `source` beside the current model and switches to it; on failure the current model keeps serving
    /// and the error is kept for readiness.
    pub fn load(&self, source: &ModelSource) -> Result<Arc<ServedModel>, String> {
        match ServedModel::load(source) {
            Ok(model) => {
                let model = Arc::new(model);
                self.current.store(Some(model.clone()));
                let mut status = self.lock_status();
                status.serving = Some(Served {
                    version: model.version().to_owned(),
                    sha256: model.sha256.clone(),
                    feature_schema_hash: model.card.feature_schema_hash.clone(),
                });
                status.last_error = None;
                status.failed_source = None;
                Ok(model)
            }
            Err(err) => {
                let message = format!("loading {}: {err}", source.uri.display());
                let mut status = self.lock_status();
                status.last_error = Some(message.clone());
                status.failed_source = Some(source.clone());
                Err(message)
            }
        }
    }

    pub fn status(&self) -> LoadStatus {
        self.lock_status().clone()
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, LoadStatus> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
