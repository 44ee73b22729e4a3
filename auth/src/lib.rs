//! The shared secrets between the operator and the data plane. The operator generates one [`Token`] per purpose
//! (a Rollout's admin and feedback tokens, a TrainingJob's gang token), keeps it in a Secret it owns and mounts
//! it into the pods; a caller proves it holds the token with an `Authorization` header, `Bearer <token>` or
//! HTTP Basic with the token as the password (Alertmanager's `http_config` can send either).

pub mod store_clients;

use std::fmt;
use std::path::Path;

use base64::Engine;

/// Random bytes in a generated token (256 bits: not guessable, not enumerable).
const TOKEN_BYTES: usize = 32;
/// A shorter token is refused: it would be a password someone chose, not a generated secret.
pub const MIN_TOKEN_LEN: usize = 16;
const MAX_TOKEN_LEN: usize = 4096;

/// Where the pods of a Rollout or a TrainingJob find their mounted credentials.
pub const CREDENTIALS_DIR: &str = "/var/run/flywheel/credentials";
/// Secret keys (and file names under [`CREDENTIALS_DIR`]).
pub const ADMIN_TOKEN_KEY: &str = "admin-token";
pub const FEEDBACK_TOKEN_KEY: &str = "feedback-token";
pub const GANG_TOKEN_KEY: &str = "gang-token";
pub const WEBHOOK_TOKEN_KEY: &str = "token";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("the system random source failed: {0}")]
    Random(String),
    #[error("reading the token file {path}: {message}")]
    Read { path: String, message: String },
    #[error(
        "a token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} visible ASCII characters; this one is not"
    )]
    Malformed,
}

/// A shared secret. Its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A fresh token from the operating system's random source, as lowercase hex.
    pub fn generate() -> Result<Token, AuthError> {
        Ok(Token(random_hex(TOKEN_BYTES)?))
    }

    /// A token from text (a Secret value, a mounted file): surrounding whitespace is dropped.
    pub fn parse(text: &str) -> Result<Token, AuthError> {
        let text = text.trim();
        let visible = text.bytes().all(|b| b.is_ascii_graphic());
        if !visible || text.len() < MIN_TOKEN_LEN || text.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        Ok(Token(text.to_owned()))
    }

    pub fn from_file(path: &Path) -> Result<Token, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|err| AuthError::Read {
            path: path.display().to_string(),
            message: err.to_string(),
        })?;
        Token::parse(&text)
    }

    /// The secret itself, for a Secret's data.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The `Authorization` header value that proves holding this token.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether an `Authorization` header value proves holding this token: `Bearer <token>`, or Basic with
    /// the token as the password (any user name). Compared in constant time.
    pub fn authorizes(&self, header: Option<&str>) -> bool {
        let Some(header) = header else {
            return false;
        };
        let (scheme, credentials) = header.trim().split_once(' ').unwrap_or((header, ""));
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            constant_time_eq(credentials.as_bytes(), self.0.as_bytes())
        } else if scheme.eq_ignore_ascii_case("basic") {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
                return false;
            };
            let password = match decoded.iter().position(|&b| b == b':') {
                Some(colon) => &decoded[colon + 1..],
                None => return false,
            };
            constant_time_eq(password, self.0.as_bytes())
        } else {
            false
        }
    }
}

/// `bytes` random bytes as lowercase hex (request ids, tokens).
pub fn random_hex(bytes: usize) -> Result<String, AuthError> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).map_err(|err| AuthError::Random(err.to_string()))?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

/// Equality whose time depends only on the lengths, so a caller cannot find a token byte by byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn generated_tokens_are_long_distinct_and_parse_back() -> Result<(), AuthError> {
        let a = Token::generate()?;
        let b = Token::generate()?;
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 2 * TOKEN_BYTES);
        assert_eq!(Token::parse(&format!("{}\n", a.expose()))?, a);
        assert!(!format!("{a:?}").contains(a.expose()));
        Ok(())
    }

    #[test]
    fn only_the_right_token_in_bearer_or_basic_form_authorizes() -> Result<(), AuthError> {
        let token = Token::parse("0123456789abcdef0123")?;
        assert!(token.authorizes(Some("Bearer 0123456789abcdef0123")));
        assert!(token.authorizes(Some("bearer 0123456789abcdef0123")));
        assert!(token.authorizes(Some(&basic("alertmanager", token.expose()))));
        assert!(token.authorizes(Some(&basic("", token.expose()))));
        for wrong in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer 0123456789abcdef012"),
            Some("Bearer 0123456789abcdef01234"),
            Some("0123456789abcdef0123"),
            Some("Token 0123456789abcdef0123"),
            Some("Basic not-base64!"),
            Some(&basic("0123456789abcdef0123", "wrong")),
        ] {
            assert!(!token.authorizes(wrong), "{wrong:?}");
        }
        Ok(())
    }

    #[test]
    fn short_or_invisible_tokens_are_refused() {
        assert_eq!(Token::parse("short"), Err(AuthError::Malformed));
        assert_eq!(
            Token::parse("0123456789 abcdef0123"),
            Err(AuthError::Malformed)
        );
        assert_eq!(Token::parse(""), Err(AuthError::Malformed));
    }
}
