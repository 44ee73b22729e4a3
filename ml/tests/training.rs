//! Real training on generated data: every architecture learns, DeepFM gets close to the Bayes-optimal AUC of
//! the data, and the same seed gives the same model.

use burn::backend::{Autodiff, Flex};
use flywheel_ml::model::{Architecture, ModelConfig};
use flywheel_ml::synthetic::{SyntheticConfig, feature_schema, generate};
use flywheel_ml::train::{EncodedDataset, TrainConfig, Trainer};

type Cpu = Autodiff<Flex>;

fn data(seed: u64, rows: usize) -> (EncodedDataset, EncodedDataset, f64) {
    generated_split(&SyntheticConfig {
        seed,
        rows,
        ..SyntheticConfig::default()
    })
}

/// Generated data with 1,000 users and 300 items, encoded and split 80/20 by time, with its Bayes AUC.
fn generated_split(config: &SyntheticConfig) -> (EncodedDataset, EncodedDataset, f64) {
    let generated = generate(&SyntheticConfig {
        users: 1_000,
        items: 300,
        ..config.clone()
    });
    let schema = feature_schema(5_000);
    let split = config.rows * 4 / 5;
    let encode = |slice: &[flywheel_ml::synthetic::Impression]| {
        EncodedDataset::encode(
            &schema,
            slice,
            |row, column| row.value(column),
            |row| row.clicked,
            |row| u64::from(row.user_id),
        )
        .unwrap_or_else(|err| panic!("{err}"))
    };
    (
        encode(&generated.impressions[..split]),
        encode(&generated.impressions[split..]),
        generated.bayes_auc,
    )
}

fn model(architecture: Architecture, train: &EncodedDataset) -> ModelConfig {
    let hidden_layers = if architecture == Architecture::Logistic {
        vec![]
    } else {
        vec![32, 16]
    };
    ModelConfig {
        architecture,
        embedding_dim: 8,
        hidden_layers,
        fields: train.fields,
        numeric: train.numeric_width,
    }
}

/// The card a checkpoint of a model trained on [`data`] carries.
fn checkpoint_card(
    model: &ModelConfig,
    training: &TrainConfig,
) -> flywheel_ml::artifact::ModelCard {
    flywheel_ml::artifact::ModelCard {
        format: flywheel_ml::artifact::FORMAT.to_owned(),
        model: model.clone(),
        schema: feature_schema(5_000),
        feature_schema_hash: feature_schema(5_000).hash(),
        training: training.clone(),
        metrics: Default::default(),
        lineage: Default::default(),
        code_version: "test".into(),
        step: 0,
        calibrator: None,
        convergence: None,
    }
}

fn config(seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: 256,
        learning_rate: 0.003,
        seed,
        ..TrainConfig::default()
    }
}

#[test]
fn every_architecture_learns_and_deepfm_nears_the_bayes_auc() {
    let (train, eval, bayes_auc) = data(11, 40_000);
    for architecture in [
        Architecture::Logistic,
        Architecture::WideDeep,
        Architecture::DeepFm,
    ] {
        let mut trainer =
            Trainer::<Cpu>::new(model(architecture, &train), config(5), Default::default());
        let mut losses = Vec::new();
        trainer.fit(&train, |progress| losses.push(progress.loss));
        let metrics = trainer.evaluate(&eval);
        let auc = metrics.auc.unwrap_or_default();
        eprintln!(
            "{architecture:?}: AUC {auc:.4} (Bayes {bayes_auc:.4}), calibration {:?}",
            metrics.calibration
        );
        assert!(losses.iter().all(|l| l.is_finite()));
        let early: f64 = losses[..20].iter().sum::<f64>() / 20.0;
        let late: f64 = losses[losses.len() - 20..].iter().sum::<f64>() / 20.0;
        assert!(late < early, "{architecture:?}: loss {early} → {late}");
        assert!(auc > 0.62, "{architecture:?} did not learn: AUC {auc}");
        if architecture == Architecture::DeepFm {
            assert!(
                auc > bayes_auc - 0.1,
                "DeepFM AUC {auc} too far below Bayes {bayes_auc}"
            );
        }
    }
}

#[test]
fn same_seed_same_model() {
    let (train, eval, _) = data(3, 6_000);
    let run = || {
        let mut trainer = Trainer::<Cpu>::new(
            model(Architecture::DeepFm, &train),
            config(9),
            Default::default(),
        );
        trainer.fit(&train, |_| {});
        trainer.predict(&eval)
    };
    let (first, second) = (run(), run());
    assert_eq!(
        first, second,
        "same seed and data must give the same weights"
    );
    let mut other = Trainer::<Cpu>::new(
        model(Architecture::DeepFm, &train),
        config(10),
        Default::default(),
    );
    other.fit(&train, |_| {});
    assert_ne!(first, other.predict(&eval));
}

#[test]
fn resuming_from_a_checkpoint_gives_the_uninterrupted_result() {
    use flywheel_ml::train::Position;
    let (train, eval, _) = data(4, 6_000);
    let model_config = model(Architecture::DeepFm, &train);
    let config = TrainConfig {
        epochs: 2,
        ..config(21)
    };
    let mut uninterrupted =
        Trainer::<Cpu>::new(model_config.clone(), config.clone(), Default::default());
    uninterrupted.fit(&train, |_| {});
    let expected = uninterrupted.predict(&eval);

    let card = checkpoint_card(&model_config, &config);
    let mut saved: Option<Vec<u8>> = None;
    let mut interrupted = Trainer::<Cpu>::new(model_config, config, Default::default());
    // 6 000 × 0.8 rows at 256 a batch is 19 steps an epoch: step 25 is inside the second epoch.
    interrupted
        .fit_from(
            &train,
            None,
            Position::default(),
            |_| {},
            Some((25, |trainer: &Trainer<Cpu>, position: Position| {
                if saved.is_none() {
                    saved = Some(trainer.checkpoint(&card, position)?);
                }
                Ok(())
            })),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes = saved.unwrap_or_else(|| panic!("no checkpoint was taken"));
    let (mut resumed, position, _) =
        Trainer::<Cpu>::resume(&bytes, Default::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (position, resumed.step),
        (Position { epoch: 1, batch: 6 }, 25)
    );
    let no_checkpoints = None::<(
        u64,
        fn(&Trainer<Cpu>, Position) -> Result<(), flywheel_ml::artifact::ArtifactError>,
    )>;
    resumed
        .fit_from(&train, None, position, |_| {}, no_checkpoints)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resumed.step, uninterrupted.step);
    assert_eq!(
        resumed.predict(&eval),
        expected,
        "resume must continue exactly where the run stopped"
    );
}

/// Clicks that depend only on a user × item interaction: a linear model cannot rank them, the factor models must.
#[test]
fn factor_models_learn_a_pure_interaction_that_logistic_cannot() {
    use flywheel_ml::schema::{FeatureSchema, FeatureSpec, ValueType};
    use flywheel_ml::transform::{Transform, Value};
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let sign = |id: u32| if id.is_multiple_of(2) { 1.0 } else { -1.0 };
    let rows: Vec<(u32, u32, bool)> = (0..60_000)
        .map(|_| {
            let (user, item) = (rng.random_range(0..40u32), rng.random_range(0..40u32));
            let p = 1.0 / (1.0 + f64::exp(-2.5 * sign(user) * sign(item)));
            (user, item, rng.random::<f64>() < p)
        })
        .collect();
    let schema = FeatureSchema {
        features: ["user", "item"]
            .iter()
            .map(|name| FeatureSpec {
                name: (*name).into(),
                value_type: ValueType::Int64,
                transform: Some(Transform::HashBucket { buckets: 1000 }),
            })
            .collect(),
    };
    let encode = |slice: &[(u32, u32, bool)]| {
        EncodedDataset::encode(
            &schema,
            slice,
            |row, column| Value::Int(i64::from(if column == "user" { row.0 } else { row.1 })),
            |row| row.2,
            |row| u64::from(row.0),
        )
        .unwrap_or_else(|err| panic!("{err}"))
    };
    let (train, eval) = (encode(&rows[..50_000]), encode(&rows[50_000..]));
    let bayes = 1.0 / (1.0 + f64::exp(-2.5));
    let labels: Vec<bool> = rows[50_000..].iter().map(|r| r.2).collect();
    let truth: Vec<f64> = rows[50_000..]
        .iter()
        .map(|r| {
            if sign(r.0) * sign(r.1) > 0.0 {
                bayes
            } else {
                1.0 - bayes
            }
        })
        .collect();
    let bayes_auc = flywheel_ml::metrics::auc(&truth, &labels).unwrap_or(0.5);
    for architecture in [
        Architecture::Logistic,
        Architecture::DeepFm,
        Architecture::WideDeep,
    ] {
        let mut trainer = Trainer::<Cpu>::new(
            model(architecture, &train),
            TrainConfig {
                epochs: 2,
                ..config(1)
            },
            Default::default(),
        );
        trainer.fit(&train, |_| {});
        let auc = trainer.evaluate(&eval).auc.unwrap_or(0.5);
        eprintln!("{architecture:?}: AUC {auc:.4}, Bayes {bayes_auc:.4}");
        if architecture == Architecture::Logistic {
            assert!(
                auc < 0.56,
                "a linear model cannot rank a pure interaction: {auc}"
            );
        } else {
            assert!(
                auc > bayes_auc - 0.02,
                "{architecture:?} AUC {auc} vs Bayes {bayes_auc}"
            );
        }
    }
}

/// A small table (train, validation, eval) and a configuration of up to 100 epochs with early stopping, fast
/// enough to overfit within a few epochs.
fn overfitting_small_table() -> (EncodedDataset, EncodedDataset, EncodedDataset, TrainConfig) {
    let (mut train, eval, _) = data(17, 4_000);
    let validation = train
        .split_validation(0.2)
        .unwrap_or_else(|| panic!("no validation set"));
    let config = TrainConfig {
        epochs: 100,
        patience: Some(2),
        plateau_decay: 0.5,
        learning_rate: 0.01,
        ..config(3)
    };
    (train, validation, eval, config)
}

/// A small table trained for up to 100 epochs overfits within a few: early stopping ends the run `patience`
/// epochs after the best one, keeps the best epoch's weights, and reports all of it.
#[test]
fn early_stopping_keeps_the_best_epoch_and_says_so() {
    let (train, validation, _, config) = overfitting_small_table();
    let mut trainer = Trainer::<Cpu>::new(
        model(Architecture::DeepFm, &train),
        config,
        Default::default(),
    );
    let convergence = trainer
        .fit_from(
            &train,
            Some(&validation),
            flywheel_ml::train::Position::default(),
            |_| {},
            None::<(
                u64,
                fn(
                    &Trainer<Cpu>,
                    flywheel_ml::train::Position,
                ) -> Result<(), flywheel_ml::artifact::ArtifactError>,
            )>,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{convergence:?}");
    assert!(convergence.stopped_early, "{convergence:?}");
    assert!(convergence.epochs_trained < 100);
    let losses = &convergence.validation_log_loss;
    assert_eq!(losses.len(), convergence.epochs_trained);
    let best = losses
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(epoch, _)| epoch);
    assert_eq!(convergence.best_epoch, best);
    assert_eq!(
        convergence.epochs_trained,
        best.unwrap_or_default() + 1 + 2,
        "stops `patience` epochs after the best"
    );
    let kept = trainer.evaluate(&validation).log_loss.unwrap_or_default();
    let best_loss = losses.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        (kept - best_loss).abs() < 1e-9,
        "the best epoch's weights are kept: {kept} vs {best_loss}"
    );
}

/// Clicks at 1%: a fresh model starts at the base rate, and a Platt calibrator fitted on held-out rows brings
/// the eval set's Σ predicted / Σ clicked near 1 while leaving the ranking as it was.
#[test]
fn rare_clicks_start_at_the_base_rate_and_end_calibrated() {
    let (mut train, eval, _) = generated_split(&SyntheticConfig {
        seed: 23,
        rows: 60_000,
        base_logit: -4.5,
        ..SyntheticConfig::default()
    });
    let rate = train.positive_rate();
    assert!(rate > 0.003 && rate < 0.03, "click rate {rate}");
    let validation = train
        .split_validation(0.2)
        .unwrap_or_else(|| panic!("no validation set"));
    // Logistic: its first-order weights start at 0, so only the bias and the small numeric weights speak.
    let mut untrained = Trainer::<Cpu>::new(
        model(Architecture::Logistic, &train),
        config(4),
        Default::default(),
    );
    untrained.start_at_base_rate(rate);
    let predictions = untrained.predict(&eval);
    let mean = predictions.iter().sum::<f64>() / predictions.len() as f64;
    assert!(
        (mean / rate - 1.0).abs() < 0.25,
        "an untrained model predicts {mean} at a click rate of {rate}"
    );
    let mut trainer = Trainer::<Cpu>::new(
        model(Architecture::WideDeep, &train),
        config(4),
        Default::default(),
    );
    trainer.start_at_base_rate(rate);
    trainer.fit(&train, |_| {});
    let before = trainer.evaluate(&eval);
    assert!(trainer.calibrate(
        flywheel_ml::calibration::CalibrationMethod::Platt,
        &validation
    ));
    let after = trainer.evaluate(&eval);
    eprintln!("before {before:?}\nafter {after:?}");
    assert_eq!(after.uncalibrated_calibration, before.calibration);
    let calibration = after.calibration.unwrap_or_default();
    assert!(
        (calibration - 1.0).abs() < 0.15,
        "calibrated Σp/Σy {calibration}"
    );
    assert!(
        (after.auc.unwrap_or_default() - before.auc.unwrap_or_default()).abs() < 1e-9,
        "Platt scaling is monotone: AUC unchanged"
    );
}

/// Early stopping's memory travels in the checkpoint: a run resumed after its best epoch still stops where the
/// uninterrupted run stops, with the same best weights and the same record of every epoch.
#[test]
fn a_resumed_run_stops_early_exactly_as_the_uninterrupted_one() {
    use flywheel_ml::artifact::ArtifactError;
    use flywheel_ml::train::Position;
    let (train, validation, eval, config) = overfitting_small_table();
    let model_config = model(Architecture::DeepFm, &train);
    let no_checkpoints = None::<(
        u64,
        fn(&Trainer<Cpu>, Position) -> Result<(), ArtifactError>,
    )>;
    let mut uninterrupted =
        Trainer::<Cpu>::new(model_config.clone(), config.clone(), Default::default());
    let expected = uninterrupted
        .fit_from(
            &train,
            Some(&validation),
            Position::default(),
            |_| {},
            no_checkpoints,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let best = expected.best_epoch.unwrap_or_default();
    // 2 560 rows at 256 a batch: 10 steps an epoch. The checkpoint is taken inside the epoch after the best,
    // when early stopping has a best epoch and one epoch without improvement behind it.
    let resume_at = (best as u64 + 1) * 10 + 5;
    let card = checkpoint_card(&model_config, &config);
    let mut saved: Option<Vec<u8>> = None;
    let mut interrupted = Trainer::<Cpu>::new(model_config, config, Default::default());
    interrupted
        .fit_from(
            &train,
            Some(&validation),
            Position::default(),
            |_| {},
            Some((resume_at, |trainer: &Trainer<Cpu>, position: Position| {
                if saved.is_none() {
                    saved = Some(trainer.checkpoint(&card, position)?);
                }
                Ok(())
            })),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes = saved.unwrap_or_else(|| panic!("no checkpoint was taken"));
    let (mut resumed, position, _) =
        Trainer::<Cpu>::resume(&bytes, Default::default()).unwrap_or_else(|e| panic!("{e}"));
    let no_checkpoints = None::<(
        u64,
        fn(&Trainer<Cpu>, Position) -> Result<(), ArtifactError>,
    )>;
    let convergence = resumed
        .fit_from(&train, Some(&validation), position, |_| {}, no_checkpoints)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(convergence, expected);
    assert_eq!(resumed.predict(&eval), uninterrupted.predict(&eval));
}
