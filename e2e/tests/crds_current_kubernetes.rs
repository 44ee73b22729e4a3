//! The CRDs on a current Kubernetes: the CRD server of Kubernetes 1.36 (apiextensions-apiserver) creates every
//! committed CRD under `crds/` — so its structural-schema checks, CEL compilation against Kubernetes' own CEL
//! libraries, cost budgets and validation of defaults run for real — and then, for every CEL rule in them, an
//! object that breaks the rule is refused (422 with the rule's message) and one that satisfies it is created.
//! The v1.20 control plane drops `x-kubernetes-validations`; this server is what a user's cluster runs.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use flywheel_e2e::cluster::{TestCluster, client_from};
use flywheel_e2e::fixtures::{example, resource_of, set};
use flywheel_e2e::repo_root;
use flywheel_e2e::wait::until;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The CRD server's kubeconfig, with every committed CRD created and Established there (by the first test
/// that asks; the others wait for it).
async fn crd_server() -> Result<&'static PathBuf, String> {
    static SERVER: tokio::sync::OnceCell<Result<PathBuf, String>> =
        tokio::sync::OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            let cluster = TestCluster::shared()?;
            let kubeconfig = cluster
                .start_current_crd_server()
                .map_err(|e| e.to_string())?;
            create_committed_crds(&kubeconfig)
                .await
                .map_err(|e| format!("creating the committed CRDs: {e}"))?;
            Ok(kubeconfig)
        })
        .await
        .as_ref()
        .map_err(Clone::clone)
}

/// The YAML files under `crds/` (what `kubectl apply -f crds/` sends), parsed.
fn committed_crds() -> Result<Vec<CustomResourceDefinition>, Box<dyn std::error::Error>> {
    let dir = repo_root().join("crds");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)?;
            serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()).into())
        })
        .collect()
}

async fn create_committed_crds(
    kubeconfig: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let client = client_from(kubeconfig).await?;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let crds = committed_crds()?;
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), crd)
            .await
            .map_err(|e| format!("{name} refused: {e}"))?;
    }
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        until(
            &format!("{name} to be Established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let found = api.get(&name).await.map_err(|e| e.to_string())?;
                    let established = found
                        .status
                        .and_then(|status| status.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    if established {
                        Ok(())
                    } else {
                        Err("not yet".to_owned())
                    }
                }
            },
        )
        .await?;
    }
    Ok(())
}

async fn client() -> Result<Client, Box<dyn std::error::Error>> {
    Ok(client_from(crd_server().await?).await?)
}

/// Every CEL rule of a kind's schema, with its message.
fn rules_of(schema: &Value, found: &mut Vec<(String, String)>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                for rule in rules {
                    found.push((
                        rule["rule"].as_str().unwrap_or_default().to_owned(),
                        rule["message"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
            map.values().for_each(|value| rules_of(value, found));
        }
        Value::Array(items) => items.iter().for_each(|value| rules_of(value, found)),
        _ => {}
    }
}

/// A CEL rule as a committed CRD declares it.
struct DeclaredRule {
    kind: String,
    rule: String,
    message: String,
}

/// Every CEL rule in the committed CRDs.
fn every_rule() -> Result<Vec<DeclaredRule>, Box<dyn std::error::Error>> {
    let mut all = Vec::new();
    for crd in committed_crds()? {
        let mut found = Vec::new();
        rules_of(&serde_json::to_value(&crd.spec)?, &mut found);
        all.extend(found.into_iter().map(|(rule, message)| DeclaredRule {
            kind: crd.spec.names.kind.clone(),
            rule,
            message,
        }));
    }
    Ok(all)
}

/// One CEL rule, an object that breaks it and one that satisfies it.
struct RuleCase {
    /// The rule's expression, exactly as in the CRD.
    rule: &'static str,
    breaking: Value,
    satisfying: Value,
}

fn edited(
    file: &str,
    edits: &[(&str, Option<Value>)],
) -> Result<Value, Box<dyn std::error::Error>> {
    let mut object = example(file)?;
    for (pointer, value) in edits {
        match value {
            Some(value) => set(&mut object, pointer, value.clone()),
            None => {
                let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
                if let Some(map) = object.pointer_mut(parent).and_then(Value::as_object_mut) {
                    map.remove(key);
                }
            }
        }
    }
    Ok(object)
}

/// A case for every CEL rule of every kind (the transition rule of ModelVersion's artifact has its own test).
fn rule_cases() -> Result<Vec<RuleCase>, Box<dyn std::error::Error>> {
    Ok(vec![
        RuleCase {
            rule: "has(self.batch) || has(self.stream)",
            breaking: edited(
                "featureview.yaml",
                &[("/spec/source/batch", None), ("/spec/source/stream", None)],
            )?,
            satisfying: edited("featureview.yaml", &[("/spec/source/stream", None)])?,
        },
        RuleCase {
            rule: "!(has(self.transform) && has(self.aggregation))",
            breaking: edited(
                "featureview.yaml",
                &[("/spec/features/5/transform", Some(json!({"log1p": {}})))],
            )?,
            satisfying: example("featureview.yaml")?,
        },
        RuleCase {
            rule: "(has(self.names) && size(self.names) > 0) || has(self.selector)",
            breaking: edited("gpuquota.yaml", &[("/spec/namespaces", Some(json!({})))])?,
            satisfying: edited(
                "gpuquota.yaml",
                &[(
                    "/spec/namespaces",
                    Some(json!({"selector": {"matchLabels": {"team": "ranking"}}})),
                )],
            )?,
        },
        RuleCase {
            rule: "has(self.min) || has(self.max) || has(self.maxDecrease) || has(self.maxIncrease)",
            breaking: edited(
                "modelversion.yaml",
                &[("/spec/validation/gates/0", Some(json!({"metric": "auc"})))],
            )?,
            satisfying: example("modelversion.yaml")?,
        },
        RuleCase {
            rule: "!(has(self.maxDecrease) || has(self.maxIncrease)) || has(self.baseline)",
            breaking: edited(
                "modelversion.yaml",
                &[(
                    "/spec/validation/gates/0",
                    Some(json!({"metric": "auc", "maxDecrease": 0.002})),
                )],
            )?,
            satisfying: edited(
                "modelversion.yaml",
                &[(
                    "/spec/validation/gates/0",
                    Some(json!({"metric": "auc", "maxDecrease": 0.002,
                                "baseline": {"alias": "production"}})),
                )],
            )?,
        },
        // The same gate rules hold where a TrainingJob states the gates of the version it will create.
        RuleCase {
            rule: "!(has(self.maxDecrease) || has(self.maxIncrease)) || has(self.baseline)",
            breaking: edited(
                "trainingjob-ps.yaml",
                &[(
                    "/spec/validation/gates/1",
                    Some(json!({"metric": "auc", "maxDecrease": 0.002})),
                )],
            )?,
            satisfying: example("trainingjob-ps.yaml")?,
        },
        RuleCase {
            rule: "!(has(self.min) && has(self.max)) || self.min <= self.max",
            breaking: edited(
                "modelversion.yaml",
                &[(
                    "/spec/validation/gates/2",
                    Some(json!({"metric": "calibration", "min": 1.2, "max": 0.8})),
                )],
            )?,
            satisfying: edited(
                "modelversion.yaml",
                &[(
                    "/spec/validation/gates/2",
                    Some(json!({"metric": "calibration", "min": 0.8, "max": 0.8})),
                )],
            )?,
        },
        RuleCase {
            rule: "(has(self.start) && has(self.end)) != has(self.last)",
            breaking: edited(
                "trainingjob-ps.yaml",
                &[("/spec/data/featureView/trainRange/last", Some(json!("14d")))],
            )?,
            satisfying: edited(
                "trainingjob-ps.yaml",
                &[(
                    "/spec/data/featureView/trainRange",
                    Some(json!({"last": "14d"})),
                )],
            )?,
        },
        RuleCase {
            rule: "has(self.clicksTopic) || has(self.predictionLogTopic)",
            breaking: edited(
                "rollout.yaml",
                &[("/spec/feedback", Some(json!({"brokers": ["kafka:9092"]})))],
            )?,
            satisfying: edited(
                "rollout.yaml",
                &[(
                    "/spec/feedback",
                    Some(json!({"brokers": ["kafka:9092"], "clicksTopic": "clicks"})),
                )],
            )?,
        },
        RuleCase {
            rule: "!has(self.trafficLog) || has(self.predictionLogTopic)",
            breaking: edited(
                "rollout.yaml",
                &[(
                    "/spec/feedback",
                    Some(json!({"brokers": ["kafka:9092"], "clicksTopic": "clicks",
                                "trafficLog": {"uri": "file:///var/lib/flywheel/traffic/ctr"}})),
                )],
            )?,
            satisfying: edited(
                "rollout.yaml",
                &[(
                    "/spec/feedback",
                    Some(
                        json!({"brokers": ["kafka:9092"], "predictionLogTopic": "predictions",
                                "trafficLog": {"uri": "file:///var/lib/flywheel/traffic/ctr"}}),
                    ),
                )],
            )?,
        },
        RuleCase {
            rule: "!has(self.steps) || self.steps.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted()",
            breaking: edited(
                "rollout.yaml",
                &[(
                    "/spec/strategy/canary/steps/4",
                    Some(json!({"setWeight": 2})),
                )],
            )?,
            // No steps at all: the default 1 → 5 → 20 → 100.
            satisfying: edited("rollout.yaml", &[("/spec/strategy/canary/steps", None)])?,
        },
        RuleCase {
            rule: "!has(self.steps) || self.steps.filter(s, has(s.setWeight)).all(s, self.steps.filter(t, has(t.setWeight) && t.setWeight == s.setWeight).size() == 1)",
            breaking: edited(
                "rollout.yaml",
                &[(
                    "/spec/strategy/canary/steps/4",
                    Some(json!({"setWeight": 5})),
                )],
            )?,
            satisfying: example("rollout.yaml")?,
        },
        RuleCase {
            rule: "has(self.builtin) != has(self.query)",
            breaking: edited(
                "rollout.yaml",
                &[("/spec/analysis/metrics/0/query", Some(json!("sum(up)")))],
            )?,
            satisfying: edited(
                "rollout.yaml",
                &[
                    ("/spec/analysis/metrics/0/builtin", None),
                    ("/spec/analysis/metrics/0/query", Some(json!("sum(up)"))),
                ],
            )?,
        },
        RuleCase {
            rule: "has(self.min) || has(self.max)",
            breaking: edited("rollout.yaml", &[("/spec/analysis/metrics/0/max", None)])?,
            satisfying: edited(
                "rollout.yaml",
                &[
                    ("/spec/analysis/metrics/0/max", None),
                    ("/spec/analysis/metrics/0/min", Some(json!(-1.0))),
                ],
            )?,
        },
        RuleCase {
            rule: "!(has(self.router) && has(self.gatewayApi))",
            breaking: edited(
                "rollout.yaml",
                &[(
                    "/spec/traffic/gatewayApi",
                    Some(json!({"httpRoute": "ctr"})),
                )],
            )?,
            satisfying: edited(
                "rollout.yaml",
                &[
                    ("/spec/traffic/router", None),
                    (
                        "/spec/traffic/gatewayApi",
                        Some(json!({"httpRoute": "ctr"})),
                    ),
                ],
            )?,
        },
        RuleCase {
            rule: "(has(self.featureView) ? 1 : 0) + (has(self.servedTraffic) ? 1 : 0) + (has(self.dataset) ? 1 : 0) == 1",
            breaking: edited(
                "trainingjob-ps.yaml",
                &[(
                    "/spec/data/servedTraffic",
                    Some(
                        json!({"rollout": "ctr", "trainRange": {"last": "7d"}, "evalRange": {"last": "1d"}}),
                    ),
                )],
            )?,
            satisfying: edited(
                "trainingjob-ps.yaml",
                &[
                    ("/spec/data/featureView", None),
                    (
                        "/spec/data/dataset",
                        Some(
                            json!({"train": "file:///t/", "eval": "file:///e/", "label": "clicked"}),
                        ),
                    ),
                ],
            )?,
        },
    ])
}

const TRANSITION_RULE: &str = "self == oldSelf";

/// Creates `object` under a fresh name; the server's answer is the inner result.
async fn create_fresh(
    client: &Client,
    object: &Value,
) -> Result<Result<DynamicObject, kube::Error>, Box<dyn std::error::Error>> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let kind = object["kind"].as_str().unwrap_or_default();
    let (resource, namespaced) = resource_of(kind)?;
    let api: Api<DynamicObject> = if namespaced {
        Api::namespaced_with(client.clone(), "default", &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    let mut object = object.clone();
    let serial = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    set(
        &mut object,
        "/metadata/name",
        json!(format!("case-{}-{serial}", kind.to_lowercase())),
    );
    let object: DynamicObject = serde_json::from_value(object)?;
    Ok(api.create(&PostParams::default(), &object).await)
}

#[test]
fn every_cel_rule_has_a_case() -> TestResult {
    let covered: BTreeSet<&str> = rule_cases()?
        .iter()
        .map(|case| case.rule)
        .chain([TRANSITION_RULE])
        .collect();
    let declared: BTreeSet<String> = every_rule()?.into_iter().map(|r| r.rule).collect();
    let missing: Vec<&String> = declared
        .iter()
        .filter(|rule| !covered.contains(rule.as_str()))
        .collect();
    let stale: Vec<&&str> = covered
        .iter()
        .filter(|rule| !declared.contains(**rule))
        .collect();
    assert!(missing.is_empty(), "CEL rules without a case: {missing:?}");
    assert!(
        stale.is_empty(),
        "cases for rules no CRD declares: {stale:?}"
    );
    Ok(())
}

#[tokio::test]
async fn every_committed_crd_is_established() -> TestResult {
    let client = client().await?;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    for crd in committed_crds()? {
        let name = crd.metadata.name.unwrap_or_default();
        let found = api.get(&name).await?;
        let conditions = found.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"),
            "{name}: {conditions:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn every_example_is_created() -> TestResult {
    let client = client().await?;
    for file in flywheel_e2e::fixtures::example_files()? {
        let created = create_fresh(&client, &example(&file)?).await?;
        assert!(created.is_ok(), "{file}: {created:?}");
    }
    Ok(())
}

#[tokio::test]
async fn each_rule_refuses_what_breaks_it_and_accepts_what_satisfies_it() -> TestResult {
    let client = client().await?;
    let rules = every_rule()?;
    for case in rule_cases()? {
        let DeclaredRule { kind, message, .. } = rules
            .iter()
            .find(|declared| declared.rule == case.rule)
            .ok_or_else(|| format!("no CRD declares {}", case.rule))?;
        match create_fresh(&client, &case.breaking).await? {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{kind} `{}`: {status:?}", case.rule);
                assert!(
                    status.message.contains(message.as_str()),
                    "{kind} `{}`: expected {message:?} in {:?}",
                    case.rule,
                    status.message
                );
            }
            other => panic!(
                "{kind} `{}`: the breaking object was not refused: {other:?}",
                case.rule
            ),
        }
        let created = create_fresh(&client, &case.satisfying).await?;
        assert!(
            created.is_ok(),
            "{kind} `{}`: the satisfying object was refused: {created:?}",
            case.rule
        );
    }
    Ok(())
}

#[tokio::test]
async fn defaults_satisfy_the_rules() -> TestResult {
    let client = client().await?;
    // Without `strategy` the server fills in `{canary: {}}`, which the canary rules must accept.
    let rollout = edited("rollout.yaml", &[("/spec/strategy", None)])?;
    let created = create_fresh(&client, &rollout)
        .await?
        .map_err(|e| format!("a Rollout without strategy was refused: {e}"))?;
    assert_eq!(created.data["spec"]["strategy"], json!({"canary": {}}));
    Ok(())
}

#[tokio::test]
async fn a_model_versions_artifact_cannot_change() -> TestResult {
    let client = client().await?;
    let (resource, _) = resource_of("ModelVersion")?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let created = create_fresh(&client, &example("modelversion.yaml")?)
        .await?
        .map_err(|e| format!("the example ModelVersion was refused: {e}"))?;
    let name = created.metadata.name.clone().unwrap_or_default();
    let message = every_rule()?
        .into_iter()
        .find(|declared| declared.kind == "ModelVersion" && declared.rule == TRANSITION_RULE)
        .map(|declared| declared.message)
        .ok_or("no transition rule on the ModelVersion artifact")?;

    let changed = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"artifact": {"sha256": "0".repeat(64)}}})),
        )
        .await;
    match changed {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains(&message), "{:?}", status.message);
        }
        other => panic!("changing the artifact was not refused: {other:?}"),
    }

    // Other fields stay editable: the rule compares the artifact only.
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"validation": {"gates": [{"metric": "auc", "min": 0.7}]}}})),
    )
    .await
    .map_err(|e| format!("editing the gates was refused: {e}"))?;
    Ok(())
}
