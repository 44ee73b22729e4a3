//! What a pod needs to reach a user's Kafka or Redis over TLS and SASL: the credentials as `secretKeyRef`s and
//! the CA as a read-only Secret volume. Nothing is copied out of the user's Secrets, so rotating one rolls
//! through at the pods' next start.

use flywheel_auth::store_clients::{
    KAFKA_CA_DIR, KAFKA_CA_FILE_ENV, KAFKA_SASL_MECHANISM_ENV, KAFKA_SASL_PASSWORD_ENV,
    KAFKA_SASL_USERNAME_ENV, KAFKA_TLS_ENV, REDIS_CA_DIR, REDIS_CA_FILE_ENV, REDIS_TLS_ENV,
};
use flywheel_crds::store_access::{CA_KEY, ClientTls, KafkaSecurity, PASSWORD_KEY, USERNAME_KEY};
use serde_json::{Value, json};

/// Environment, volumes and mounts a container adds.
#[derive(Debug, Default, PartialEq)]
pub struct PodAccess {
    pub env: Vec<Value>,
    pub volumes: Vec<Value>,
    pub mounts: Vec<Value>,
}

impl PodAccess {
    /// Access to Kafka as `security` asks; nothing for a plaintext cluster.
    pub fn kafka(security: Option<&KafkaSecurity>) -> PodAccess {
        let mut access = PodAccess::default();
        let Some(security) = security else {
            return access;
        };
        if let Some(tls) = &security.tls {
            access.tls(
                tls,
                "kafka-ca",
                KAFKA_CA_DIR,
                KAFKA_TLS_ENV,
                KAFKA_CA_FILE_ENV,
            );
        }
        if let Some(sasl) = &security.sasl {
            access
                .env
                .push(json!({"name": KAFKA_SASL_MECHANISM_ENV, "value": sasl.mechanism.as_str()}));
            for (name, key) in [
                (KAFKA_SASL_USERNAME_ENV, USERNAME_KEY),
                (KAFKA_SASL_PASSWORD_ENV, PASSWORD_KEY),
            ] {
                access
                    .env
                    .push(json!({"name": name, "valueFrom": {"secretKeyRef": {
                    "name": sasl.credentials_secret, "key": key}}}));
            }
        }
        access
    }

    /// Access to Redis over TLS when `tls` is set.
    pub fn redis(tls: Option<&ClientTls>) -> PodAccess {
        let mut access = PodAccess::default();
        if let Some(tls) = tls {
            access.tls(
                tls,
                "redis-ca",
                REDIS_CA_DIR,
                REDIS_TLS_ENV,
                REDIS_CA_FILE_ENV,
            );
        }
        access
    }

    /// Both accesses, for a pod that talks to Kafka and Redis.
    pub fn and(mut self, other: PodAccess) -> PodAccess {
        self.env.extend(other.env);
        self.volumes.extend(other.volumes);
        self.mounts.extend(other.mounts);
        self
    }

    /// Adds the access to a container's `env` and to the pod's `volumes` and the container's `mounts` (JSON
    /// arrays).
    pub fn add_to(&self, env: &mut Vec<Value>, volumes: &mut Value, mounts: &mut Value) {
        env.extend(self.env.iter().cloned());
        if let Some(list) = volumes.as_array_mut() {
            list.extend(self.volumes.iter().cloned());
        }
        if let Some(list) = mounts.as_array_mut() {
            list.extend(self.mounts.iter().cloned());
        }
    }

    fn tls(&mut self, tls: &ClientTls, volume: &str, dir: &str, tls_env: &str, ca_env: &str) {
        self.env.push(json!({"name": tls_env, "value": "true"}));
        let Some(secret) = &tls.ca_secret else {
            return;
        };
        self.volumes.push(json!({"name": volume, "secret": {
            "secretName": secret, "items": [{"key": CA_KEY, "path": CA_KEY}]}}));
        self.mounts
            .push(json!({"name": volume, "mountPath": dir, "readOnly": true}));
        self.env
            .push(json!({"name": ca_env, "value": format!("{dir}/{CA_KEY}")}));
    }
}

#[cfg(test)]
mod tests {
    use flywheel_crds::store_access::{KafkaSasl, SaslMechanism};

    use super::*;

    fn names(values: &[Value]) -> Vec<&str> {
        values
            .iter()
            .filter_map(|value| value["name"].as_str())
            .collect()
    }

    #[test]
    fn plaintext_stores_need_nothing() {
        assert_eq!(PodAccess::kafka(None), PodAccess::default());
        assert_eq!(
            PodAccess::kafka(Some(&KafkaSecurity::default())),
            PodAccess::default()
        );
        assert_eq!(PodAccess::redis(None), PodAccess::default());
    }

    #[test]
    fn sasl_credentials_come_from_the_users_secret_and_the_ca_is_mounted() {
        let security = KafkaSecurity {
            tls: Some(ClientTls {
                ca_secret: Some("kafka-ca".into()),
            }),
            sasl: Some(KafkaSasl {
                mechanism: SaslMechanism::ScramSha512,
                credentials_secret: "kafka-user".into(),
            }),
        };
        let access = PodAccess::kafka(Some(&security));
        assert_eq!(
            names(&access.env),
            [
                KAFKA_TLS_ENV,
                KAFKA_CA_FILE_ENV,
                KAFKA_SASL_MECHANISM_ENV,
                KAFKA_SASL_USERNAME_ENV,
                KAFKA_SASL_PASSWORD_ENV
            ]
        );
        assert_eq!(access.env[1]["value"], "/var/run/flywheel/kafka-ca/ca.crt");
        assert_eq!(access.env[2]["value"], "SCRAM-SHA-512");
        assert_eq!(
            access.env[4]["valueFrom"]["secretKeyRef"],
            json!({"name": "kafka-user", "key": "password"})
        );
        assert_eq!(access.volumes[0]["secret"]["secretName"], "kafka-ca");
        assert_eq!(access.mounts[0]["readOnly"], true);
    }

    #[test]
    fn tls_without_a_ca_trusts_the_system_roots() {
        let access = PodAccess::redis(Some(&ClientTls { ca_secret: None }));
        assert_eq!(names(&access.env), [REDIS_TLS_ENV]);
        assert!(access.volumes.is_empty() && access.mounts.is_empty());
        let both = PodAccess::kafka(None).and(access);
        assert_eq!(names(&both.env), [REDIS_TLS_ENV]);
    }
}
