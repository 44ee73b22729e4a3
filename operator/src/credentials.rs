//! The Secrets that hold the data plane's shared tokens. Each is created once with fresh random tokens and then
//! only read, so every reconcile, every operator replica and every pod sees the same token; a key that is
//! missing or not a valid token (edited by hand) is regenerated in place. Deleting the Secret rotates its
//! tokens: the next reconcile makes new ones and the pod templates, which carry a digest of them, roll.

use std::collections::BTreeMap;

use flywheel_auth::Token;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use xxhash_rust::xxh3::xxh3_64;

/// Tokens by Secret key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tokens(BTreeMap<String, Token>);

impl Tokens {
    pub fn get(&self, key: &str) -> Option<&Token> {
        self.0.get(key)
    }

    /// A digest of every token, for a pod-template annotation: a rotated Secret rolls the pods that mount it
    /// (a running server reads its token once, at start).
    pub fn digest(&self) -> String {
        let joined: String = self
            .0
            .iter()
            .map(|(key, token)| format!("{key}={};", token.expose()))
            .collect();
        format!("{:016x}", xxh3_64(joined.as_bytes()))
    }
}

/// The tokens of `secret` under `keys`, and the keys that need a new token (absent or malformed).
fn read(secret: &Secret, keys: &[&str]) -> (Tokens, Vec<String>) {
    let data = secret.data.clone().unwrap_or_default();
    let mut tokens = BTreeMap::new();
    let mut missing = Vec::new();
    for &key in keys {
        let token = data
            .get(key)
            .and_then(|bytes| std::str::from_utf8(&bytes.0).ok())
            .and_then(|text| Token::parse(text).ok());
        match token {
            Some(token) => {
                tokens.insert(key.to_owned(), token);
            }
            None => missing.push(key.to_owned()),
        }
    }
    (Tokens(tokens), missing)
}

/// Why a credentials Secret could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("encoding the Secret: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("generating a token: {0}")]
    Generate(#[from] flywheel_auth::AuthError),
    #[error("Secret {name} keeps changing: {missing:?} still have no valid token")]
    Unsettled { name: String, missing: Vec<String> },
    #[error("the credentials have no {0}")]
    MissingKey(&'static str),
}

fn generate(keys: &[String]) -> Result<BTreeMap<String, ByteString>, CredentialsError> {
    keys.iter()
        .map(|key| {
            let token = Token::generate()?;
            Ok((key.clone(), ByteString(token.expose().as_bytes().to_vec())))
        })
        .collect()
}

/// The Secret `name` with a valid token under each of `keys`, created (owned by `owner`, labelled `labels`)
/// or completed as needed; returns its tokens.
pub async fn ensure(
    api: &Api<Secret>,
    name: &str,
    owner: Option<Value>,
    labels: Value,
    keys: &[&str],
) -> Result<Tokens, CredentialsError> {
    // Two tries: a create that loses a race with another writer (409) reads the winner's Secret.
    for _ in 0..2 {
        match api.get_opt(name).await? {
            Some(secret) => {
                let (tokens, missing) = read(&secret, keys);
                if missing.is_empty() {
                    return Ok(tokens);
                }
                let patch = json!({"data": generate(&missing)?});
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            None => {
                let all: Vec<String> = keys.iter().map(|&key| key.to_owned()).collect();
                let secret: Secret = serde_json::from_value(json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        "ownerReferences": owner.iter().collect::<Vec<_>>(),
                    },
                    "type": "Opaque",
                    "data": generate(&all)?,
                }))?;
                match api.create(&PostParams::default(), &secret).await {
                    Ok(created) => return Ok(read(&created, keys).0),
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(err) => return Err(err.into()),
                }
            }
        }
    }
    let secret = api.get(name).await?;
    match read(&secret, keys) {
        (tokens, missing) if missing.is_empty() => Ok(tokens),
        (_, missing) => Err(CredentialsError::Unsettled {
            name: name.to_owned(),
            missing,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn valid_tokens_are_kept_and_missing_or_malformed_keys_are_named() {
        let good = "0123456789abcdef0123456789abcdef";
        let (tokens, missing) = read(
            &secret(&[("admin-token", good), ("feedback-token", "short")]),
            &["admin-token", "feedback-token", "gang-token"],
        );
        assert_eq!(
            tokens.get("admin-token").map(Token::expose),
            Some(good),
            "a valid token is kept"
        );
        assert_eq!(missing, ["feedback-token", "gang-token"]);
    }

    #[test]
    fn the_digest_changes_with_any_token() -> Result<(), flywheel_auth::AuthError> {
        let tokens = |value: &str| -> Result<Tokens, flywheel_auth::AuthError> {
            Ok(Tokens(BTreeMap::from([(
                "admin-token".to_owned(),
                Token::parse(value)?,
            )])))
        };
        let a = tokens("0123456789abcdef0123456789abcdef")?;
        let b = tokens("0123456789abcdef0123456789abcdeg")?;
        assert_eq!(a.digest(), a.clone().digest());
        assert_ne!(a.digest(), b.digest());
        assert!(!a.digest().contains("0123456789abcdef"));
        Ok(())
    }
}
