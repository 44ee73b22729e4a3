//! How the data plane's clients reach the stores a user runs: Kafka over TLS and/or SASL, Redis over TLS. The
//! operator passes the settings as environment variables and mounts the user's Secrets; the names are shared
//! here so both sides agree.

use std::path::{Path, PathBuf};

/// Environment of a pod that talks to Kafka.
pub const KAFKA_TLS_ENV: &str = "FLYWHEEL_KAFKA_TLS";
pub const KAFKA_CA_FILE_ENV: &str = "FLYWHEEL_KAFKA_CA_FILE";
pub const KAFKA_SASL_MECHANISM_ENV: &str = "FLYWHEEL_KAFKA_SASL_MECHANISM";
pub const KAFKA_SASL_USERNAME_ENV: &str = "FLYWHEEL_KAFKA_SASL_USERNAME";
pub const KAFKA_SASL_PASSWORD_ENV: &str = "FLYWHEEL_KAFKA_SASL_PASSWORD";
/// Environment of a pod that talks to Redis.
pub const REDIS_TLS_ENV: &str = "FLYWHEEL_REDIS_TLS";
pub const REDIS_CA_FILE_ENV: &str = "FLYWHEEL_REDIS_CA_FILE";

/// Where a pod finds the CA certificates the operator mounts from the user's Secrets.
pub const KAFKA_CA_DIR: &str = "/var/run/flywheel/kafka-ca";
pub const REDIS_CA_DIR: &str = "/var/run/flywheel/redis-ca";

/// librdkafka refuses a config whose SASL mechanism it does not know; these are the ones it builds with here.
const SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StoreClientError {
    #[error("--kafka-sasl-mechanism {0} is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512")]
    UnknownMechanism(String),
    #[error("--kafka-sasl-mechanism needs --kafka-sasl-username and --kafka-sasl-password")]
    MissingCredentials,
    #[error("--kafka-sasl-username and --kafka-sasl-password need --kafka-sasl-mechanism")]
    MissingMechanism,
    #[error("reading the CA certificate {path}: {message}")]
    ReadCa { path: String, message: String },
    #[error("the CA certificate {0} holds no PEM certificate")]
    NotPem(String),
}

/// How a Kafka client connects: plaintext unless TLS or SASL is asked for.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct KafkaClientArgs {
    /// Connect to the brokers over TLS.
    #[arg(long, env = KAFKA_TLS_ENV)]
    pub kafka_tls: bool,
    /// PEM certificate authority that signed the brokers' certificates (implies --kafka-tls); default: the
    /// system's roots.
    #[arg(long, env = KAFKA_CA_FILE_ENV)]
    pub kafka_ca_file: Option<PathBuf>,
    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, env = KAFKA_SASL_MECHANISM_ENV)]
    pub kafka_sasl_mechanism: Option<String>,
    #[arg(long, env = KAFKA_SASL_USERNAME_ENV)]
    pub kafka_sasl_username: Option<String>,
    #[arg(long, env = KAFKA_SASL_PASSWORD_ENV, hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
}

impl KafkaClientArgs {
    /// The librdkafka settings these arguments stand for, checked: a client that would connect without the
    /// authentication asked for is refused before it connects.
    pub fn settings(&self) -> Result<Vec<(&'static str, String)>, StoreClientError> {
        let tls = self.kafka_tls || self.kafka_ca_file.is_some();
        let sasl = match (
            &self.kafka_sasl_mechanism,
            &self.kafka_sasl_username,
            &self.kafka_sasl_password,
        ) {
            (None, None, None) => None,
            (Some(mechanism), Some(username), Some(password)) => {
                let mechanism = mechanism.trim().to_ascii_uppercase();
                if !SASL_MECHANISMS.contains(&mechanism.as_str()) {
                    return Err(StoreClientError::UnknownMechanism(mechanism));
                }
                Some((mechanism, username, password))
            }
            (Some(_), _, _) => return Err(StoreClientError::MissingCredentials),
            (None, _, _) => return Err(StoreClientError::MissingMechanism),
        };
        let protocol = match (tls, sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        let mut settings = vec![("security.protocol", protocol.to_owned())];
        if let Some(path) = &self.kafka_ca_file {
            read_ca(path)?;
            settings.push(("ssl.ca.location", path.display().to_string()));
        }
        if let Some((mechanism, username, password)) = sasl {
            settings.push(("sasl.mechanism", mechanism));
            settings.push(("sasl.username", username.clone()));
            settings.push(("sasl.password", password.clone()));
        }
        Ok(settings)
    }
}

/// How a Redis client connects: TLS (`rediss://`) when asked for, against `ca_pem` or the system's roots.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RedisClientArgs {
    /// Connect to Redis over TLS.
    #[arg(long, env = REDIS_TLS_ENV)]
    pub redis_tls: bool,
    /// PEM certificate authority that signed the Redis server's certificate (implies --redis-tls); default:
    /// the system's roots.
    #[arg(long, env = REDIS_CA_FILE_ENV)]
    pub redis_ca_file: Option<PathBuf>,
}

/// TLS toward a store, with the roots that verify the server.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientTls {
    /// PEM certificates; `None` trusts the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl RedisClientArgs {
    pub fn tls(&self) -> Result<Option<ClientTls>, StoreClientError> {
        match &self.redis_ca_file {
            Some(path) => Ok(Some(ClientTls {
                ca_pem: Some(read_ca(path)?),
            })),
            None if self.redis_tls => Ok(Some(ClientTls { ca_pem: None })),
            None => Ok(None),
        }
    }
}

/// Reads a CA file, so a missing or wrong file fails at start with its name, not at the first connection.
fn read_ca(path: &Path) -> Result<Vec<u8>, StoreClientError> {
    let pem = std::fs::read(path).map_err(|err| StoreClientError::ReadCa {
        path: path.display().to_string(),
        message: err.to_string(),
    })?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|window| window == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(StoreClientError::NotPem(path.display().to_string()));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl(mechanism: &str) -> KafkaClientArgs {
        KafkaClientArgs {
            kafka_sasl_mechanism: Some(mechanism.into()),
            kafka_sasl_username: Some("alice".into()),
            kafka_sasl_password: Some("p@ss".into()),
            ..KafkaClientArgs::default()
        }
    }

    fn get(settings: &[(&'static str, String)], key: &str) -> Option<String> {
        settings
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn the_protocol_follows_from_tls_and_sasl() {
        let plain = KafkaClientArgs::default().settings();
        assert_eq!(plain, Ok(vec![("security.protocol", "plaintext".into())]));
        let tls = KafkaClientArgs {
            kafka_tls: true,
            ..KafkaClientArgs::default()
        };
        assert_eq!(
            get(&tls.settings().unwrap_or_default(), "security.protocol"),
            Some("ssl".into())
        );
        let scram = sasl("scram-sha-512").settings().unwrap_or_default();
        assert_eq!(
            get(&scram, "security.protocol"),
            Some("sasl_plaintext".into())
        );
        assert_eq!(get(&scram, "sasl.mechanism"), Some("SCRAM-SHA-512".into()));
        assert_eq!(get(&scram, "sasl.password"), Some("p@ss".into()));
        let both = KafkaClientArgs {
            kafka_tls: true,
            ..sasl("PLAIN")
        };
        assert_eq!(
            get(&both.settings().unwrap_or_default(), "security.protocol"),
            Some("sasl_ssl".into())
        );
    }

    #[test]
    fn half_given_credentials_are_refused_before_connecting() {
        let no_password = KafkaClientArgs {
            kafka_sasl_password: None,
            ..sasl("PLAIN")
        };
        assert_eq!(
            no_password.settings(),
            Err(StoreClientError::MissingCredentials)
        );
        let no_mechanism = KafkaClientArgs {
            kafka_sasl_mechanism: None,
            ..sasl("PLAIN")
        };
        assert_eq!(
            no_mechanism.settings(),
            Err(StoreClientError::MissingMechanism)
        );
        assert_eq!(
            sasl("GSSAPI").settings(),
            Err(StoreClientError::UnknownMechanism("GSSAPI".into()))
        );
    }

    #[test]
    fn a_ca_file_implies_tls_and_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("flywheel-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let good = dir.join("ca.crt");
        std::fs::write(
            &good,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let bad = dir.join("bad.crt");
        std::fs::write(&bad, "not a certificate").unwrap_or_else(|e| panic!("{e}"));

        let kafka = KafkaClientArgs {
            kafka_ca_file: Some(good.clone()),
            ..KafkaClientArgs::default()
        };
        let settings = kafka.settings().unwrap_or_default();
        assert_eq!(get(&settings, "security.protocol"), Some("ssl".into()));
        assert_eq!(
            get(&settings, "ssl.ca.location"),
            Some(good.display().to_string())
        );
        let redis = RedisClientArgs {
            redis_ca_file: Some(good.clone()),
            ..RedisClientArgs::default()
        };
        assert!(matches!(
            redis.tls(),
            Ok(Some(ClientTls { ca_pem: Some(_) }))
        ));
        let refused = RedisClientArgs {
            redis_ca_file: Some(bad.clone()),
            ..RedisClientArgs::default()
        };
        assert_eq!(
            refused.tls(),
            Err(StoreClientError::NotPem(bad.display().to_string()))
        );
        let missing = KafkaClientArgs {
            kafka_ca_file: Some(dir.join("absent.crt")),
            ..KafkaClientArgs::default()
        };
        assert!(matches!(
            missing.settings(),
            Err(StoreClientError::ReadCa { .. })
        ));
        assert_eq!(RedisClientArgs::default().tls(), Ok(None));
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    }
}
