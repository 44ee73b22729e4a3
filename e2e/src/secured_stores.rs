//! Stores that demand what managed Kafka and Redis demand: TLS with a private CA, and authentication. Real
//! servers on 127.0.0.1: Debian's redis-server with TLS only, and the Kafka-protocol broker requiring SASL behind
//! a real TLS terminator (Debian's stunnel; the broker itself speaks plaintext).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::serving::{Process, ServingError, free_port, io, run};
use crate::wait::until;

/// A private CA, a server certificate it signed for 127.0.0.1, and a second CA that signed nothing here.
pub struct TestCertificates {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub other_ca: PathBuf,
}

impl TestCertificates {
    /// Generated with the `openssl` command into `dir`.
    pub fn generate(dir: &Path) -> Result<TestCertificates, ServingError> {
        std::fs::create_dir_all(dir).map_err(io("the certificate directory"))?;
        let file = |name: &str| dir.join(name).display().to_string();
        for (key, cert, subject) in [
            ("ca.key", "ca.crt", "/CN=flywheel-test-ca"),
            ("other-ca.key", "other-ca.crt", "/CN=flywheel-other-ca"),
        ] {
            run(
                Command::new("openssl")
                    .args([
                        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    ])
                    .args(["-keyout", &file(key), "-out", &file(cert), "-subj", subject])
                    .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                    .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
                "openssl req (CA)",
            )?;
        }
        run(
            Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=127.0.0.1",
                ])
                .args(["-keyout", &file("server.key"), "-out", &file("server.csr")]),
            "openssl req (server)",
        )?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .map_err(io("the certificate extensions"))?;
        run(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-in", &file("server.csr")])
                .args(["-CA", &file("ca.crt"), "-CAkey", &file("ca.key")])
                .args(["-CAcreateserial", "-out", &file("server.crt")])
                .args(["-extfile", &file("server.ext")]),
            "openssl x509 (sign)",
        )?;
        Ok(TestCertificates {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            other_ca: dir.join("other-ca.crt"),
        })
    }
}

async fn listening(what: &str, port: u16) -> Result<(), ServingError> {
    until(what, Duration::from_secs(30), || async move {
        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map(|_| ())
            .map_err(|err| err.to_string())
    })
    .await?;
    Ok(())
}

/// redis-server accepting only TLS connections (no plaintext port) and only with `password`.
pub struct TlsRedis {
    _process: Process,
    pub port: u16,
    certs_ca: PathBuf,
    password: String,
}

impl TlsRedis {
    pub async fn start(
        dir: &Path,
        certs: &TestCertificates,
        password: &str,
    ) -> Result<TlsRedis, ServingError> {
        let port = free_port()?;
        let process = Process::spawn(
            "redis-tls",
            Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--tls-cert-file")
                .arg(&certs.server_cert)
                .arg("--tls-key-file")
                .arg(&certs.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca)
                .args(["--tls-auth-clients", "no", "--requirepass", password]),
            &dir.join("redis-tls.log"),
        )?;
        listening("redis (TLS) listening", port).await?;
        Ok(TlsRedis {
            _process: process,
            port,
            certs_ca: certs.ca.clone(),
            password: password.to_owned(),
        })
    }

    /// Runs one command with `redis-cli --tls`, authenticated.
    pub fn command(&self, args: &[&str]) -> Result<String, ServingError> {
        run(
            Command::new("redis-cli")
                .args(["--tls", "--cacert"])
                .arg(&self.certs_ca)
                .args(["-p", &self.port.to_string(), "--no-auth-warning"])
                .args(["-a", &self.password])
                .args(args),
            "redis-cli --tls",
        )
    }
}

/// The Kafka-protocol broker requiring SASL SCRAM-SHA-512, reachable over TLS only: clients connect to
/// `address` (stunnel), which the broker also advertises, so every connection a client opens is encrypted. The
/// user and the topics are made first, by the same broker without authentication on the same SQLite storage
/// (tansu's own client cannot authenticate).
pub struct SecuredBroker {
    _broker: Process,
    _terminator: Process,
    /// `127.0.0.1:<TLS port>`.
    pub address: String,
    plaintext: String,
    tansu: PathBuf,
}

impl SecuredBroker {
    pub async fn start(
        dir: &Path,
        certs: &TestCertificates,
        (user, password): (&str, &str),
        topics: &[&str],
    ) -> Result<SecuredBroker, ServingError> {
        let tansu = crate::serving::tansu_binary();
        let (inner, outer) = (free_port()?, free_port()?);
        let plaintext = format!("127.0.0.1:{inner}");
        let address = format!("127.0.0.1:{outer}");
        let broker = |name: &str, advertised: &str, extra: &[&str]| {
            let mut command = Command::new(&tansu);
            command
                .current_dir(dir)
                .args(["broker", "--listener-url", &format!("tcp://{plaintext}")])
                .args(["--advertised-listener-url", &format!("tcp://{advertised}")])
                .args(["--storage-engine", "sqlite://tansu.db"])
                .args(extra);
            Process::spawn(name, &mut command, &dir.join(format!("{name}.log")))
        };
        let mut setup = broker("tansu-setup", &plaintext, &[])?;
        listening("tansu (setup) listening", inner).await?;
        let url = format!("tcp://{plaintext}");
        run(
            Command::new(&tansu)
                .args([
                    "user",
                    "create",
                    "--broker",
                    &url,
                    "--mechanism",
                    "scram512",
                ])
                .args([user, password]),
            "tansu user create",
        )?;
        for topic in topics {
            run(
                Command::new(&tansu)
                    .args(["topic", "create", "--broker", &url, "--partitions", "1"])
                    .arg(topic),
                "tansu topic create",
            )?;
        }
        setup.kill();
        let broker = broker("tansu-sasl", &address, &["--authentication"])?;
        listening("tansu (SASL) listening", inner).await?;
        let config = dir.join("stunnel.conf");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = {address}\nconnect = {plaintext}\n\
                 cert = {}\nkey = {}\n",
                certs.server_cert.display(),
                certs.server_key.display()
            ),
        )
        .map_err(io("the stunnel configuration"))?;
        let terminator = Process::spawn(
            "stunnel",
            Command::new("stunnel4").arg(&config),
            &dir.join("stunnel.log"),
        )?;
        listening("stunnel listening", outer).await?;
        Ok(SecuredBroker {
            _broker: broker,
            _terminator: terminator,
            address,
            plaintext,
            tansu,
        })
    }

    /// Creating a topic without credentials, as tansu's own client does: the broker must refuse it.
    pub fn create_topic_unauthenticated(&self, name: &str) -> Result<String, ServingError> {
        run(
            Command::new(&self.tansu)
                .args(["topic", "create", "--broker"])
                .arg(format!("tcp://{}", self.plaintext))
                .args(["--partitions", "1", name]),
            "tansu topic create",
        )
    }
}
