//! A small client of the Prometheus HTTP API, for canary analysis: `http://` or `https://` (trusting the CA of
//! the Rollout's Secret, else the public web PKI), bearer or basic auth and a tenant header for multi-tenant
//! stores, and answers read up to [`MAX_ANSWER_BYTES`]: the URL is the Rollout author's, so an endless answer
//! must not take the operator's memory.

use std::sync::Arc;

use base64::Engine;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// The most of a Prometheus answer the operator reads: an analysis query returns one number.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error("prometheus URL {0} is not http(s)://host:port[/path]")]
    Url(String),
    #[error("prometheus {0}")]
    Transport(String),
    #[error("prometheus TLS: {0}")]
    Tls(String),
    #[error("prometheus answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("prometheus answer is not understood: {0}")]
    Decode(String),
    #[error("prometheus answer is larger than {0} bytes: an analysis query must return one number")]
    TooLarge(usize),
    #[error("the Prometheus Secret {name}: {message}")]
    Secret { name: String, message: String },
}

/// How to reach a secured Prometheus (from the Rollout's `analysis.prometheusSecret` and `tenant`).
#[derive(Clone, Default)]
pub struct Access {
    /// PEM certificates to trust for `https://` (else the public web PKI).
    pub ca_pem: Option<Vec<u8>>,
    /// The `Authorization` header value.
    pub authorization: Option<String>,
    /// `X-Scope-OrgID`.
    pub tenant: Option<String>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl Access {
    /// The access a Secret's data gives: `ca.crt`, and `token` or `username` + `password`.
    pub fn from_secret(
        name: &str,
        data: &std::collections::BTreeMap<String, Vec<u8>>,
        tenant: Option<String>,
    ) -> Result<Access, PrometheusError> {
        let text = |key: &str| -> Result<Option<String>, PrometheusError> {
            data.get(key)
                .map(|bytes| {
                    String::from_utf8(bytes.clone())
                        .map(|text| text.trim().to_owned())
                        .map_err(|_| PrometheusError::Secret {
                            name: name.to_owned(),
                            message: format!("`{key}` is not UTF-8 text"),
                        })
                })
                .transpose()
        };
        let authorization = match (text("token")?, text("username")?, text("password")?) {
            (Some(token), _, _) => Some(format!("Bearer {token}")),
            (None, Some(user), Some(password)) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(PrometheusError::Secret {
                    name: name.to_owned(),
                    message: "basic auth needs both `username` and `password`".to_owned(),
                });
            }
            (None, None, None) => None,
        };
        Ok(Access {
            ca_pem: data.get("ca.crt").cloned(),
            authorization,
            tenant,
        })
    }
}

/// A parsed base URL: scheme, `host:port`, host, and the path prefix (without trailing `/`).
struct Base<'a> {
    https: bool,
    authority: String,
    host: &'a str,
    prefix: &'a str,
}

fn parse_base(base: &str) -> Result<Base<'_>, PrometheusError> {
    let (https, rest) = match (base.strip_prefix("https://"), base.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => return Err(PrometheusError::Url(base.to_owned())),
    };
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() || authority.contains('@') {
        return Err(PrometheusError::Url(base.to_owned()));
    }
    let (host, has_port) = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => (host, true),
        _ => (authority, false),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let authority = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if https { 443 } else { 80 })
    };
    Ok(Base {
        https,
        authority,
        host,
        prefix: prefix.trim_end_matches('/'),
    })
}

fn tls_connector(access: &Access) -> Result<TlsConnector, PrometheusError> {
    let mut roots = RootCertStore::empty();
    match &access.ca_pem {
        Some(pem) => {
            for certificate in CertificateDer::pem_slice_iter(pem) {
                let certificate = certificate
                    .map_err(|err| PrometheusError::Tls(format!("ca.crt is not PEM: {err}")))?;
                roots
                    .add(certificate)
                    .map_err(|err| PrometheusError::Tls(format!("ca.crt: {err}")))?;
            }
            if roots.is_empty() {
                return Err(PrometheusError::Tls(
                    "ca.crt holds no certificate".to_owned(),
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| PrometheusError::Tls(err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `GET <base>/<path_and_query>`; the status and up to [`MAX_ANSWER_BYTES`] of the body.
pub async fn get(
    base: &str,
    path_and_query: &str,
    access: &Access,
) -> Result<(u16, Bytes), PrometheusError> {
    let base_url = parse_base(base)?;
    let path = if base_url.prefix.is_empty() {
        format!("/{path_and_query}")
    } else {
        format!("/{}/{path_and_query}", base_url.prefix)
    };
    let stream = TcpStream::connect(&base_url.authority)
        .await
        .map_err(|err| PrometheusError::Transport(err.to_string()))?;
    if base_url.https {
        let name = ServerName::try_from(base_url.host.to_owned())
            .map_err(|err| PrometheusError::Tls(format!("{}: {err}", base_url.host)))?;
        let tls = tls_connector(access)?
            .connect(name, stream)
            .await
            .map_err(|err| PrometheusError::Tls(err.to_string()))?;
        exchange(tls, &base_url.authority, &path, access).await
    } else {
        exchange(stream, &base_url.authority, &path, access).await
    }
}

async fn exchange<S>(
    stream: S,
    authority: &str,
    path: &str,
    access: &Access,
) -> Result<(u16, Bytes), PrometheusError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let transport = |err: &dyn std::fmt::Display| PrometheusError::Transport(err.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transport(&e))?;
    tokio::spawn(connection);
    let mut request = hyper::Request::get(path).header(hyper::header::HOST, authority);
    if let Some(value) = &access.authorization {
        request = request.header(hyper::header::AUTHORIZATION, value);
    }
    if let Some(tenant) = &access.tenant {
        request = request.header("X-Scope-OrgID", tenant);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| transport(&e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| transport(&e))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|err| {
            if err.downcast_ref::<LengthLimitError>().is_some() {
                PrometheusError::TooLarge(MAX_ANSWER_BYTES)
            } else {
                transport(&err)
            }
        })?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::pki_types::PrivateKeyDer;

    use super::*;

    // A test CA and a certificate it signed for 127.0.0.1 and localhost (valid until 2126), made with openssl;
    // the key is only ever used by this test's server.
    const CA: &[u8] = include_bytes!("../testdata/prometheus-ca.crt");
    const SERVER_CERTIFICATE: &[u8] = include_bytes!("../testdata/prometheus-server.crt");
    const SERVER_KEY: &[u8] = include_bytes!("../testdata/prometheus-server.key");

    /// An https Prometheus on a free port that answers `1` to a request carrying `expect_headers`, and 401
    /// otherwise.
    async fn secured_prometheus(
        expect_headers: Vec<String>,
    ) -> Result<std::net::SocketAddr, Box<dyn std::error::Error>> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(SERVER_CERTIFICATE).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(SERVER_KEY)?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, expect_headers) = (acceptor.clone(), expect_headers.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&request).to_lowercase();
                    let authorized = expect_headers
                        .iter()
                        .all(|header| text.contains(&header.to_lowercase()));
                    let (status, body) = if authorized {
                        (
                            "200 OK",
                            r#"{"status":"success","data":{"resultType":"scalar","result":[1,"1"]}}"#,
                        )
                    } else {
                        ("401 Unauthorized", "unauthorized")
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Ok(address)
    }

    #[tokio::test]
    async fn https_with_the_secrets_ca_bearer_token_and_tenant()
    -> Result<(), Box<dyn std::error::Error>> {
        let address = secured_prometheus(vec![
            "authorization: Bearer s3cret".into(),
            "x-scope-orgid: team-a".into(),
        ])
        .await?;
        let base = format!("https://{address}/prometheus");
        let secret = BTreeMap::from([
            ("ca.crt".to_owned(), CA.to_vec()),
            ("token".to_owned(), b"s3cret\n".to_vec()),
        ]);
        let access = Access::from_secret("prom", &secret, Some("team-a".into()))?;
        let (status, body) = get(&base, "api/v1/query?query=1", &access).await?;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

        // Without the tenant the store refuses; without the CA the certificate is not trusted.
        let no_tenant = Access::from_secret("prom", &secret, None)?;
        assert_eq!(get(&base, "api/v1/query?query=1", &no_tenant).await?.0, 401);
        let public_roots = Access {
            ca_pem: None,
            ..access
        };
        let refused = get(&base, "api/v1/query?query=1", &public_roots).await;
        assert!(
            matches!(&refused, Err(PrometheusError::Tls(message)) if message.contains("certificate")),
            "{refused:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn basic_auth_from_username_and_password() -> Result<(), Box<dyn std::error::Error>> {
        // "flywheel:p@ss" in base64.
        let address =
            secured_prometheus(vec!["authorization: Basic Zmx5d2hlZWw6cEBzcw==".into()]).await?;
        let secret = BTreeMap::from([
            ("ca.crt".to_owned(), CA.to_vec()),
            ("username".to_owned(), b"flywheel".to_vec()),
            ("password".to_owned(), b"p@ss".to_vec()),
        ]);
        let access = Access::from_secret("prom", &secret, None)?;
        let (status, _) = get(
            &format!("https://localhost:{}", address.port()),
            "api/v1/query?query=1",
            &access,
        )
        .await?;
        assert_eq!(status, 200);
        let half = BTreeMap::from([("username".to_owned(), b"flywheel".to_vec())]);
        assert!(matches!(
            Access::from_secret("prom", &half, None),
            Err(PrometheusError::Secret { .. })
        ));
        Ok(())
    }

    #[test]
    fn base_urls_name_scheme_host_port_and_prefix() {
        let base =
            parse_base("https://mimir.example.com/prometheus/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (base.https, base.authority.as_str(), base.host, base.prefix),
            (
                true,
                "mimir.example.com:443",
                "mimir.example.com",
                "prometheus"
            )
        );
        let base = parse_base("http://10.0.0.1:9090").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (base.https, base.authority.as_str(), base.host, base.prefix),
            (false, "10.0.0.1:9090", "10.0.0.1", "")
        );
        for bad in ["ftp://x", "https://", "http://user:pw@host:9090"] {
            assert!(parse_base(bad).is_err(), "{bad}");
        }
    }
}
