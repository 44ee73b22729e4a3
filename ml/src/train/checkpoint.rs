//! A trainer's full state as bytes and back: the model with its embedding optimizer state, the dense optimizer
//! state, early stopping's memory and the best epoch's weights, and where training stands. Checkpoints are
//! sealed with their SHA-256, so a damaged one is refused rather than resumed.

use burn::optim::Optimizer;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::{BestEpoch, Plateau, Trainer};
use crate::artifact::{self, ArtifactError, ModelCard};

/// Version 2 adds early stopping's memory (its state and the best epoch's weights).
/// Checkpoints are sealed (their SHA-256 at the end); `FWC2` ones, from before, are not.
const CHECKPOINT_MAGIC: &[u8; 4] = b"FWC3";
const UNSEALED_CHECKPOINT_MAGIC: &[u8; 4] = b"FWC2";

/// Where training stands: the epoch, and the next batch within it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: usize,
    pub batch: usize,
}

/// The scalar part of [`Plateau`] as a checkpoint stores it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlateauRecord {
    validation_log_loss: Vec<f64>,
    best: Option<(usize, f64)>,
    stale: usize,
    learning_rate_scale: f64,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// The full training state at `position`: the model with embedding optimizer state, the dense optimizer
    /// state, early stopping's memory (with the best epoch's weights), and where to go on.
    pub fn checkpoint(
        &self,
        card: &ModelCard,
        position: Position,
    ) -> Result<Vec<u8>, ArtifactError> {
        let model = artifact::encode(card, &self.model, &self.tables, true)?;
        let optimizer = BinBytesRecorder::<FullPrecisionSettings>::default()
            .record(self.optimizer.to_record(), ())
            .map_err(|err| ArtifactError::Record(err.to_string()))?;
        let plateau = serde_json::to_vec(&PlateauRecord {
            validation_log_loss: self.plateau.validation_log_loss.clone(),
            best: self
                .plateau
                .best
                .as_ref()
                .map(|best| (best.epoch, best.loss)),
            stale: self.plateau.stale,
            learning_rate_scale: self.plateau.learning_rate_scale,
        })
        .map_err(|err| ArtifactError::Corrupt(err.to_string()))?;
        let best = match &self.plateau.best {
            Some(best) => artifact::encode(card, &best.model, &best.tables, false)?,
            None => Vec::new(),
        };
        let mut out =
            Vec::with_capacity(model.len() + optimizer.len() + plateau.len() + best.len() + 60);
        out.extend_from_slice(CHECKPOINT_MAGIC);
        for section in [&model, &optimizer, &plateau, &best] {
            out.extend_from_slice(&(section.len() as u64).to_le_bytes());
            out.extend_from_slice(section);
        }
        out.extend_from_slice(&(position.epoch as u64).to_le_bytes());
        out.extend_from_slice(&(position.batch as u64).to_le_bytes());
        out.extend_from_slice(&self.step.to_le_bytes());
        Ok(artifact::seal(out))
    }

    /// A trainer restored from [`Trainer::checkpoint`] bytes, and the position to resume from.
    pub fn resume(
        bytes: &[u8],
        device: B::Device,
    ) -> Result<(Self, Position, ModelCard), ArtifactError> {
        let rest = if bytes.starts_with(CHECKPOINT_MAGIC) {
            &artifact::unseal(bytes)?[CHECKPOINT_MAGIC.len()..]
        } else {
            // Written before checkpoints were sealed: the same layout without the digest.
            bytes
                .strip_prefix(UNSEALED_CHECKPOINT_MAGIC.as_slice())
                .ok_or(ArtifactError::NotAModel)?
        };
        let (model_bytes, rest) = split_section(rest)?;
        let (optimizer_bytes, rest) = split_section(rest)?;
        let (plateau_bytes, rest) = split_section(rest)?;
        let (best_bytes, rest) = split_section(rest)?;
        if rest.len() != 24 {
            return Err(ArtifactError::Truncated);
        }
        let number = |range: std::ops::Range<usize>| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&rest[range]);
            u64::from_le_bytes(word)
        };
        let saved = artifact::decode::<B>(model_bytes, &device)?;
        let optimizer = artifact::guard_record("optimizer state", || {
            let record = BinBytesRecorder::<FullPrecisionSettings>::default()
                .load(optimizer_bytes.to_vec(), &device)
                .map_err(|err| ArtifactError::Record(err.to_string()))?;
            Ok(saved.card.training.dense_optimizer().load_record(record))
        })?;
        let position = Position {
            epoch: number(0..8) as usize,
            batch: number(8..16) as usize,
        };
        let memory: PlateauRecord = serde_json::from_slice(plateau_bytes)
            .map_err(|err| ArtifactError::Corrupt(format!("early stopping state: {err}")))?;
        let best = match memory.best {
            Some((epoch, loss)) => {
                let best = artifact::decode::<B>(best_bytes, &device)?;
                Some(BestEpoch {
                    epoch,
                    loss,
                    model: best.model,
                    tables: best.tables,
                })
            }
            None => None,
        };
        let plateau = Plateau {
            validation_log_loss: memory.validation_log_loss,
            best,
            stale: memory.stale,
            learning_rate_scale: memory.learning_rate_scale,
        };
        let trainer = Trainer {
            model: saved.model,
            tables: saved.tables,
            model_config: saved.card.model.clone(),
            config: saved.card.training.clone(),
            optimizer,
            device,
            step: number(16..24),
            calibrator: None,
            plateau,
        };
        Ok((trainer, position, saved.card))
    }
}

fn split_section(input: &[u8]) -> Result<(&[u8], &[u8]), ArtifactError> {
    if input.len() < 8 {
        return Err(ArtifactError::Truncated);
    }
    let (len, rest) = input.split_at(8);
    let mut word = [0u8; 8];
    word.copy_from_slice(len);
    let len = usize::try_from(u64::from_le_bytes(word)).map_err(|_| ArtifactError::Truncated)?;
    if rest.len() < len {
        return Err(ArtifactError::Truncated);
    }
    Ok(rest.split_at(len))
}
