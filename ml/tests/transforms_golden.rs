//! Transforms give exactly what an independent Python implementation gives (`tests/reference/transforms.json`,
//! produced by `tests/reference/make_transform_golden.py` with the `xxhash` package), so any consumer can
//! reproduce the encoding.

use flywheel_ml::transform::{Encoded, Transform, Value};
use serde::Deserialize;
use serde_json::Value as Json;

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
    crosses: Vec<CrossCase>,
}

#[derive(Deserialize)]
struct Case {
    transform: Transform,
    feature: String,
    value: Json,
    expected: Expected,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expected {
    Categorical(u64),
    Numeric(f64),
}

#[derive(Deserialize)]
struct CrossCase {
    features: Vec<String>,
    buckets: u64,
    values: Vec<Json>,
    expected: u64,
}

fn golden() -> Golden {
    let path = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/reference/transforms.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}"))
}

fn value(json: &Json) -> Value<'_> {
    match json {
        Json::Null => Value::Missing,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) if n.is_i64() => Value::Int(n.as_i64().unwrap_or_default()),
        Json::Number(n) => Value::Float(n.as_f64().unwrap_or_default()),
        Json::String(s) => Value::Str(s),
        other => panic!("unsupported golden value {other}"),
    }
}

#[test]
fn single_feature_transforms_match_python() {
    let golden = golden();
    assert!(golden.cases.len() >= 20);
    for case in &golden.cases {
        let got = case.transform.apply(&case.feature, value(&case.value));
        match (&case.expected, got) {
            (Expected::Categorical(want), Ok(Encoded::Categorical(index))) => {
                assert_eq!(
                    index, *want,
                    "{:?} of {}={}",
                    case.transform, case.feature, case.value
                )
            }
            (Expected::Numeric(want), Ok(Encoded::Numeric(x))) => {
                assert!(
                    (x - want).abs() < 1e-12,
                    "{:?} of {}: {x} vs {want}",
                    case.transform,
                    case.value
                )
            }
            (_, other) => panic!("{:?} of {}: {other:?}", case.transform, case.value),
        }
    }
}

#[test]
fn crosses_match_python() {
    for case in golden().crosses {
        let transform = Transform::Cross {
            features: case.features.clone(),
            buckets: case.buckets,
        };
        let values: Vec<Value<'_>> = case.values.iter().map(value).collect();
        assert_eq!(
            transform.apply_cross("cross", &values),
            Ok(Encoded::Categorical(case.expected)),
            "{:?}",
            case.values
        );
    }
}
