//! The gang token on the wire: every member of a TrainingJob's gang holds the token of the job's Secret, the
//! parameter-server shards and the data-parallel chief accept only calls that carry it, and every client sends
//! it. A bearer token, not mutual TLS: the gang's members are pods the operator creates from one Secret, and a
//! token needs no certificate authority per job; the traffic itself stays in the cluster network unencrypted.

use std::path::Path;

use flywheel_auth::Token;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The token in `path`, when one is configured (`--gang-token-file`).
pub fn load(path: Option<&Path>) -> Result<Option<Token>, flywheel_auth::AuthError> {
    path.map(Token::from_file).transpose()
}

/// Adds the gang token to every call a client makes.
#[derive(Clone, Default)]
pub struct AttachToken(Option<MetadataValue<Ascii>>);

impl AttachToken {
    pub fn new(token: Option<&Token>) -> Self {
        // A token is visible ASCII (checked when it was read), so it is always a valid header value.
        AttachToken(token.and_then(|token| token.bearer().parse().ok()))
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Refuses every call without the gang token (`UNAUTHENTICATED`); without a token configured, takes all.
#[derive(Clone, Default)]
pub struct RequireToken(Option<Token>);

impl RequireToken {
    pub fn new(token: Option<Token>) -> Self {
        RequireToken(token)
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else {
            return Ok(request);
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        if token.authorizes(header) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "this gang's RPCs need `authorization: Bearer <gang token>`",
            ))
        }
    }
}
