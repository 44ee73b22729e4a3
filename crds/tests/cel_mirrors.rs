//! Every CEL rule in the CRDs has a controller-side mirror (a 1.20 server drops CEL rules). For each rule this
//! runs the real CEL evaluator (kube-cel) over the generated schema and the controller's `validate()` on the
//! same object: both must refuse the bad object, and both must accept every example.

use flywheel_crds::modelversion::AcceptedArtifact;
use flywheel_crds::{FeatureView, GPUQuota, ModelVersion, Rollout, TrainingJob, all_crds};
use kube_cel::Validator;
use serde_json::{Value, json};

fn example(file: &str) -> Value {
    let path = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../examples")
    .join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn schema_of(kind: &str) -> Value {
    let crd = all_crds()
        .into_iter()
        .find(|crd| crd.definition.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let schema = crd.definition.spec.versions[0]
        .schema
        .clone()
        .and_then(|s| s.open_api_v3_schema);
    serde_json::to_value(schema).unwrap_or_else(|err| panic!("{err}"))
}

/// CEL messages for `object` (and `old` for transition rules).
fn cel_errors(object: &Value, old: Option<&Value>) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    match Validator::new().validate(&schema_of(kind), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| e.to_string())
            .collect(),
    }
}

/// Controller violations for `object`, as `field: message` strings.
fn controller_errors(object: &Value, accepted: Option<&AcceptedArtifact>) -> Vec<String> {
    let decode = |value: &Value| value.clone();
    let result = match object["kind"].as_str().unwrap_or_default() {
        "FeatureView" => {
            serde_json::from_value::<FeatureView>(decode(object)).map(|o| o.spec.validate())
        }
        "TrainingJob" => {
            serde_json::from_value::<TrainingJob>(decode(object)).map(|o| o.spec.validate())
        }
        "ModelVersion" => serde_json::from_value::<ModelVersion>(decode(object))
            .map(|o| o.spec.validate(accepted)),
        "Rollout" => serde_json::from_value::<Rollout>(decode(object)).map(|o| o.spec.validate()),
        "GPUQuota" => serde_json::from_value::<GPUQuota>(decode(object)).map(|o| o.spec.validate()),
        other => panic!("unknown kind {other}"),
    };
    match result.unwrap_or_else(|err| panic!("does not decode: {err}")) {
        Ok(()) => Vec::new(),
        Err(violations) => violations.0.into_iter().map(|v| v.to_string()).collect(),
    }
}

fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    match object.pointer_mut(pointer) {
        Some(slot) => *slot = value,
        None => {
            let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
            match object.pointer_mut(parent).and_then(Value::as_object_mut) {
                Some(map) => {
                    map.insert(key.to_owned(), value);
                }
                None => panic!("no parent {parent}"),
            }
        }
    }
    object
}

fn without(mut object: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    if let Some(map) = object.pointer_mut(parent).and_then(Value::as_object_mut) {
        map.remove(key);
    }
    object
}

/// Both layers refuse `object`; the controller names `field`.
fn assert_both_refuse(object: &Value, field: &str) {
    let cel = cel_errors(object, None);
    let controller = controller_errors(object, None);
    assert!(
        !cel.is_empty(),
        "CEL accepted an object the controller must refuse ({field})"
    );
    assert!(
        controller.iter().any(|e| e.starts_with(field)),
        "controller should name {field}: {controller:?}"
    );
}

#[test]
fn every_example_passes_cel_and_the_controller() {
    for file in [
        "featureview.yaml",
        "gpuquota.yaml",
        "modelversion.yaml",
        "rollout.yaml",
        "trainingjob-gpu.yaml",
        "trainingjob-ps.yaml",
        "trainingjob-traffic.yaml",
    ] {
        let object = example(file);
        assert_eq!(cel_errors(&object, None), Vec::<String>::new(), "{file}");
        assert_eq!(
            controller_errors(&object, None),
            Vec::<String>::new(),
            "{file}"
        );
    }
}

#[test]
fn feature_source_needs_batch_or_stream() {
    let view = without(
        without(example("featureview.yaml"), "/spec/source/batch"),
        "/spec/source/stream",
    );
    assert_both_refuse(&view, "spec.source");
}

#[test]
fn feature_has_transform_or_aggregation_not_both() {
    let view = with(
        example("featureview.yaml"),
        "/spec/features/5/transform",
        json!({"log1p": {}}),
    );
    assert_both_refuse(&view, "spec.features[5]");
}

#[test]
fn training_data_needs_exactly_one_source() {
    let both = with(
        example("trainingjob-ps.yaml"),
        "/spec/data/dataset",
        json!({"train": "file:///t/", "eval": "file:///e/", "label": "clicked"}),
    );
    assert_both_refuse(&both, "spec.data");
    let neither = without(example("trainingjob-ps.yaml"), "/spec/data/featureView");
    assert_both_refuse(&neither, "spec.data");
}

#[test]
fn served_traffic_is_a_third_source_not_an_extra_one() {
    let both = with(
        example("trainingjob-ps.yaml"),
        "/spec/data/servedTraffic",
        json!({"rollout": "ctr", "trainRange": {"last": "7d"}, "evalRange": {"last": "1d"}}),
    );
    assert_both_refuse(&both, "spec.data");
    assert_eq!(
        cel_errors(&example("trainingjob-traffic.yaml"), None),
        Vec::<String>::new()
    );
}

#[test]
fn a_traffic_log_needs_the_prediction_log() {
    let rollout = with(
        example("rollout.yaml"),
        "/spec/feedback",
        json!({"brokers": ["kafka:9092"], "clicksTopic": "clicks",
               "trafficLog": {"uri": "file:///var/lib/flywheel/traffic/ctr"}}),
    );
    assert_both_refuse(&rollout, "spec.feedback.trafficLog");
}

#[test]
fn tuning_runs_in_one_process_over_ranges_that_can_be_drawn_from() {
    let tuning = json!({"trials": 8, "space": {"learningRate": {"min": 0, "max": 0.1}}});
    let ps = with(example("trainingjob-ps.yaml"), "/spec/tuning", tuning);
    let errors = controller_errors(&ps, None);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("spec.tuning: trials run in one training process")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("spec.tuning.space.learningRate: a log scale needs min above 0")),
        "{errors:?}"
    );
}

#[test]
fn sample_joining_labels_with_what_it_writes() {
    let job = with(
        example("trainingjob-ps.yaml"),
        "/spec/data/featureView/sampleJoin",
        json!({"clicks": "file:///var/lib/flywheel/events/clicks/"}),
    );
    let errors = controller_errors(&job, None);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("spec.data.featureView.label")),
        "{errors:?}"
    );
    let fixed = with(job, "/spec/data/featureView/label", json!("label_click"));
    assert_eq!(controller_errors(&fixed, None), Vec::<String>::new());
}

#[test]
fn gate_needs_a_bound() {
    let version = with(
        example("modelversion.yaml"),
        "/spec/validation/gates/0",
        json!({"metric": "auc"}),
    );
    assert_both_refuse(&version, "spec.validation.gates[0]");
}

#[test]
fn relative_gate_needs_a_baseline() {
    let version = with(
        example("modelversion.yaml"),
        "/spec/validation/gates/0",
        json!({"metric": "auc", "maxDecrease": 0.002}),
    );
    assert_both_refuse(&version, "spec.validation.gates[0].baseline");
}

#[test]
fn gate_min_must_not_exceed_max() {
    let version = with(
        example("modelversion.yaml"),
        "/spec/validation/gates/2",
        json!({"metric": "calibration", "min": 1.2, "max": 0.8}),
    );
    assert_both_refuse(&version, "spec.validation.gates[2].min");
}

#[test]
fn artifact_is_immutable() {
    let old = example("modelversion.yaml");
    let new = with(old.clone(), "/spec/artifact/sha256", json!("0".repeat(64)));
    assert!(
        !cel_errors(&new, Some(&old)).is_empty(),
        "CEL transition rule must refuse the edit"
    );
    assert!(cel_errors(&old, Some(&old)).is_empty());
    let accepted = AcceptedArtifact {
        uri: old["spec"]["artifact"]["uri"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        sha256: old["spec"]["artifact"]["sha256"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    let controller = controller_errors(&new, Some(&accepted));
    assert!(
        controller.iter().any(|e| e.starts_with("spec.artifact")),
        "{controller:?}"
    );
    assert!(controller_errors(&old, Some(&accepted)).is_empty());
}

#[test]
fn canary_weights_must_strictly_increase() {
    let decreasing = with(
        example("rollout.yaml"),
        "/spec/strategy/canary/steps/4",
        json!({"setWeight": 2}),
    );
    assert_both_refuse(&decreasing, "spec.strategy.canary.steps[4].setWeight");
    let repeated = with(
        example("rollout.yaml"),
        "/spec/strategy/canary/steps/4",
        json!({"setWeight": 5}),
    );
    assert_both_refuse(&repeated, "spec.strategy.canary.steps[4].setWeight");
}

#[test]
fn analysis_metric_needs_exactly_one_source_and_a_bound() {
    let both = with(
        example("rollout.yaml"),
        "/spec/analysis/metrics/0/query",
        json!("sum(up)"),
    );
    assert_both_refuse(&both, "spec.analysis.metrics[0]");
    let unbounded = without(example("rollout.yaml"), "/spec/analysis/metrics/0/max");
    assert_both_refuse(&unbounded, "spec.analysis.metrics[0]");
}

#[test]
fn traffic_uses_one_router() {
    let rollout = with(
        example("rollout.yaml"),
        "/spec/traffic/gatewayApi",
        json!({"httpRoute": "ctr"}),
    );
    assert_both_refuse(&rollout, "spec.traffic");
}

#[test]
fn quota_must_cover_some_namespace() {
    let quota = with(example("gpuquota.yaml"), "/spec/namespaces", json!({}));
    assert_both_refuse(&quota, "spec.namespaces");
}

#[test]
fn data_parallel_on_cpus_needs_no_quota_and_no_gpu_product() {
    let gpu = example("trainingjob-gpu.yaml");
    let cpu = without(
        with(
            gpu.clone(),
            "/spec/topology/dataParallel/gpusPerWorker",
            json!(0),
        ),
        "/spec/queue",
    );
    assert_eq!(controller_errors(&cpu, None), Vec::<String>::new());
    assert_eq!(cel_errors(&cpu, None), Vec::<String>::new());
    let job: TrainingJob = serde_json::from_value(cpu.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(job.spec.topology.gpu_demand(), None);
    assert_eq!(job.spec.topology.summary(), "dp 2x cpu");

    let with_product = with(
        cpu,
        "/spec/topology/dataParallel/gpuType",
        json!("NVIDIA-H100-80GB-HBM3"),
    );
    let errors = controller_errors(&with_product, None);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("spec.topology.dataParallel.gpuType")),
        "{errors:?}"
    );
    let without_queue = without(gpu, "/spec/queue");
    assert!(
        controller_errors(&without_queue, None)
            .iter()
            .any(|e| e.starts_with("spec.queue")),
        "GPU jobs still need their quota"
    );
}

#[test]
fn feedback_needs_a_topic() {
    let rollout = with(
        example("rollout.yaml"),
        "/spec/feedback",
        json!({"brokers": ["kafka:9092"]}),
    );
    assert_both_refuse(&rollout, "spec.feedback");
    let fixed = with(rollout, "/spec/feedback/clicksTopic", json!("clicks"));
    assert_eq!(controller_errors(&fixed, None), Vec::<String>::new());
    assert_eq!(cel_errors(&fixed, None), Vec::<String>::new());
}

#[test]
fn a_range_is_absolute_or_relative_not_both() {
    let both = with(
        example("trainingjob-ps.yaml"),
        "/spec/data/featureView/trainRange/last",
        json!("14d"),
    );
    assert_both_refuse(&both, "spec.data.featureView.trainRange");
    let relative = with(
        with(
            example("trainingjob-ps.yaml"),
            "/spec/data/featureView/trainRange",
            json!({"last": "7d"}),
        ),
        "/spec/data/featureView/evalRange",
        json!({"last": "1d"}),
    );
    assert_eq!(controller_errors(&relative, None), Vec::<String>::new());
    assert_eq!(cel_errors(&relative, None), Vec::<String>::new());
    let job: TrainingJob = serde_json::from_value(relative).unwrap_or_else(|e| panic!("{e}"));
    let view = job
        .spec
        .data
        .feature_view
        .unwrap_or_else(|| panic!("the example reads a FeatureView"));
    let created: jiff::Timestamp = "2026-12-08T00:00:00Z"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let (train, eval) = view
        .ranges(created)
        .unwrap_or_else(|| panic!("relative ranges resolve"));
    let text = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| t.0.to_string();
    assert_eq!(
        (text(&eval.start), text(&eval.end)),
        (
            "2026-12-07T00:00:00Z".to_owned(),
            "2026-12-08T00:00:00Z".to_owned()
        ),
        "the last day before the job"
    );
    assert_eq!(
        (text(&train.start), text(&train.end)),
        (
            "2026-11-30T00:00:00Z".to_owned(),
            "2026-12-07T00:00:00Z".to_owned()
        ),
        "the seven days before evaluation"
    );
}

#[test]
fn a_gateway_api_route_is_refused_until_it_is_driven() {
    let rollout = with(
        without(example("rollout.yaml"), "/spec/traffic/router"),
        "/spec/traffic/gatewayApi",
        json!({"httpRoute": "ctr"}),
    );
    let errors = controller_errors(&rollout, None);
    assert!(
        errors.iter().any(|e| e.contains("spec.traffic.gatewayApi")),
        "{errors:?}"
    );
}

/// A `..` segment would let a URI leave the directory it names: every storage URI the operator or its pods
/// read refuses it, naming the field.
#[test]
fn a_parent_directory_segment_in_a_storage_uri_is_refused_naming_the_field() {
    let cases = [
        (
            "trainingjob-ps.yaml",
            "/spec/output/artifactUri",
            "spec.output.artifactUri",
        ),
        (
            "trainingjob-ps.yaml",
            "/spec/data/featureView/events",
            "spec.data.featureView.events",
        ),
        ("featureview.yaml", "/spec/offline/uri", "spec.offline.uri"),
        (
            "modelversion.yaml",
            "/spec/artifact/uri",
            "spec.artifact.uri",
        ),
    ];
    for (file, pointer, field) in cases {
        let escaping = with(
            example(file),
            pointer,
            json!("file:///var/lib/flywheel/team-a/../team-b/models"),
        );
        let errors = controller_errors(&escaping, None);
        assert!(
            errors.iter().any(|e| e.contains(field) && e.contains("..")),
            "{file} {pointer}: {errors:?}"
        );
        let inside = with(
            example(file),
            pointer,
            json!("file:///var/lib/flywheel/a..b/c"),
        );
        assert!(
            !controller_errors(&inside, None)
                .iter()
                .any(|e| e.contains(field)),
            "{file}: `..` inside a name is fine"
        );
    }
}
