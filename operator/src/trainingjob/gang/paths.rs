//! Where a job's data, schema, artifact and checkpoints live on the training storage, from its `file://` URIs.

use flywheel_crds::trainingjob::TrainingJobSpec;

/// Local paths of the job's data, schema, artifact and checkpoints, from its `file://` URIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub train: String,
    pub eval: String,
    pub label: String,
    pub schema: String,
    pub output: String,
    pub checkpoints: String,
}

/// The label column of a training set built from served traffic (`flywheel-trainer traffic-training-set`).
pub const TRAFFIC_LABEL: &str = "clicked";

/// Resolves the job's storage URIs, or says which field the trainer cannot read.
pub fn paths(job_name: &str, spec: &TrainingJobSpec) -> Result<Paths, String> {
    let output = join(
        &local_path("spec.output.artifactUri", &spec.output.artifact_uri)?,
        job_name,
    );
    let built_label = match (&spec.data.feature_view, &spec.data.served_traffic) {
        (Some(view), _) => {
            local_path("spec.data.featureView.events", &view.events)?;
            Some(view.label.clone())
        }
        (None, Some(_)) => Some(TRAFFIC_LABEL.to_owned()),
        (None, None) => None,
    };
    let (train, eval, label, schema) = match (&spec.data.dataset, built_label) {
        (Some(dataset), _) => {
            let train = local_path("spec.data.dataset.train", &dataset.train)?;
            let eval = local_path("spec.data.dataset.eval", &dataset.eval)?;
            let schema = match &dataset.schema {
                Some(uri) => local_path("spec.data.dataset.schema", uri)?,
                None => sibling(&train, "schema.json"),
            };
            (train, eval, dataset.label.clone(), schema)
        }
        // The training-set step writes the sets and their schema beside the job's model.
        (None, Some(label)) => {
            let dir = dataset_dir(&output);
            (
                join(&dir, "train.parquet"),
                join(&dir, "eval.parquet"),
                label,
                join(&dir, "schema.json"),
            )
        }
        (None, None) => {
            return Err("spec.data: set featureView, servedTraffic or dataset".to_owned());
        }
    };
    let checkpoints = match &spec.checkpoint {
        Some(checkpoint) => join(
            &local_path("spec.checkpoint.uri", &checkpoint.uri)?,
            job_name,
        ),
        None => join(&output, "checkpoints"),
    };
    Ok(Paths {
        train,
        eval,
        label,
        schema,
        output,
        checkpoints,
    })
}

/// Where a job's training-set step writes `train.parquet`, `eval.parquet` and `schema.json`.
pub fn dataset_dir(output: &str) -> String {
    join(output, "dataset")
}

pub fn local_path(field: &str, uri: &str) -> Result<String, String> {
    match uri.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(path.to_owned()),
        Some(_) => Err(format!("{field}: `{uri}` must be an absolute file:///path")),
        None => Err(format!(
            "{field}: the trainer reads file:// URIs (a volume shared by the gang); `{uri}` is not one"
        )),
    }
}

fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

fn sibling(path: &str, name: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => join(dir, name),
        _ => join("", name),
    }
}
