//! Online features for a Rollout's serving pods: the FeatureView it names, checked against the served model,
//! and the environment that points each pod at the view's online store.

use flywheel_crds::common::SpecViolations;
use flywheel_crds::featureview::FeatureValueType;
use flywheel_crds::{FeatureView, ModelVersion, Rollout};
use serde_json::json;

use crate::store_access::PodAccess;

const FIELD: &str = "spec.onlineFeatures.featureView";

/// The FeatureView a Rollout names for online features, as the controller found it.
#[derive(Clone, Debug, PartialEq)]
pub enum OnlineView {
    /// The Rollout names none.
    NotNamed,
    Missing(String),
    Found(Box<FeatureView>),
}

/// Why the named view cannot feed the served model: no such view, no online store, several entities, or
/// another schema than the one `target` was trained on.
pub fn check(view: &OnlineView, target: Option<&ModelVersion>, violations: &mut SpecViolations) {
    let view = match view {
        OnlineView::NotNamed => return,
        OnlineView::Missing(name) => {
            violations.push(FIELD, format!("FeatureView `{name}` does not exist"));
            return;
        }
        OnlineView::Found(view) => view,
    };
    let name = view.metadata.name.as_deref().unwrap_or_default();
    if view.spec.online.is_none() {
        violations.push(FIELD, format!("FeatureView `{name}` has no online store"));
    }
    if view.spec.entities.len() != 1 {
        violations.push(
            FIELD,
            format!(
                "FeatureView `{name}` has {} entities; serving looks up views of one entity",
                view.spec.entities.len()
            ),
        );
    }
    if let Some(version) = target
        && let Some(trained) = &version.spec.lineage.feature_view_schema_hash
    {
        let current = view.spec.schema_hash();
        if &current != trained {
            violations.push(
                FIELD,
                format!(
                    "FeatureView `{name}` has schema {} but ModelVersion `{}` was trained on {}; \
                     serve a version trained on the view as it is",
                    short(&current),
                    version.metadata.name.as_deref().unwrap_or_default(),
                    short(trained)
                ),
            );
        }
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// What the serving container needs for the view's online store: its settings, the Redis password from the
/// view's Secret, TLS; `None` when the view cannot be used.
pub fn access(rollout: &Rollout, view: &FeatureView) -> Option<PodAccess> {
    let redis = &view.spec.online.as_ref()?.redis;
    let [entity] = view.spec.entities.as_slice() else {
        return None;
    };
    let input = rollout
        .spec
        .online_features
        .as_ref()
        .and_then(|o| o.entity.clone())
        .unwrap_or_else(|| entity.join_key.clone());
    let features: Vec<&str> = view
        .spec
        .features
        .iter()
        .filter(|f| {
            !matches!(
                f.value_type,
                FeatureValueType::Int64List
                    | FeatureValueType::Float64List
                    | FeatureValueType::StringList
            )
        })
        .map(|f| f.name.as_str())
        .collect();
    let mut env = Vec::new();
    // The password goes on its own: the server sets it on the connection, so no character of it can change the
    // URL.
    if let Some(secret) = &redis.password_secret {
        env.push(json!({"name": "FLYWHEEL_REDIS_PASSWORD",
                        "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}}));
    }
    let store = format!("redis://{}/{}", redis.address, redis.database);
    env.push(json!({"name": "FLYWHEEL_ONLINE_STORE", "value": store}));
    env.push(json!({"name": "FLYWHEEL_ONLINE_KEY_PREFIX", "value": view.online_key_prefix()}));
    env.push(json!({"name": "FLYWHEEL_ONLINE_ENTITY", "value": input}));
    env.push(json!({"name": "FLYWHEEL_ONLINE_FEATURES", "value": features.join(",")}));
    let tls = PodAccess::redis(redis.tls.as_ref());
    Some(
        PodAccess {
            env,
            ..PodAccess::default()
        }
        .and(tls),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::load;

    fn view() -> FeatureView {
        let mut view: FeatureView = load("featureview.yaml", 1);
        view.metadata.namespace = Some("ml".into());
        view.spec.entities.truncate(1);
        view
    }

    fn violations(view: &OnlineView, target: Option<&ModelVersion>) -> Vec<String> {
        let mut found = SpecViolations::default();
        check(view, target, &mut found);
        found.0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_view_of_another_schema_than_the_model_was_trained_on_is_refused() {
        let view = view();
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.spec.lineage.feature_view_schema_hash = Some(view.spec.schema_hash());
        let found = OnlineView::Found(Box::new(view.clone()));
        assert_eq!(violations(&found, Some(&version)), Vec::<String>::new());

        version.spec.lineage.feature_view_schema_hash = Some("0".repeat(64));
        let refused = violations(&found, Some(&version));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].starts_with(
                "spec.onlineFeatures.featureView: FeatureView `ctr-events` has schema "
            ) && refused[0].contains("but ModelVersion `ctr-v1` was trained on 000000000000"),
            "{refused:?}"
        );
        assert_eq!(
            violations(&OnlineView::Missing("users".into()), None),
            ["spec.onlineFeatures.featureView: FeatureView `users` does not exist"]
        );
    }

    #[test]
    fn serving_pods_get_the_views_store_prefix_entity_and_features() {
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.spec.online_features = Some(flywheel_crds::rollout::OnlineFeatures {
            feature_view: "ctr-events".into(),
            entity: None,
        });
        let mut view = view();
        if let Some(online) = &mut view.spec.online {
            online.redis.password_secret = Some("redis-auth".into());
        }
        let env = access(&rollout, &view)
            .unwrap_or_else(|| panic!("usable view"))
            .env;
        let value = |name: &str| {
            env.iter()
                .find(|v| v["name"] == name)
                .map(|v| v["value"].clone())
                .unwrap_or_default()
        };
        assert_eq!(env[0]["valueFrom"]["secretKeyRef"]["name"], "redis-auth");
        let store = value("FLYWHEEL_ONLINE_STORE");
        let store = store.as_str().unwrap_or_default();
        assert!(store.starts_with("redis://"), "{store}");
        assert!(
            !store.contains('@') && !store.contains("$("),
            "the password never enters the URL: {store}"
        );
        assert_eq!(value("FLYWHEEL_ONLINE_KEY_PREFIX"), "ml/ctr-events:");
        assert_eq!(
            value("FLYWHEEL_ONLINE_ENTITY"),
            view.spec.entities[0].join_key.as_str()
        );
        assert!(
            !value("FLYWHEEL_ONLINE_FEATURES")
                .as_str()
                .unwrap_or("")
                .is_empty()
        );
    }
}
