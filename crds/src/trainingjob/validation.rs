//! A TrainingJob spec's rules that OpenAPI cannot express on a 1.20 server: each mirrors a CEL rule or is a
//! cross-field check, and names the field it refuses.

use super::*;
use crate::common::{SpecViolations, TimeRange};
use crate::tuning::{Tuning, TuningRange};

impl TrainingJobSpec {
    /// The rules OpenAPI cannot express on a 1.20 server (each mirrors a CEL rule or a cross-field check).
    pub fn validate(&self) -> Result<(), SpecViolations> {
        let mut violations = SpecViolations::default();
        if let Some(timeout) = &self.start_timeout {
            violations.check_duration("spec.startTimeout", timeout);
        }
        let data = &self.data;
        match (&data.feature_view, &data.served_traffic, &data.dataset) {
            (Some(view), None, None) => {
                violations.check_storage_uri("spec.data.featureView.events", &view.events);
                if let Some(join) = &view.sample_join {
                    check_sample_join(&mut violations, &view.label, join);
                }
                check_ranges(
                    &mut violations,
                    "spec.data.featureView",
                    &view.train_range,
                    &view.eval_range,
                );
            }
            (None, Some(traffic), None) => {
                if let Some(window) = &traffic.click_window {
                    violations.check_duration("spec.data.servedTraffic.clickWindow", window);
                }
                check_ranges(
                    &mut violations,
                    "spec.data.servedTraffic",
                    &traffic.train_range,
                    &traffic.eval_range,
                );
            }
            (None, None, Some(dataset)) => {
                violations.check_storage_uri("spec.data.dataset.train", &dataset.train);
                violations.check_storage_uri("spec.data.dataset.eval", &dataset.eval);
                if let Some(schema) = &dataset.schema {
                    violations.check_storage_uri("spec.data.dataset.schema", schema);
                }
            }
            _ => violations.push(
                "spec.data",
                "set exactly one of featureView, servedTraffic or dataset",
            ),
        }
        if let Some(tuning) = &self.tuning {
            check_tuning(&mut violations, self, tuning);
        }
        if let Some(checkpoint) = &self.checkpoint {
            violations.check_storage_uri("spec.checkpoint.uri", &checkpoint.uri);
        }
        violations.check_storage_uri("spec.output.artifactUri", &self.output.artifact_uri);
        match self.model.architecture {
            Architecture::Logistic if !self.model.hidden_layers.is_empty() => {
                violations.push(
                    "spec.model.hiddenLayers",
                    "logistic has no hidden layers; remove them",
                );
            }
            Architecture::WideDeep | Architecture::DeepFm
                if self.model.hidden_layers.is_empty() =>
            {
                violations.push(
                    "spec.model.hiddenLayers",
                    format!(
                        "{} needs at least one hidden layer",
                        self.model.architecture.as_str()
                    ),
                );
            }
            _ => {}
        }
        if !(self.optimizer.learning_rate.is_finite() && self.optimizer.learning_rate > 0.0) {
            violations.push("spec.optimizer.learningRate", "must be a positive number");
        }
        if let Some(rate) = self.optimizer.sparse_learning_rate
            && !(rate.is_finite() && rate > 0.0)
        {
            violations.push(
                "spec.optimizer.sparseLearningRate",
                "must be a positive number",
            );
        }
        self.validation.check("spec.validation", &mut violations);
        if let Topology::DataParallel(dp) = &self.topology {
            if !is_gpu_resource(&dp.gpu_resource) {
                violations.push(
                    "spec.topology.dataParallel.gpuResource",
                    format!(
                        "unknown GPU resource `{}`; use nvidia.com/gpu, amd.com/gpu or nvidia.com/mig-<N>g.<M>gb",
                        dp.gpu_resource
                    ),
                );
            }
            if dp.gpus_per_worker == 0 {
                if dp.gpu_type.is_some() {
                    violations.push(
                        "spec.topology.dataParallel.gpuType",
                        "a GPU product needs gpusPerWorker of 1 or more; remove it to train on CPUs",
                    );
                }
            } else if self.queue.is_none() {
                violations.push(
                    "spec.queue",
                    "a job that asks for GPUs must name its GPUQuota",
                );
            }
        }
        violations.into_result()
    }
}

fn check_tuning(violations: &mut SpecViolations, spec: &TrainingJobSpec, tuning: &Tuning) {
    if !matches!(spec.topology, Topology::Single(_)) {
        violations.push(
            "spec.tuning",
            "trials run in one training process: tuning needs topology single",
        );
    }
    if spec.warm_start_from.is_some() {
        violations.push(
            "spec.tuning",
            "every trial trains from scratch: not with warmStartFrom",
        );
    }
    for (name, range) in [
        ("learningRate", &tuning.space.learning_rate),
        ("sparseLearningRate", &tuning.space.sparse_learning_rate),
        ("weightDecay", &tuning.space.weight_decay),
    ] {
        if let Some(problem) = range.as_ref().and_then(TuningRange::problem) {
            violations.push(format!("spec.tuning.space.{name}"), problem);
        }
    }
    if tuning
        .space
        .hidden_layers
        .iter()
        .flatten()
        .any(|&width| width == 0)
    {
        violations.push("spec.tuning.space.hiddenLayers", "widths must be positive");
    }
}

fn check_sample_join(violations: &mut SpecViolations, label: &str, join: &SampleJoinData) {
    const FIELD: &str = "spec.data.featureView.sampleJoin";
    violations.check_storage_uri(&format!("{FIELD}.clicks"), &join.clicks);
    if let Some(conversions) = &join.conversions {
        violations.check_storage_uri(&format!("{FIELD}.conversions"), conversions);
    }
    for (name, window) in [
        ("clickWindow", &join.click_window),
        ("conversionWindow", &join.conversion_window),
    ] {
        if let Some(window) = window {
            violations.check_duration(&format!("{FIELD}.{name}"), window);
        }
    }
    match label {
        "label_click" => {}
        "label_convert" if join.conversions.is_some() => {}
        "label_convert" => violations.push(
            format!("{FIELD}.conversions"),
            "label_convert needs conversions",
        ),
        _ => violations.push(
            "spec.data.featureView.label",
            "with sampleJoin the label is label_click or label_convert",
        ),
    }
}

/// Both ranges well formed, and evaluation after training.
fn check_ranges(
    violations: &mut SpecViolations,
    field: &str,
    train_range: &EventRange,
    eval_range: &EventRange,
) {
    let train = check_event_range(violations, &format!("{field}.trainRange"), train_range);
    let eval = check_event_range(violations, &format!("{field}.evalRange"), eval_range);
    if let (Some(train), Some(eval)) = (train, eval)
        && eval.start.0 < train.end.0
    {
        violations.push(
            format!("{field}.evalRange.start"),
            "evaluation must start at or after the end of trainRange (no look-ahead)",
        );
    }
}

/// Checks one range; returns it when absolute and sound (a relative range is checked for its span only).
fn check_event_range(
    violations: &mut SpecViolations,
    field: &str,
    range: &EventRange,
) -> Option<TimeRange> {
    match (&range.start, &range.end, &range.last) {
        (Some(start), Some(end), None) => {
            if end.0 <= start.0 {
                violations.push(format!("{field}.end"), "must be after start");
                return None;
            }
            Some(TimeRange {
                start: start.clone(),
                end: end.clone(),
            })
        }
        (None, None, Some(last)) => {
            if let Some(span) = violations.check_duration(&format!("{field}.last"), last)
                && span.is_zero()
            {
                violations.push(format!("{field}.last"), "must be longer than 0s");
            }
            None
        }
        _ => {
            violations.push(field, "set start and end, or last");
            None
        }
    }
}
