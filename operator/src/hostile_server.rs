//! Hostile HTTP servers for tests: one answers every connection with `200 OK` and a chunked body that never
//! ends, as a user-chosen Prometheus or a job's chief could; one never answers at all, as a hung API server.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves every connection on a free loopback port with `handle`, until the test's runtime ends.
async fn serve<F>(handle: fn(TcpStream) -> F) -> std::io::Result<SocketAddr>
where
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream));
        }
    });
    Ok(address)
}

/// A server whose answer never ends.
pub async fn endless() -> std::io::Result<SocketAddr> {
    serve(|mut stream| async move {
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "7".repeat(64 << 10));
        // Until the client hangs up: a gibibyte and more, for a reader without a limit.
        while stream.write_all(chunk.as_bytes()).await.is_ok() {}
    })
    .await
}

/// A server that reads every request and never answers.
pub async fn silent() -> std::io::Result<SocketAddr> {
    serve(|mut stream| async move {
        let mut request = [0u8; 4096];
        // Reads until the client hangs up; nothing is ever written back.
        while matches!(stream.read(&mut request).await, Ok(n) if n > 0) {}
    })
    .await
}
