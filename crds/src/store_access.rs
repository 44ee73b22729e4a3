//! How Flywheel's pods reach the stores a user runs: Kafka over TLS and SASL (what every managed Kafka asks
//! for), Redis over TLS. Credentials stay in the user's Secrets; the operator mounts them, never copies them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::DNS_LABEL_PATTERN;

/// Secret key holding a PEM certificate authority.
pub const CA_KEY: &str = "ca.crt";
/// Secret keys holding SASL credentials.
pub const USERNAME_KEY: &str = "username";
pub const PASSWORD_KEY: &str = "password";

/// TLS toward a store. `tls: {}` encrypts and checks the server against the image's system roots.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    /// Secret (same namespace) whose `ca.crt` key holds the PEM certificate authority that signed the server's
    /// certificate, for a private CA. Without it the server must present a certificate the system roots trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 253))]
    pub ca_secret: Option<String>,
}

/// How a client authenticates to and encrypts toward Kafka. Neither set: plaintext, no authentication.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSecurity {
    /// Connect over TLS (`SSL`, or `SASL_SSL` with `sasl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
    /// Authenticate with SASL (`SASL_PLAINTEXT`, or `SASL_SSL` with `tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSasl>,
}

/// SASL authentication toward Kafka.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSasl {
    /// The SASL mechanism the brokers accept: `PLAIN` (sends the password as it is: use it with `tls`),
    /// `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: SaslMechanism,
    /// Secret (same namespace) whose `username` and `password` keys hold the credentials.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 253))]
    pub credentials_secret: String,
}

/// A SASL mechanism, named as Kafka names it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name librdkafka's `sasl.mechanism` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}
