//! Polling until a condition holds, with a deadline and the last observation in the failure message.

use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
#[error("gave up after {waited:?} waiting for {what}; last observation: {last}")]
pub struct Timeout {
    pub what: String,
    pub waited: Duration,
    pub last: String,
}

/// Calls `probe` every 200 ms until it returns `Ok(value)`; `Err(observation)` means "not yet".
pub async fn until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T, Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(observation) => {
                if start.elapsed() >= limit {
                    return Err(Timeout {
                        what: what.to_owned(),
                        waited: start.elapsed(),
                        last: observation,
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
