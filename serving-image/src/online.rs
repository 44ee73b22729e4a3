//! Entity features from the online store (Redis, the FeatureView's online store): a request that carries an
//! entity key but not the entity's features gets them filled in before the transforms. Each entity is a Redis
//! hash at `<prefix><entity value>` whose fields are feature names and whose values are the raw values as text.

use std::sync::Arc;
use std::time::Duration;

use flywheel_auth::store_clients::ClientTls;
use flywheel_ml::schema::{FeatureSchema, ValueType};
use redis::aio::ConnectionManager;

use crate::metrics::ServingMetrics;
use crate::request::{Column, InferRequest, Input, OwnedValue, RequestError};

pub struct OnlineStore {
    connection: ConnectionManager,
    prefix: String,
    entity: String,
    features: Vec<String>,
    timeout: Duration,
    metrics: Arc<ServingMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum OnlineError {
    #[error("online store: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("online store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Request(#[from] RequestError),
}

pub struct OnlineSettings {
    pub url: String,
    /// Set on the connection as it is, never spliced into the URL: a password holding `@`, `:` or `/` would
    /// change its host.
    pub password: Option<String>,
    /// `rediss://`, verified against these roots.
    pub tls: Option<ClientTls>,
    pub prefix: String,
    pub entity: String,
    pub features: Vec<String>,
    pub timeout: Duration,
}

impl OnlineStore {
    pub async fn connect(
        settings: OnlineSettings,
        metrics: Arc<ServingMetrics>,
    ) -> Result<OnlineStore, OnlineError> {
        let client = flywheel_features::online::redis_client(
            &settings.url,
            settings.password.as_deref(),
            settings.tls.as_ref(),
        )?;
        let connection = ConnectionManager::new(client).await?;
        Ok(OnlineStore {
            connection,
            prefix: settings.prefix,
            entity: settings.entity,
            features: settings.features,
            timeout: settings.timeout,
            metrics,
        })
    }

    /// Adds to `request` the online features of `schema` it does not carry, read by its entity key; an
    /// absent entity or field is a missing value (the transforms give it its own bucket).
    pub async fn fill(
        &self,
        schema: &FeatureSchema,
        request: &mut InferRequest,
    ) -> Result<(), OnlineError> {
        let wanted: Vec<(&str, ValueType)> = self
            .features
            .iter()
            .filter(|name| !request.inputs.iter().any(|input| &input.name == *name))
            .filter_map(|name| {
                schema
                    .features
                    .iter()
                    .find(|f| &f.name == name)
                    .map(|f| (f.name.as_str(), f.value_type))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let entity = request
            .inputs
            .iter()
            .find(|input| input.name == self.entity)
            .ok_or_else(|| RequestError::Missing(self.entity.clone()))?;
        let keys = entity_keys(&entity.column);
        let mut pipeline = redis::pipe();
        for key in &keys {
            pipeline
                .cmd("HMGET")
                .arg(format!("{}{key}", self.prefix))
                .arg(wanted.iter().map(|(name, _)| *name).collect::<Vec<_>>());
        }
        let mut connection = self.connection.clone();
        let answer: Result<Vec<Vec<Option<String>>>, _> =
            tokio::time::timeout(self.timeout, pipeline.query_async(&mut connection))
                .await
                .map_err(|_| OnlineError::Timeout(self.timeout))
                .and_then(|result| result.map_err(OnlineError::from));
        let rows = match answer {
            Ok(rows) => rows,
            Err(error) => {
                self.metrics.online_store("error", 1);
                return Err(error);
            }
        };
        let hits = rows
            .iter()
            .filter(|fields| fields.iter().any(Option::is_some))
            .count();
        self.metrics.online_store("hit", hits as u64);
        self.metrics
            .online_store("miss", (rows.len() - hits) as u64);
        for (position, (name, value_type)) in wanted.iter().enumerate() {
            let values = rows
                .iter()
                .map(|fields| {
                    parse(
                        name,
                        *value_type,
                        fields.get(position).and_then(Option::as_deref),
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            request.inputs.push(Input {
                name: (*name).to_owned(),
                shape: vec![i64::try_from(values.len()).unwrap_or(i64::MAX)],
                column: Column::Values(values),
            });
        }
        Ok(())
    }
}

fn entity_keys(column: &Column) -> Vec<String> {
    match column {
        Column::Int(v) => v.iter().map(i64::to_string).collect(),
        Column::Float(v) => v.iter().map(f64::to_string).collect(),
        Column::Str(v) => v.clone(),
        Column::Bool(v) => v.iter().map(bool::to_string).collect(),
        Column::Values(v) => v.iter().map(OwnedValue::to_string).collect(),
    }
}

/// A stored value, typed by the feature's schema type.
fn parse(
    feature: &str,
    value_type: ValueType,
    text: Option<&str>,
) -> Result<OwnedValue, RequestError> {
    let Some(text) = text else {
        return Ok(OwnedValue::Missing);
    };
    let bad = |expected: &str| RequestError::BadValue {
        input: feature.to_owned(),
        message: format!("online store value `{text}` is not {expected}"),
    };
    Ok(match value_type {
        ValueType::Int64 => OwnedValue::Int(text.parse().map_err(|_| bad("an integer"))?),
        ValueType::Float64 => OwnedValue::Float(text.parse().map_err(|_| bad("a number"))?),
        ValueType::String => OwnedValue::Str(text.to_owned()),
        ValueType::Bool => match text {
            "true" | "1" => OwnedValue::Bool(true),
            "false" | "0" => OwnedValue::Bool(false),
            _ => return Err(bad("a boolean")),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_is_typed_by_the_schema() {
        assert_eq!(
            parse("age", ValueType::Int64, Some("31")),
            Ok(OwnedValue::Int(31))
        );
        assert_eq!(
            parse("age", ValueType::Int64, None),
            Ok(OwnedValue::Missing)
        );
        assert_eq!(
            parse("vip", ValueType::Bool, Some("1")),
            Ok(OwnedValue::Bool(true))
        );
        let err = parse("age", ValueType::Int64, Some("old")).map(|_| ());
        assert!(
            matches!(err, Err(RequestError::BadValue { ref input, .. }) if input == "age"),
            "{err:?}"
        );
    }
}
