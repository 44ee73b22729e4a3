//! The model artifact: one file holding the model card (JSON), the dense weights (a burn record) and the
//! embedding tables, with its SHA-256 beside it. Checkpoints use the same format with optimizer state.
//!
//! Layout, little-endian: `FWM1`, u64 card length, card JSON, u64 dense length, dense record, u8 table
//! count, then each table as [`EmbeddingTable::write_to`] writes it.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::calibration::Calibrator;
use crate::config::{Convergence, EvalMetrics, TrainConfig};
use crate::embedding::{EmbeddingTable, TableReadError};
use crate::model::{CtrModel, ModelConfig};
use crate::schema::FeatureSchema;
use crate::tables::Tables;

pub const FORMAT: &str = "flywheel-v1";
const MAGIC: &[u8; 4] = b"FWM1";

/// What a model is: its architecture, the features it reads, how it was trained, and how good it is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelCard {
    pub format: String,
    pub model: ModelConfig,
    pub schema: FeatureSchema,
    pub feature_schema_hash: String,
    pub training: TrainConfig,
    pub metrics: EvalMetrics,
    pub lineage: Lineage,
    /// Trainer version that wrote the artifact.
    pub code_version: String,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Maps the model's logit to the probability every scorer returns; absent, the plain sigmoid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrator: Option<Calibrator>,
    /// How training ended (epochs trained, validation losses, the epoch kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<Convergence>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Lineage {
    /// Where the training and evaluation data came from.
    pub data: Vec<String>,
    pub train_rows: usize,
    pub eval_rows: usize,
    /// SHA-256 of the artifact training warm-started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_start: Option<String>,
    /// The FeatureView the training set's features were joined from (`build-dataset` records it in the set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_view: Option<FeatureViewSource>,
}

/// A FeatureView, and the schema hash of its features when the training set was built.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FeatureViewSource {
    /// `namespace/name`.
    pub name: String,
    pub schema_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a regular file (a device or a directory is never an artifact)")]
    NotAFile(PathBuf),
    #[error("not a Flywheel model artifact (bad magic)")]
    NotAModel,
    #[error("artifact is truncated")]
    Truncated,
    #[error("artifact is corrupt: {0}")]
    Corrupt(String),
    #[error("artifact sha256 is {actual}, expected {expected}")]
    ShaMismatch { expected: String, actual: String },
    #[error("dense weights: {0}")]
    Record(String),
}

impl From<TableReadError> for ArtifactError {
    fn from(err: TableReadError) -> Self {
        match err {
            TableReadError::Truncated => ArtifactError::Truncated,
            TableReadError::Corrupt => ArtifactError::Corrupt("embedding table".to_owned()),
        }
    }
}

/// A model read back from an artifact.
pub struct SavedModel<B: Backend> {
    pub card: ModelCard,
    pub model: CtrModel<B>,
    pub tables: Tables,
}

/// Serializes a model; `with_state` keeps the embedding optimizer state (checkpoints) or drops it (serving).
pub fn encode<B: Backend>(
    card: &ModelCard,
    model: &CtrModel<B>,
    tables: &Tables,
    with_state: bool,
) -> Result<Vec<u8>, ArtifactError> {
    let card_json =
        serde_json::to_vec(card).map_err(|err| ArtifactError::Corrupt(err.to_string()))?;
    let dense = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(model.clone().into_record(), ())
        .map_err(|err| ArtifactError::Record(err.to_string()))?;
    let mut out = Vec::with_capacity(card_json.len() + dense.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(card_json.len() as u64).to_le_bytes());
    out.extend_from_slice(&card_json);
    out.extend_from_slice(&(dense.len() as u64).to_le_bytes());
    out.extend_from_slice(&dense);
    let tables_list: Vec<&EmbeddingTable> = std::iter::once(&tables.first_order)
        .chain(tables.factors.as_ref())
        .collect();
    out.push(tables_list.len() as u8);
    for table in tables_list {
        table.write_to(&mut out, with_state);
    }
    Ok(out)
}

/// Reads a model from bytes written by [`encode`]; every length is checked, nothing panics on bad input.
pub fn decode<B: Backend>(
    bytes: &[u8],
    device: &B::Device,
) -> Result<SavedModel<B>, ArtifactError> {
    let mut input = bytes;
    let card = read_card(&mut input)?;
    let dense = section(&mut input)?;
    let model = guard_record("dense weights", || {
        let record = BinBytesRecorder::<FullPrecisionSettings>::default()
            .load(dense.to_vec(), device)
            .map_err(|err| ArtifactError::Record(err.to_string()))?;
        Ok(card.model.init::<B>(device).load_record(record))
    })?;
    let (&count, rest) = input.split_first().ok_or(ArtifactError::Truncated)?;
    input = rest;
    let expected = if card.model.uses_factors() { 2 } else { 1 };
    if usize::from(count) != expected {
        return Err(ArtifactError::Corrupt(format!(
            "{count} embedding tables, expected {expected}"
        )));
    }
    let first_order = EmbeddingTable::read_from(&mut input)?;
    let factors = if expected == 2 {
        Some(EmbeddingTable::read_from(&mut input)?)
    } else {
        None
    };
    if !input.is_empty() {
        return Err(ArtifactError::Corrupt(format!(
            "{} trailing bytes",
            input.len()
        )));
    }
    Ok(SavedModel {
        card,
        model,
        tables: Tables {
            first_order,
            factors,
        },
    })
}

/// Runs a burn record load. burn-core 0.21's byte recorder panics on some damaged records instead of returning
/// an error (`record/memory.rs` unwraps a UTF-8 decode), and loading a record of another shape panics too: a
/// damaged artifact or checkpoint must be an error that leaves the previous model serving, not a crash.
pub(crate) fn guard_record<T>(
    what: &str,
    load: impl FnOnce() -> Result<T, ArtifactError>,
) -> Result<T, ArtifactError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|_| {
        Err(ArtifactError::Record(format!(
            "{what}: the record is damaged"
        )))
    })
}

/// The model card of an artifact, without loading the model (what a registry entry needs: schema hash,
/// metrics, lineage).
pub fn card(bytes: &[u8]) -> Result<ModelCard, ArtifactError> {
    read_card(&mut &bytes[..])
}

/// Reads the magic and the card, leaving `input` at the dense weights.
fn read_card(input: &mut &[u8]) -> Result<ModelCard, ArtifactError> {
    if input.len() < 4 || &input[..4] != MAGIC {
        return Err(ArtifactError::NotAModel);
    }
    *input = &input[4..];
    let card_bytes = section(input)?;
    let card: ModelCard = serde_json::from_slice(card_bytes)
        .map_err(|err| ArtifactError::Corrupt(format!("model card: {err}")))?;
    if card.format != FORMAT {
        return Err(ArtifactError::Corrupt(format!(
            "unknown format {}",
            card.format
        )));
    }
    if let Some(calibrator) = &card.calibrator {
        calibrator
            .validate()
            .map_err(|reason| ArtifactError::Corrupt(format!("calibrator: {reason}")))?;
    }
    Ok(card)
}

fn section<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], ArtifactError> {
    if input.len() < 8 {
        return Err(ArtifactError::Truncated);
    }
    let (len, rest) = input.split_at(8);
    let len = u64::from_le_bytes(len.try_into().map_err(|_| ArtifactError::Truncated)?);
    let len = usize::try_from(len).map_err(|_| ArtifactError::Truncated)?;
    if rest.len() < len {
        return Err(ArtifactError::Truncated);
    }
    let (body, rest) = rest.split_at(len);
    *input = rest;
    Ok(body)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(Sha256::digest(bytes).as_slice())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Bytes of the SHA-256 seal at the end of sealed content.
const SEAL_LEN: usize = 32;

/// Appends the SHA-256 of `content` to it. A checkpoint carries its own digest: a flipped bit in its weights
/// still decodes, and resuming from it would train on damage without a word.
pub fn seal(mut content: Vec<u8>) -> Vec<u8> {
    let digest = Sha256::digest(&content);
    content.extend_from_slice(&digest);
    content
}

/// The content of [`seal`]ed bytes, refused when the seal does not match.
pub fn unseal(bytes: &[u8]) -> Result<&[u8], ArtifactError> {
    if bytes.len() < SEAL_LEN {
        return Err(ArtifactError::Truncated);
    }
    let (content, seal) = bytes.split_at(bytes.len() - SEAL_LEN);
    let actual = Sha256::digest(content);
    if actual.as_slice() != seal {
        return Err(ArtifactError::ShaMismatch {
            expected: hex(seal),
            actual: hex(actual.as_slice()),
        });
    }
    Ok(content)
}

/// Writes `bytes` to `path` atomically (temporary file, then rename) with a `<path>.sha256` beside it
/// (`sha256sum` format); returns the digest.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<String, ArtifactError> {
    let io = |source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let temporary = path.with_extension("partial");
    // (`<name>.partial` never collides with an artifact or checkpoint name.)
    std::fs::write(&temporary, bytes).map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)?;
    let digest = sha256_hex(bytes);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::write(
        path.with_file_name(format!("{name}.sha256")),
        format!("{digest}  {name}\n"),
    )
    .map_err(io)?;
    Ok(digest)
}

/// Reads an artifact and checks its SHA-256 against `expected` when given. Only a regular file is read: a
/// path such as `/dev/zero` would otherwise be read until memory runs out.
pub fn read_file(path: &Path, expected: Option<&str>) -> Result<Vec<u8>, ArtifactError> {
    let io = |source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    };
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Err(ArtifactError::NotAFile(path.to_owned()));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    if let Some(expected) = expected {
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(ArtifactError::ShaMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
    }
    Ok(bytes)
}
