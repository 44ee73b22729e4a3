//! `kubectl explain` is the API reference: every field of every CRD has a description.

use serde_json::Value;

/// Paths of the properties under `schema` that have no description.
fn undescribed(schema: &Value, path: &str, missing: &mut Vec<String>) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            let here = format!("{path}.{name}");
            let described = property
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|text| !text.trim().is_empty());
            if !described {
                missing.push(here.clone());
            }
            undescribed(property, &here, missing);
        }
    }
    if let Some(items) = schema.get("items") {
        undescribed(items, &format!("{path}[]"), missing);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        undescribed(values, &format!("{path}{{}}"), missing);
    }
}

#[test]
fn every_crd_field_has_a_description() {
    let mut missing = Vec::new();
    for crd in flywheel_crds::all_crds() {
        let definition =
            serde_json::to_value(&crd.definition).unwrap_or_else(|err| panic!("{err}"));
        for version in definition["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let root = format!("{}/{}", crd.name, version["name"].as_str().unwrap_or("?"));
            undescribed(&version["schema"]["openAPIV3Schema"], &root, &mut missing);
        }
    }
    assert!(
        missing.is_empty(),
        "{} field(s) without a description (write a `///` doc comment on the field):\n{}",
        missing.len(),
        missing.join("\n")
    );
}

#[test]
fn the_check_finds_a_field_without_a_description() {
    let schema = serde_json::json!({"properties": {
        "spec": {"description": "the spec", "properties": {
            "replicas": {"type": "integer"},
            "steps": {"description": "steps", "items": {"properties": {"weight": {"type": "integer"}}}},
        }},
    }});
    let mut missing = Vec::new();
    undescribed(&schema, "x", &mut missing);
    assert_eq!(missing, ["x.spec.replicas", "x.spec.steps[].weight"]);
}
