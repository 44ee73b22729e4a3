//! Every metric equals scikit-learn / scipy / numpy to 1e-9 on the committed reference vectors
//! (`tests/reference/metrics.json`, produced by `tests/reference/make_reference.py`).

use flywheel_ml::metrics::{auc, calibration, gauc, ks, log_loss, psi};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    scores: Vec<f64>,
    labels: Vec<bool>,
    groups: Vec<u64>,
    other: Vec<f64>,
    auc: f64,
    gauc: f64,
    log_loss: f64,
    calibration: f64,
    psi_10: f64,
    psi_4: f64,
    ks: f64,
}

const TOLERANCE: f64 = 1e-9;

fn cases() -> Vec<Case> {
    let path = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/reference/metrics.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let reference: Reference = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(reference.cases.len(), 3);
    reference.cases
}

fn close(name: &str, metric: &str, ours: Option<f64>, reference: f64) {
    let ours = ours.unwrap_or_else(|| panic!("{name}: {metric} gave no value"));
    assert!(
        (ours - reference).abs() <= TOLERANCE,
        "{name}: {metric} = {ours}, reference {reference}"
    );
}

#[test]
fn auc_matches_sklearn_roc_auc_score() {
    for case in cases() {
        close(&case.name, "auc", auc(&case.scores, &case.labels), case.auc);
    }
}

#[test]
fn gauc_matches_per_group_sklearn_auc_weighted_by_impressions() {
    for case in cases() {
        close(
            &case.name,
            "gauc",
            gauc(&case.scores, &case.labels, &case.groups),
            case.gauc,
        );
    }
}

#[test]
fn log_loss_matches_sklearn() {
    for case in cases() {
        close(
            &case.name,
            "log_loss",
            log_loss(&case.scores, &case.labels),
            case.log_loss,
        );
    }
}

#[test]
fn calibration_matches_the_definition() {
    for case in cases() {
        close(
            &case.name,
            "calibration",
            calibration(&case.scores, &case.labels),
            case.calibration,
        );
    }
}

#[test]
fn psi_matches_the_numpy_reference() {
    for case in cases() {
        close(
            &case.name,
            "psi_10",
            psi(&case.scores, &case.other, 10),
            case.psi_10,
        );
        close(
            &case.name,
            "psi_4",
            psi(&case.other, &case.scores, 4),
            case.psi_4,
        );
    }
}

#[test]
fn ks_matches_scipy_ks_2samp() {
    for case in cases() {
        close(&case.name, "ks", ks(&case.scores, &case.other), case.ks);
    }
}
