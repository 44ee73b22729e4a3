//! The trainer's search (`--tune-trials`), as a TrainingJob's single pod runs it: every trial trains for real on
//! generated data, trial 0 is the job's own settings, the best validation log loss wins, and the result carries
//! the trials table the operator copies into the job's status (the full table is beside the model).

use std::process::Command;

use flywheel_e2e::bin_dir;
use flywheel_e2e::serving::dataset;
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn the_best_of_the_trials_is_the_model_and_the_trials_are_reported() -> TestResult {
    let dir = std::env::temp_dir().join(format!("flywheel-tuning-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dataset(&dir.join("data"), 4_000, 31)?;
    let out = dir.join("model");
    let termination = dir.join("termination-log");
    let output = Command::new(bin_dir().join("flywheel-trainer"))
        .arg("train")
        .arg("--train")
        .arg(data.dir.join("train.parquet"))
        .arg("--eval")
        .arg(data.dir.join("eval.parquet"))
        .arg("--schema")
        .arg(data.dir.join("schema.json"))
        .args(["--architecture", "wide_deep", "--embedding-dim", "8"])
        .args(["--hidden", "16", "--epochs", "4", "--seed", "5"])
        .args(["--tune-trials", "4"])
        .args([
            "--tune-space",
            r#"{"learningRate": {"min": 0.001, "max": 0.03}, "embeddingDim": [4, 8, 16],
                "hiddenLayers": [[16], [32, 16]]}"#,
        ])
        .arg("--output")
        .arg(&out)
        .arg("--termination-log")
        .arg(&termination)
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&std::fs::read(&termination)?)?;
    let tuning = &result["tuning"];
    let trials = tuning["trials"].as_array().ok_or("no trials")?;
    assert_eq!(trials.len(), 4, "{result}");
    // [trial, learningRate, sparseLearningRate, weightDecay, embeddingDim, hiddenLayers, loss, epochs]
    assert_eq!(
        trials[0][1].as_f64(),
        Some(0.003),
        "trial 0 is the job's settings"
    );
    assert_eq!(trials[0][4].as_u64(), Some(8));
    let losses: Vec<f64> = trials.iter().filter_map(|t| t[6].as_f64()).collect();
    let best = usize::try_from(tuning["best"].as_u64().ok_or("no best")?)?;
    let lowest = losses.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(losses[best], lowest, "{losses:?}");
    assert!(losses[best] <= losses[0]);
    assert!(
        result.to_string().len() < 4_096,
        "a pod's termination message holds 4 KiB"
    );
    let table: Value = serde_json::from_slice(&std::fs::read(out.join("trials.json"))?)?;
    assert_eq!(table.as_array().map(Vec::len), Some(4));
    // The registered model is the best trial's: its card says so.
    let card = Command::new(bin_dir().join("flywheel-trainer"))
        .arg("score")
        .arg("--model")
        .arg(out.join("model.fwm"))
        .arg("--data")
        .arg(data.dir.join("eval.parquet"))
        .arg("--out")
        .arg(dir.join("scores.json"))
        .status()?;
    assert!(card.success());
    let best_dim = trials[best][4].as_u64();
    let bytes = std::fs::read(out.join("model.fwm"))?;
    let saved = flywheel_ml::artifact::card(&bytes)?;
    assert_eq!(Some(saved.model.embedding_dim as u64), best_dim);

    // A search needs one process: with a parameter server it is refused.
    let refused = Command::new(bin_dir().join("flywheel-trainer"))
        .arg("train")
        .arg("--train")
        .arg(data.dir.join("train.parquet"))
        .arg("--eval")
        .arg(data.dir.join("eval.parquet"))
        .arg("--schema")
        .arg(data.dir.join("schema.json"))
        .args(["--tune-trials", "2", "--ps", "127.0.0.1:1"])
        .arg("--output")
        .arg(dir.join("refused"))
        .output()?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not with --ps"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
