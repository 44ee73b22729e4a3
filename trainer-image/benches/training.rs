//! Training benchmark: samples/s and AUC of each architecture on generated data, next to the Bayes-optimal AUC
//! of that data. Run with `cargo bench -p flywheel-trainer --bench training` (release build); set
//! `FLYWHEEL_BENCH_ROWS` to change the data size (default 400 000, 80% train / 20% eval split by time).

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use flywheel_ml::model::{Architecture, ModelConfig};
use flywheel_ml::synthetic::{Impression, SyntheticConfig, feature_schema, generate};
use flywheel_ml::train::{EncodedDataset, TrainConfig, Trainer};

type Cpu = Autodiff<Flex>;

// The same allocator as the trainer binary: burn's per-step temporaries page-fault under glibc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let rows: usize = std::env::var("FLYWHEEL_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let data = generate(&SyntheticConfig {
        seed: 2026,
        users: 5_000,
        items: 1_000,
        rows,
        ..SyntheticConfig::default()
    });
    let split = rows * 4 / 5;
    let schema = feature_schema(100_000);
    let encode = |slice: &[Impression]| {
        EncodedDataset::encode(
            &schema,
            slice,
            |r, c| r.value(c),
            |r| r.clicked,
            |r| u64::from(r.user_id),
        )
        .unwrap_or_else(|err| panic!("{err}"))
    };
    let (train, eval) = (
        encode(&data.impressions[..split]),
        encode(&data.impressions[split..]),
    );
    let eval_probabilities: Vec<f64> = data.impressions[split..]
        .iter()
        .map(|i| i.true_probability)
        .collect();
    let eval_labels: Vec<bool> = data.impressions[split..]
        .iter()
        .map(|i| i.clicked)
        .collect();
    let bayes = flywheel_ml::metrics::auc(&eval_probabilities, &eval_labels).unwrap_or(0.5);
    println!(
        "rows: {} train / {} eval, fields {}, click rate {:.3}, threads: burn flex default",
        train.len(),
        eval.len(),
        train.fields,
        data.click_rate
    );
    println!(
        "| topology | model | batch | samples/s | AUC | Bayes AUC | gap | GAUC | calibration |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (architecture, hidden) in [
        (Architecture::Logistic, vec![]),
        (Architecture::WideDeep, vec![400, 400]),
        (Architecture::DeepFm, vec![400, 400]),
    ] {
        for batch_size in [1024, 4096] {
            let model = ModelConfig {
                architecture,
                embedding_dim: 16,
                hidden_layers: hidden.clone(),
                fields: train.fields,
                numeric: train.numeric_width,
            };
            let config = TrainConfig {
                epochs: 1,
                batch_size,
                learning_rate: 0.001,
                seed: 7,
                ..TrainConfig::default()
            };
            let mut trainer = Trainer::<Cpu>::new(model, config, Default::default());
            let started = Instant::now();
            trainer.fit(&train, |_| {});
            let rate = train.len() as f64 / started.elapsed().as_secs_f64();
            let metrics = trainer.evaluate(&eval);
            let auc = metrics.auc.unwrap_or(0.5);
            println!(
                "| single | {architecture:?} | {batch_size} | {rate:.0} | {auc:.4} | {bayes:.4} | {:.4} | {:.4} | {:.3} |",
                bayes - auc,
                metrics.gauc.unwrap_or(0.5),
                metrics.calibration.unwrap_or(0.0)
            );
        }
    }
}
