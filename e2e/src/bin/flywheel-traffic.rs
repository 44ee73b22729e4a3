//! Labeled inference traffic for the demo: replays the eval impressions of `flywheel-trainer generate` (the same
//! seed and sizes regenerate the same rows) against a model endpoint (the Rollout's router) as single-row
//! Open Inference Protocol requests, each keyed by its user in the sticky header, and feeds back a click drawn
//! from the impression's true probability (`POST /v1/feedback`, same key, so the label reaches the version
//! that scored it). Prints, every few seconds, how many requests each model version answered.
//!
//! Usage: `flywheel-traffic --url http://ADDRESS:8080 --model NAME [--seed 42] [--rows 100000] [--users 2000]
//! [--items 400] [--eval-fraction 0.2] [--rate PER_SECOND] [--concurrency 8] [--duration SECONDS]
//! [--sticky-header x-user-id] [--report-every SECONDS] [--feedback-token-file FILE]
//! [--kafka-brokers HOST:PORT --clicks-topic TOPIC]`
//!
//! The feedback token is the Rollout's (`kubectl get secret <rollout>-credentials`, key `feedback-token`):
//! serving pods refuse labels without it. With `--clicks-topic` the clicks go to that Kafka topic instead, as
//! an application's click stream would (the Rollout's `spec.feedback.clicksTopic`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use flywheel_e2e::serving::rest_body;
use flywheel_ml::synthetic::{Impression, SyntheticConfig, generate};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

struct Options {
    url: String,
    model: String,
    seed: u64,
    rows: usize,
    users: u32,
    items: u32,
    eval_fraction: f64,
    rate: Option<f64>,
    concurrency: usize,
    duration: Option<Duration>,
    sticky_header: String,
    report_every: Duration,
    /// `Authorization` of feedback calls.
    feedback_authorization: Option<String>,
    kafka_brokers: Option<String>,
    clicks_topic: Option<String>,
}

fn parse_options(args: impl IntoIterator<Item = String>) -> anyhow::Result<Options> {
    let mut options = Options {
        url: String::new(),
        model: String::new(),
        seed: 42,
        rows: 100_000,
        users: 2_000,
        items: 400,
        eval_fraction: 0.2,
        rate: None,
        concurrency: 8,
        duration: None,
        sticky_header: "x-user-id".to_owned(),
        report_every: Duration::from_secs(5),
        feedback_authorization: None,
        kafka_brokers: None,
        clicks_topic: None,
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = |what: &str| -> anyhow::Result<f64> {
            value
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n > 0.0)
                .with_context(|| format!("{what} must be a positive number, not {value:?}"))
        };
        match flag.as_str() {
            "--url" => options.url = value.trim_end_matches('/').to_owned(),
            "--model" => options.model = value.clone(),
            "--seed" => options.seed = number("--seed")? as u64,
            "--rows" => options.rows = number("--rows")? as usize,
            "--users" => options.users = number("--users")? as u32,
            "--items" => options.items = number("--items")? as u32,
            "--eval-fraction" => options.eval_fraction = number("--eval-fraction")?,
            "--rate" => options.rate = Some(number("--rate")?),
            "--concurrency" => options.concurrency = number("--concurrency")? as usize,
            "--duration" => options.duration = Some(Duration::from_secs_f64(number("--duration")?)),
            "--sticky-header" => options.sticky_header = value.clone(),
            "--feedback-token-file" => {
                let token = std::fs::read_to_string(&value)
                    .with_context(|| format!("--feedback-token-file {value}"))?;
                options.feedback_authorization = Some(format!("Bearer {}", token.trim()));
            }
            "--kafka-brokers" => options.kafka_brokers = Some(value.clone()),
            "--clicks-topic" => options.clicks_topic = Some(value.clone()),
            "--report-every" => {
                options.report_every = Duration::from_secs_f64(number("--report-every")?)
            }
            other => bail!("unknown option {other}"),
        }
    }
    if options.url.is_empty() || options.model.is_empty() {
        bail!("--url and --model are required");
    }
    if options.kafka_brokers.is_some() != options.clicks_topic.is_some() {
        bail!("--kafka-brokers and --clicks-topic go together");
    }
    if options.eval_fraction >= 1.0 {
        bail!("--eval-fraction must be below 1");
    }
    Ok(options)
}

/// Answers per model version, and failures.
#[derive(Default)]
struct Tally {
    served: Mutex<BTreeMap<String, u64>>,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Tally {
    fn served(&self, version: &str) {
        let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        *served.entry(version.to_owned()).or_default() += 1;
    }

    fn failed(&self, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error);
    }

    /// One line for the interval since the last one (counts are reset).
    fn report(&self, elapsed: Duration) -> String {
        let served =
            std::mem::take(&mut *self.served.lock().unwrap_or_else(PoisonError::into_inner));
        let total: u64 = served.values().sum();
        let shares: Vec<String> = served
            .iter()
            .map(|(version, n)| {
                format!("{version} {:.1}%", 100.0 * *n as f64 / total.max(1) as f64)
            })
            .collect();
        let failed = self.failed.swap(0, Ordering::Relaxed);
        let mut line = format!(
            "t={:.0}s answered={total} [{}] failed={failed}",
            elapsed.as_secs_f64(),
            shares.join(", ")
        );
        if failed > 0
            && let Some(error) = self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        {
            line.push_str(&format!(" (last: {error})"));
        }
        line
    }
}

struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
    /// Clicks go to Kafka when set; to `/v1/feedback` otherwise.
    clicks: Option<(FutureProducer, String)>,
    options: Options,
}

impl Sender {
    async fn post(
        &self,
        path: &str,
        body: &Value,
        key: &str,
        authorization: Option<&str>,
    ) -> Result<Value, String> {
        let mut request = http::Request::post(format!("{}{path}", self.options.url))
            .header("content-type", "application/json")
            .header(self.options.sticky_header.as_str(), key);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|err| err.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| format!("{path}: {err}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("{path}: {err}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|err| format!("{path}: {err}"))
    }

    /// Scores one impression and feeds its click back; the version that answered.
    async fn impression(
        &self,
        id: &str,
        impression: &Impression,
        clicked: bool,
    ) -> Result<String, String> {
        let key = impression.user_id.to_string();
        let path = format!("/v2/models/{}/infer", self.options.model);
        let answer = self
            .post(
                &path,
                &rest_body(Some(id), std::slice::from_ref(impression)),
                &key,
                None,
            )
            .await?;
        let version = answer["model_version"].as_str().unwrap_or("?").to_owned();
        let click = json!({"requestId": id, "clicked": clicked});
        match &self.clicks {
            Some((producer, topic)) => {
                let payload = click.to_string();
                producer
                    .send(
                        FutureRecord::to(topic).payload(&payload).key(&key),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(error, _)| format!("{topic}: {error}"))?;
            }
            None => {
                self.post(
                    "/v1/feedback",
                    &click,
                    &key,
                    self.options.feedback_authorization.as_deref(),
                )
                .await?;
            }
        }
        Ok(version)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse_options(std::env::args().skip(1))?;
    let data = generate(&SyntheticConfig {
        seed: options.seed,
        users: options.users,
        items: options.items,
        rows: options.rows,
        ..SyntheticConfig::default()
    });
    let split = ((options.rows as f64) * (1.0 - options.eval_fraction)) as usize;
    let eval: Arc<Vec<Impression>> = Arc::new(data.impressions[split..].to_vec());
    if eval.is_empty() {
        bail!(
            "no eval rows for --rows {} --eval-fraction {}",
            options.rows,
            options.eval_fraction
        );
    }
    println!(
        "replaying {} labeled eval impressions (click rate {:.3}) against {} with {} callers",
        eval.len(),
        data.click_rate,
        options.url,
        options.concurrency
    );
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let concurrency = options.concurrency.max(1);
    let (rate, duration, report_every) = (options.rate, options.duration, options.report_every);
    let clicks = match (&options.kafka_brokers, &options.clicks_topic) {
        (Some(brokers), Some(topic)) => Some((
            ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create::<FutureProducer>()
                .context("the Kafka producer")?,
            topic.clone(),
        )),
        _ => None,
    };
    let sender = Arc::new(Sender {
        client: Client::builder(TokioExecutor::new()).build(connector),
        clicks,
        options,
    });
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let seed = sender.options.seed;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (sender, tally, next, eval) =
                (sender.clone(), tally.clone(), next.clone(), eval.clone());
            let mut draws = ChaCha8Rng::seed_from_u64(seed.wrapping_add(worker as u64));
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if let Some(rate) = rate {
                        let due = started + Duration::from_secs_f64(n as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    if duration.is_some_and(|d| started.elapsed() >= d) {
                        return;
                    }
                    let impression = &eval[n % eval.len()];
                    // A fresh draw from the impression's true probability: a replayed impression is a new
                    // visit, so a model trained on the logged traffic cannot learn the replay's labels by heart.
                    let clicked = draws.random::<f64>() < impression.true_probability;
                    match sender
                        .impression(&format!("r{n}"), impression, clicked)
                        .await
                    {
                        Ok(version) => tally.served(&version),
                        Err(error) => {
                            tally.failed(error);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })
        .collect();
    let reporter = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(report_every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                println!("{}", tally.report(started.elapsed()));
            }
        })
    };
    futures::future::join_all(workers).await;
    reporter.abort();
    println!("{}", tally.report(started.elapsed()));
    Ok(())
}
