//! Hyperparameter search in one process (`--tune-trials`): random search over learning rates, embedding size,
//! hidden layers and weight decay. Each trial is a full training run with early stopping on the validation
//! slice of the training set; the trial with the lowest validation log loss becomes the model. Trial 0 is the
//! job's own settings, so the search never picks something worse than them on validation. The eval set is
//! never looked at while choosing, so the offline metrics reported afterwards stay unbiased. With a
//! [`SearchRecord`], a restarted pod goes on from the next trial instead of searching again.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use flywheel_ml::artifact::{ArtifactError, ModelCard};
use flywheel_ml::model::{Architecture, ModelConfig};
use flywheel_ml::train::{Convergence, EncodedDataset, Position, TrainConfig, Trainer};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::report::emit;
use crate::setup::sparse_optimizer;

/// What a search may vary; an absent dimension keeps the job's setting.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SearchSpace {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<Interval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_learning_rate: Option<Interval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<Interval>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding_dim: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_layers: Vec<Vec<usize>>,
}

/// A range to draw from, log-uniformly (the default: rates span decades) or uniformly.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Interval {
    pub min: f64,
    pub max: f64,
    #[serde(default)]
    pub scale: Scale,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Scale {
    #[default]
    Log,
    Linear,
}

impl Interval {
    fn check(&self, name: &str) -> anyhow::Result<()> {
        let finite = self.min.is_finite() && self.max.is_finite();
        let positive = self.scale == Scale::Linear || self.min > 0.0;
        if !finite || self.min < 0.0 || self.min > self.max || !positive {
            anyhow::bail!(
                "tuning space {name}: [{}, {}] is not a range of non-negative numbers (a log scale needs min > 0)",
                self.min,
                self.max
            );
        }
        Ok(())
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> f64 {
        let u: f64 = rng.random();
        match self.scale {
            Scale::Log => (self.min.ln() + u * (self.max.ln() - self.min.ln())).exp(),
            Scale::Linear => self.min + u * (self.max - self.min),
        }
    }
}

impl SearchSpace {
    pub fn parse(text: &str) -> anyhow::Result<SearchSpace> {
        let space: SearchSpace =
            serde_json::from_str(text).map_err(|err| anyhow::anyhow!("--tune-space: {err}"))?;
        for (name, interval) in [
            ("learningRate", &space.learning_rate),
            ("sparseLearningRate", &space.sparse_learning_rate),
            ("weightDecay", &space.weight_decay),
        ] {
            if let Some(interval) = interval {
                interval.check(name)?;
            }
        }
        if space.embedding_dim.contains(&0) || space.hidden_layers.iter().flatten().any(|&w| w == 0)
        {
            anyhow::bail!("tuning space: embedding sizes and layer widths must be positive");
        }
        Ok(space)
    }
}

/// The settings one trial trains with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrialParams {
    pub learning_rate: f64,
    pub sparse_learning_rate: f64,
    pub weight_decay: f64,
    pub embedding_dim: usize,
    pub hidden_layers: Vec<usize>,
}

/// One row of the trials table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrialResult {
    pub trial: usize,
    pub params: TrialParams,
    /// The lowest validation log loss of the trial's epochs (its best epoch is what it would keep); infinite
    /// (`null` in JSON) when no epoch gave a finite one.
    #[serde(deserialize_with = "loss_or_infinity")]
    pub validation_log_loss: f64,
    pub epochs: usize,
    pub seconds: f64,
}

/// JSON has no infinity: a loss written as `null` reads back as one.
fn loss_or_infinity<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::INFINITY))
}

/// Trial `trial`'s settings: the job's own for trial 0, else a draw from `space` (seeded by the job's seed
/// and the trial, so a rerun searches the same points).
pub fn trial_params(
    space: &SearchSpace,
    base: &TrialParams,
    seed: u64,
    trial: usize,
) -> TrialParams {
    if trial == 0 {
        return base.clone();
    }
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (trial as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut pick = |interval: &Option<Interval>, default: f64| {
        interval.as_ref().map_or(default, |i| i.draw(&mut rng))
    };
    let learning_rate = pick(&space.learning_rate, base.learning_rate);
    let sparse_learning_rate = pick(&space.sparse_learning_rate, base.sparse_learning_rate);
    let weight_decay = pick(&space.weight_decay, base.weight_decay);
    let embedding_dim = choose(&space.embedding_dim, &mut rng).unwrap_or(base.embedding_dim);
    let hidden_layers =
        choose(&space.hidden_layers, &mut rng).unwrap_or_else(|| base.hidden_layers.clone());
    TrialParams {
        learning_rate,
        sparse_learning_rate,
        weight_decay,
        embedding_dim,
        hidden_layers,
    }
}

fn choose<T: Clone>(options: &[T], rng: &mut ChaCha8Rng) -> Option<T> {
    if options.is_empty() {
        return None;
    }
    options.get(rng.random_range(0..options.len())).cloned()
}

/// A trial keeps no checkpoints within itself: a restarted pod runs an unfinished trial again.
type SaveCheckpoint<B> = fn(&Trainer<B>, Position) -> Result<(), ArtifactError>;

/// The winning trial: its trainer (trained to its best epoch), its configurations and how it converged.
pub struct Best<B: AutodiffBackend> {
    pub trainer: Trainer<B>,
    pub model: ModelConfig,
    pub config: TrainConfig,
    pub convergence: Convergence,
    pub trials: Vec<TrialResult>,
    pub best: usize,
}

/// What a search has done, kept in the job's checkpoint directory: every finished trial's row, and the best
/// trial's full training state. Trials are drawn by index from the job's seed, so the finished ones are those a
/// new search runs first; a record of another search (other space, settings, seed or data) is not resumed.
pub struct SearchRecord {
    dir: PathBuf,
    fingerprint: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedSearch {
    fingerprint: String,
    trials: Vec<TrialResult>,
    best: usize,
    convergence: Convergence,
}

/// The best trial so far: its index, validation loss, trained state, configurations and convergence.
type Leader<B> = (
    usize,
    f64,
    Trainer<B>,
    ModelConfig,
    TrainConfig,
    Convergence,
);

impl SearchRecord {
    pub fn new(
        dir: &Path,
        space: &SearchSpace,
        base: &TrialParams,
        seed: u64,
        rows: (usize, usize),
    ) -> SearchRecord {
        SearchRecord {
            dir: dir.to_owned(),
            fingerprint:
                json!({"space": space, "base": base, "seed": seed, "rows": [rows.0, rows.1]})
                    .to_string(),
        }
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("tuning.json")
    }

    fn best_path(&self, trial: usize) -> PathBuf {
        self.dir.join(format!("tuning-best-{trial}.fwc"))
    }

    /// The finished trials (at most `trials`) and the leader among them, when a record of this search is kept.
    fn load<B: AutodiffBackend>(
        &self,
        trials: usize,
        device: &B::Device,
    ) -> Option<(Vec<TrialResult>, Leader<B>)> {
        let saved: SavedSearch =
            serde_json::from_slice(&std::fs::read(self.record_path()).ok()?).ok()?;
        if saved.fingerprint != self.fingerprint || saved.trials.len() > trials {
            return None;
        }
        let loss = saved.trials.get(saved.best)?.validation_log_loss;
        let bytes = std::fs::read(self.best_path(saved.best)).ok()?;
        let (trainer, _, card) = Trainer::<B>::resume(&bytes, device.clone()).ok()?;
        let leader = (
            saved.best,
            loss,
            trainer,
            card.model,
            card.training,
            saved.convergence,
        );
        Some((saved.trials, leader))
    }

    /// Keeps the finished `trials`. A new leader's state is written first, under its trial's name, so the record
    /// never names a state that is not there; the previous leader's goes after.
    fn save<B: AutodiffBackend>(
        &self,
        trials: &[TrialResult],
        leader: &Leader<B>,
        new_leader: Option<&ModelCard>,
    ) -> anyhow::Result<()> {
        let (best, _, trainer, _, _, convergence) = leader;
        std::fs::create_dir_all(&self.dir)?;
        if let Some(card) = new_leader {
            write_replacing(
                &self.best_path(*best),
                &trainer.checkpoint(card, Position::default())?,
            )?;
        }
        let saved = SavedSearch {
            fingerprint: self.fingerprint.clone(),
            trials: trials.to_vec(),
            best: *best,
            convergence: convergence.clone(),
        };
        write_replacing(&self.record_path(), &serde_json::to_vec(&saved)?)?;
        if new_leader.is_some() {
            for earlier in trials.iter().map(|t| t.trial).filter(|t| t != best) {
                let _ = std::fs::remove_file(self.best_path(earlier));
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temporary file renamed into place: a crash leaves the old file whole.
fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

/// Makes the model card a kept trial state carries (its model and training settings).
pub type CardOf<'a> = &'a dyn Fn(&ModelConfig, &TrainConfig) -> anyhow::Result<ModelCard>;

/// Runs `trials` trials and keeps the best; every trial is reported as it ends. With a `record`, finished
/// trials are kept as they end and a kept record of the same search is gone on from.
pub fn search<B: AutodiffBackend>(
    (space, trials, sparse_kind): (&SearchSpace, usize, &str),
    base: &TrialParams,
    (model, config): (&ModelConfig, &TrainConfig),
    (train, validation): (&EncodedDataset, &EncodedDataset),
    device: &B::Device,
    record: Option<(&SearchRecord, CardOf<'_>)>,
) -> anyhow::Result<Best<B>> {
    let trials = trials.max(1);
    let (mut results, mut best): (Vec<TrialResult>, Option<Leader<B>>) = match record
        .and_then(|(record, _)| record.load::<B>(trials, device))
    {
        Some((finished, leader)) => {
            emit(
                json!({"event": "tuningResumed", "finishedTrials": finished.len(), "best": leader.0}),
            );
            (finished, Some(leader))
        }
        None => (Vec::new(), None),
    };
    for trial in results.len()..trials {
        let params = trial_params(space, base, config.seed, trial);
        let trial_model = ModelConfig {
            embedding_dim: params.embedding_dim,
            hidden_layers: if model.architecture == Architecture::Logistic {
                Vec::new()
            } else {
                params.hidden_layers.clone()
            },
            ..model.clone()
        };
        let trial_config = TrainConfig {
            learning_rate: params.learning_rate,
            weight_decay: params.weight_decay,
            sparse_optimizer: sparse_optimizer(sparse_kind, params.sparse_learning_rate as f32)?,
            ..config.clone()
        };
        let started = Instant::now();
        let mut trainer =
            Trainer::<B>::new(trial_model.clone(), trial_config.clone(), device.clone());
        trainer.start_at_base_rate(train.positive_rate());
        let no_checkpoint: Option<(u64, SaveCheckpoint<B>)> = None;
        let convergence = trainer.fit_from(
            train,
            Some(validation),
            Position::default(),
            |_| {},
            no_checkpoint,
        )?;
        let loss = convergence
            .validation_log_loss
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f64::INFINITY, f64::min);
        let result = TrialResult {
            trial,
            params,
            validation_log_loss: loss,
            epochs: convergence.epochs_trained,
            seconds: started.elapsed().as_secs_f64(),
        };
        emit(json!({"event": "trial", "trial": &result}));
        results.push(result);
        let leads = best
            .as_ref()
            .is_none_or(|(_, best_loss, ..)| loss < *best_loss);
        if leads {
            best = Some((trial, loss, trainer, trial_model, trial_config, convergence));
        }
        if let (Some((record, card_of)), Some(leader)) = (record, &best) {
            let card = if leads {
                Some(card_of(&leader.3, &leader.4)?)
            } else {
                None
            };
            // A record that cannot be written costs a restart its progress, not this search.
            if let Err(error) = record.save(&results, leader, card.as_ref()) {
                emit(json!({"event": "tuningRecordFailed", "error": error.to_string()}));
            }
        }
    }
    let Some((best, _, trainer, model, config, convergence)) = best else {
        anyhow::bail!("no trial ran");
    };
    Ok(Best {
        trainer,
        model,
        config,
        convergence,
        trials: results,
        best,
    })
}

/// Four significant digits: enough to tell trials apart, short enough for a termination message.
fn rounded(value: f64) -> f64 {
    format!("{value:.3e}").parse().unwrap_or(value)
}

/// The trials as the termination message carries them (a pod's message holds 4 KiB): one array per trial,
/// `[trial, learningRate, sparseLearningRate, weightDecay, embeddingDim, hiddenLayers, validationLogLoss,
/// epochs]`. The full table goes to `trials.json` beside the model.
pub fn compact(trials: &[TrialResult]) -> Vec<serde_json::Value> {
    trials
        .iter()
        .map(|t| {
            json!([
                t.trial,
                rounded(t.params.learning_rate),
                rounded(t.params.sparse_learning_rate),
                rounded(t.params.weight_decay),
                t.params.embedding_dim,
                t.params.hidden_layers,
                rounded(t.validation_log_loss),
                t.epochs,
            ])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> TrialParams {
        TrialParams {
            learning_rate: 0.003,
            sparse_learning_rate: 0.05,
            weight_decay: 0.0,
            embedding_dim: 16,
            hidden_layers: vec![400, 400],
        }
    }

    #[test]
    fn trial_zero_is_the_jobs_settings_and_draws_stay_in_the_space() -> anyhow::Result<()> {
        let space = SearchSpace::parse(
            r#"{"learningRate": {"min": 0.0001, "max": 0.1}, "embeddingDim": [8, 32],
                "hiddenLayers": [[64], [128, 64]], "weightDecay": {"min": 0, "max": 0.001, "scale": "linear"}}"#,
        )?;
        assert_eq!(trial_params(&space, &base(), 7, 0), base());
        for trial in 1..50 {
            let params = trial_params(&space, &base(), 7, trial);
            assert!((0.0001..=0.1).contains(&params.learning_rate), "{params:?}");
            assert!([8, 32].contains(&params.embedding_dim));
            assert!([vec![64], vec![128, 64]].contains(&params.hidden_layers));
            assert!((0.0..=0.001).contains(&params.weight_decay));
            assert_eq!(params.sparse_learning_rate, 0.05, "not in the space: kept");
            assert_eq!(params, trial_params(&space, &base(), 7, trial), "seeded");
        }
        Ok(())
    }

    #[test]
    fn thirty_two_compact_trials_fit_a_termination_message_with_room_to_spare() {
        let trials: Vec<TrialResult> = (0..32)
            .map(|trial| TrialResult {
                trial,
                params: TrialParams {
                    learning_rate: 0.001_234_567_891_234,
                    sparse_learning_rate: 0.051_234_567,
                    weight_decay: 0.000_012_345_678,
                    embedding_dim: 32,
                    hidden_layers: vec![256, 128, 64],
                },
                validation_log_loss: 0.456_789_123_456,
                epochs: 17,
                seconds: 1.5,
            })
            .collect();
        let text = serde_json::to_string(&compact(&trials)).unwrap_or_default();
        assert!(text.len() < 2_200, "{} bytes", text.len());
        assert!(
            text.starts_with("[[0,0.001235,0.05123,0.00001235,32,[256,128,64],0.4568,17]"),
            "{text}"
        );
    }

    #[test]
    fn a_space_that_cannot_be_drawn_from_is_refused() {
        for bad in [
            r#"{"learningRate": {"min": 0, "max": 0.1}}"#,
            r#"{"learningRate": {"min": 0.1, "max": 0.01}}"#,
            r#"{"embeddingDim": [0]}"#,
            r#"{"momentum": {"min": 0.1, "max": 0.9}}"#,
        ] {
            assert!(SearchSpace::parse(bad).is_err(), "{bad}");
        }
    }

    /// Generated data, encoded, split into a training slice and a validation slice.
    fn small_data() -> (EncodedDataset, EncodedDataset) {
        use flywheel_ml::synthetic::{SyntheticConfig, feature_schema, generate};
        let generated = generate(&SyntheticConfig {
            rows: 3_000,
            users: 200,
            items: 100,
            seed: 3,
            ..SyntheticConfig::default()
        });
        let schema = feature_schema(1_000);
        let encode = |rows: &[flywheel_ml::synthetic::Impression]| {
            EncodedDataset::encode(
                &schema,
                rows,
                |row, column| row.value(column),
                |row| row.clicked,
                |row| u64::from(row.user_id),
            )
            .unwrap_or_else(|err| panic!("{err}"))
        };
        (
            encode(&generated.impressions[..2_400]),
            encode(&generated.impressions[2_400..]),
        )
    }

    #[test]
    fn a_restarted_search_goes_on_from_its_record_and_ends_where_an_unbroken_one_does()
    -> anyhow::Result<()> {
        use flywheel_ml::artifact::{FORMAT, ModelCard};
        use flywheel_ml::synthetic::feature_schema;

        let (train, validation) = small_data();
        let model = ModelConfig {
            architecture: Architecture::WideDeep,
            embedding_dim: 8,
            hidden_layers: vec![16],
            fields: train.fields,
            numeric: train.numeric_width,
        };
        let config = TrainConfig {
            epochs: 2,
            batch_size: 256,
            seed: 9,
            patience: Some(1),
            ..TrainConfig::default()
        };
        let base = TrialParams {
            learning_rate: 0.003,
            sparse_learning_rate: 0.05,
            weight_decay: 0.0,
            embedding_dim: 8,
            hidden_layers: vec![16],
        };
        let space = SearchSpace::parse(r#"{"learningRate": {"min": 0.0005, "max": 0.02}}"#)?;
        let card_of = |model: &ModelConfig, config: &TrainConfig| {
            Ok(ModelCard {
                format: FORMAT.to_owned(),
                model: model.clone(),
                schema: feature_schema(1_000),
                feature_schema_hash: feature_schema(1_000).hash(),
                training: config.clone(),
                metrics: Default::default(),
                lineage: Default::default(),
                code_version: "test".into(),
                step: 0,
                calibrator: None,
                convergence: None,
            })
        };
        let dir = std::env::temp_dir().join(format!("flywheel-tuning-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let record = SearchRecord::new(
            &dir,
            &space,
            &base,
            config.seed,
            (train.len(), validation.len()),
        );
        let run = |trials: usize, record: Option<&SearchRecord>| {
            search::<crate::CpuBackend>(
                (&space, trials, "adagrad"),
                &base,
                (&model, &config),
                (&train, &validation),
                &Default::default(),
                record.map(|record| (record, &card_of as CardOf<'_>)),
            )
        };

        // A pod that ends after two trials, then a new one asked for three.
        let interrupted = run(2, Some(&record))?;
        let resumed = run(3, Some(&record))?;
        assert_eq!(
            resumed.trials[..2],
            interrupted.trials[..],
            "the finished trials are taken from the record (their timings too), not run again"
        );
        assert_eq!(resumed.trials.len(), 3);

        let unbroken = run(3, None)?;
        let losses = |best: &Best<crate::CpuBackend>| -> Vec<f64> {
            best.trials.iter().map(|t| t.validation_log_loss).collect()
        };
        assert_eq!(losses(&resumed), losses(&unbroken));
        assert_eq!(resumed.best, unbroken.best);
        assert_eq!(
            resumed.trainer.predict(&validation),
            unbroken.trainer.predict(&validation),
            "the kept leader is the same model"
        );

        let other_seed =
            SearchRecord::new(&dir, &space, &base, 10, (train.len(), validation.len()));
        assert!(
            other_seed
                .load::<crate::CpuBackend>(3, &Default::default())
                .is_none(),
            "a record of another search is not resumed"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
