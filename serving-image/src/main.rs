//! `flywheel-serving`: the online data plane a Rollout's pods run. `serve` answers the Open Inference Protocol
//! (REST and gRPC) for one model version; `route` splits traffic between versions' servers.

use flywheel_crds::common::parse_duration;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flywheel_auth::store_clients::{KafkaClientArgs, RedisClientArgs};
use tokio::net::TcpListener;

use flywheel_serving::model::ModelSource;
use flywheel_serving::server::{FeedbackSettings, Limits, Server};
use flywheel_serving::{admin, batcher, grpc, ingest, kafka, metrics, online, proxy, rest};

#[derive(Parser)]
#[command(name = "flywheel-serving", version, about)]
struct Cli {
    /// Tokio worker threads (default: one per core).
    #[arg(long, env = "FLYWHEEL_RUNTIME_THREADS", global = true)]
    runtime_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one model version over the Open Inference Protocol (REST and gRPC).
    Serve(Box<ServeArgs>),
    /// Route inference traffic between model-version servers by exact, sticky weights.
    Route(RouteArgs),
    /// Stream a FeatureView's Kafka topic into its online store (windowed aggregations, at least once,
    /// idempotent; malformed events to a dead-letter topic).
    Ingest(Box<IngestArgs>),
}

#[derive(clap::Args)]
struct IngestArgs {
    /// The FeatureView as JSON (the operator passes it so).
    #[arg(long, env = "FLYWHEEL_FEATURE_VIEW", hide_env_values = true)]
    view_json: Option<String>,
    /// The FeatureView manifest (JSON or YAML).
    #[arg(long, conflicts_with = "view_json")]
    view: Option<PathBuf>,
    /// Kafka bootstrap servers (default: the view's `source.stream.brokers`).
    #[arg(long, env = "FLYWHEEL_KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Topic (default: the view's `source.stream.topic`).
    #[arg(long)]
    topic: Option<String>,
    /// Consumer group (default: `flywheel-ingest.<namespace>.<name>`).
    #[arg(long, env = "FLYWHEEL_CONSUMER_GROUP")]
    group: Option<String>,
    /// Dead-letter topic (default: `<topic>.dlq`).
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// Redis `host:port` (default: the view's online store).
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, env = "FLYWHEEL_REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    #[command(flatten)]
    redis_client: RedisClientArgs,
    #[command(flatten)]
    kafka_client: KafkaClientArgs,
    #[arg(long, default_value = "event_id")]
    event_id_field: String,
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    batch_wait: Duration,
    /// Metrics (`/metrics`) and health (`/healthz`).
    #[arg(long, env = "FLYWHEEL_ADMIN_LISTEN", default_value = "0.0.0.0:8082")]
    admin_listen: SocketAddr,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The model (endpoint) name clients call: `/v2/models/<name>/infer`.
    #[arg(long, env = "FLYWHEEL_MODEL_NAME")]
    model_name: String,
    /// ModelVersion served at start (with --model-uri).
    #[arg(long, env = "FLYWHEEL_MODEL_VERSION")]
    model_version: Option<String>,
    /// Artifact path.
    #[arg(long, env = "FLYWHEEL_MODEL_URI")]
    model_uri: Option<PathBuf>,
    /// Expected artifact SHA-256 (default: the `.sha256` file beside the artifact).
    #[arg(long, env = "FLYWHEEL_MODEL_SHA256")]
    model_sha256: Option<String>,
    /// Expected feature schema hash.
    #[arg(long, env = "FLYWHEEL_FEATURE_SCHEMA_HASH")]
    feature_schema_hash: Option<String>,
    /// A JSON model source (`version`, `uri`, `sha256`, `featureSchemaHash`), watched: a change hot-swaps.
    #[arg(long, env = "FLYWHEEL_MODEL_CONFIG")]
    model_config: Option<PathBuf>,
    #[arg(long, env = "FLYWHEEL_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    #[arg(long, env = "FLYWHEEL_GRPC_LISTEN", default_value = "0.0.0.0:8081")]
    grpc_listen: SocketAddr,
    /// Metrics and admin endpoints (never on the inference ports).
    #[arg(long, env = "FLYWHEEL_ADMIN_LISTEN", default_value = "0.0.0.0:8082")]
    admin_listen: SocketAddr,
    /// Threads that score micro-batches.
    #[arg(long, env = "FLYWHEEL_SCORER_THREADS", default_value_t = 1)]
    scorer_threads: usize,
    /// Rows one request may carry.
    #[arg(long, default_value_t = 1024)]
    max_request_rows: usize,
    /// Rows merged into one micro-batch.
    #[arg(long, default_value_t = 2048)]
    max_batch_rows: usize,
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// How long after a prediction a click still counts; unclicked predictions become negatives after it.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    attribution_window: Duration,
    /// Predictions remembered for feedback at most (the oldest are forgotten first).
    #[arg(long, default_value_t = 1_000_000)]
    pending_capacity: usize,
    /// Span of the online AUC and calibration window.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    quality_window: Duration,
    #[arg(long, default_value_t = 200_000)]
    quality_samples: usize,
    /// Kafka bootstrap servers for the prediction log and the click topic.
    #[arg(long, env = "FLYWHEEL_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    #[command(flatten)]
    kafka_client: KafkaClientArgs,
    #[arg(long, env = "FLYWHEEL_PREDICTION_LOG_TOPIC")]
    prediction_log_topic: Option<String>,
    /// Records the prediction log buffers before dropping (never blocking a request).
    #[arg(long, default_value_t = 100_000)]
    prediction_log_capacity: usize,
    #[arg(long, env = "FLYWHEEL_CLICKS_TOPIC")]
    clicks_topic: Option<String>,
    /// Consumer group of the click topic (default: one per pod, as each replica joins its own predictions).
    #[arg(long, env = "FLYWHEEL_CLICKS_GROUP")]
    clicks_group: Option<String>,
    #[arg(long, default_value = "latest")]
    clicks_offset_reset: String,
    /// Online store (Redis URL) to fill entity features a request does not carry.
    #[arg(long, env = "FLYWHEEL_ONLINE_STORE")]
    online_store: Option<String>,
    /// The online store's password (from the view's Secret), kept out of the URL.
    #[arg(long, env = "FLYWHEEL_REDIS_PASSWORD", hide_env_values = true)]
    online_store_password: Option<String>,
    #[command(flatten)]
    online_store_client: RedisClientArgs,
    /// The request input whose value is the entity key.
    #[arg(long, env = "FLYWHEEL_ONLINE_ENTITY", default_value = "user_id")]
    online_entity: String,
    /// Features read from the online store, comma-separated.
    #[arg(long, env = "FLYWHEEL_ONLINE_FEATURES", value_delimiter = ',')]
    online_features: Vec<String>,
    /// Key of an entity's hash: this prefix and the entity value.
    #[arg(long, env = "FLYWHEEL_ONLINE_KEY_PREFIX", default_value = "")]
    online_key_prefix: String,
    /// A lookup slower than this fails the request (UNAVAILABLE).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    online_timeout: Duration,
    /// The token `/admin` calls must carry; without it the admin endpoints only read.
    #[arg(long, env = "FLYWHEEL_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Let `PUT /admin/model` swap the served model (admin token required).
    #[arg(long, requires = "admin_token_file")]
    allow_model_swap: bool,
    /// The token feedback calls must carry; without it labels are taken from any caller.
    #[arg(long, env = "FLYWHEEL_FEEDBACK_TOKEN_FILE")]
    feedback_token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RouteArgs {
    /// Inference traffic, REST (HTTP/1.1) and gRPC (h2c) on one port.
    #[arg(long, env = "FLYWHEEL_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    #[arg(long, env = "FLYWHEEL_ADMIN_LISTEN", default_value = "0.0.0.0:8082")]
    admin_listen: SocketAddr,
    /// Route configuration (JSON: backends with weights, optional mirror), watched for changes.
    #[arg(long, env = "FLYWHEEL_ROUTES")]
    config: PathBuf,
    /// Request header whose value keeps a caller on one backend.
    #[arg(long, env = "FLYWHEEL_STICKY_HEADER", default_value = "x-user-id")]
    sticky_header: String,
    /// Largest body buffered for mirroring.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// The token `/admin` calls must carry; without it the route table can only be read.
    #[arg(long, env = "FLYWHEEL_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// The model (the Rollout) this router serves: the `model` label of its metrics.
    #[arg(long, env = "FLYWHEEL_MODEL_NAME")]
    model_name: Option<String>,
}

/// The token in `path`, when one is configured.
fn token_of(path: Option<&PathBuf>, flag: &str) -> anyhow::Result<Option<flywheel_auth::Token>> {
    path.map(|path| flywheel_auth::Token::from_file(path).with_context(|| format!("--{flag}")))
        .transpose()
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.runtime_threads {
        runtime.worker_threads(threads.max(1));
    }
    let result = runtime
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                match cli.command {
                    Command::Serve(args) => serve(*args).await,
                    Command::Route(args) => route(args).await,
                    Command::Ingest(args) => ingest(*args).await,
                }
            })
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("flywheel-serving: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let access = admin::AdminAccess {
        token: token_of(args.admin_token_file.as_ref(), "admin-token-file")?,
        model_swap: args.allow_model_swap,
    };
    let feedback_token = token_of(args.feedback_token_file.as_ref(), "feedback-token-file")?;
    let metrics = Arc::new(metrics::ServingMetrics::new(&args.model_name));
    let kafka = match &args.kafka_brokers {
        Some(brokers) => Some(kafka::KafkaConnection {
            brokers: brokers.clone(),
            security: args.kafka_client.settings()?,
        }),
        None => None,
    };
    let prediction_log = match (&kafka, &args.prediction_log_topic) {
        (Some(kafka), Some(topic)) => Some(
            kafka::PredictionLog::new(kafka, topic, args.prediction_log_capacity, metrics.clone())
                .context("prediction log producer")?,
        ),
        (None, Some(_)) => anyhow::bail!("--prediction-log-topic needs --kafka-brokers"),
        _ => None,
    };
    let online_store = match &args.online_store {
        Some(url) => Some(
            online::OnlineStore::connect(
                online::OnlineSettings {
                    url: url.clone(),
                    password: args.online_store_password.clone(),
                    tls: args.online_store_client.tls()?,
                    prefix: args.online_key_prefix.clone(),
                    entity: args.online_entity.clone(),
                    features: args.online_features.clone(),
                    timeout: args.online_timeout,
                },
                metrics.clone(),
            )
            .await
            .context("connecting to the online store")?,
        ),
        None => None,
    };
    let batcher = batcher::Batcher::start(args.scorer_threads, args.max_batch_rows)
        .context("starting scorer threads")?;
    let server = Arc::new(Server::new(
        args.model_name.clone(),
        Limits {
            max_rows: args.max_request_rows,
            max_body_bytes: args.max_body_bytes,
        },
        batcher,
        &FeedbackSettings {
            window: args.attribution_window,
            capacity: args.pending_capacity,
            quality_window: args.quality_window,
            quality_samples: args.quality_samples,
            token: feedback_token,
            forwarder: match (&kafka, &args.clicks_topic) {
                (Some(kafka), Some(topic)) => Some(
                    kafka::LabelForwarder::new(kafka, topic)
                        .context("the clicks topic producer")?,
                ),
                _ => None,
            },
        },
        metrics.clone(),
        prediction_log,
        online_store,
    ));

    // The initial model: from flags, or from the watched config file.
    let mut initial_config = None;
    if let Some(path) = &args.model_config {
        let contents = std::fs::read(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        load_config(&server, &contents).await;
        initial_config = Some(contents);
    } else if let (Some(version), Some(uri)) = (&args.model_version, &args.model_uri) {
        let source = ModelSource {
            version: version.clone(),
            uri: uri.clone(),
            sha256: args.model_sha256.clone(),
            feature_schema_hash: args.feature_schema_hash.clone(),
        };
        let loader = server.clone();
        let _ = tokio::task::spawn_blocking(move || loader.load(&source)).await;
    } else {
        anyhow::bail!("give --model-version and --model-uri, or --model-config");
    }

    let http = bind(args.http_listen).await?;
    let grpc = bind(args.grpc_listen).await?;
    let admin = bind(args.admin_listen).await?;
    tracing::info!(http = %args.http_listen, grpc = %args.grpc_listen, admin = %args.admin_listen, "serving");

    if let Some(path) = args.model_config.clone() {
        let watched = server.clone();
        tokio::spawn(admin::watch_file(path, initial_config, move |contents| {
            let server = watched.clone();
            let contents = contents.to_vec();
            tokio::spawn(async move { load_config(&server, &contents).await });
        }));
    }
    let refresher = server.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            refresher.refresh_quality();
        }
    });
    if let (Some(kafka), Some(topic)) = (kafka, args.clicks_topic.clone()) {
        let group = args.clicks_group.clone().unwrap_or_else(|| {
            format!(
                "flywheel-serving-{}-{}",
                args.model_name,
                std::env::var("HOSTNAME").unwrap_or_else(|_| std::process::id().to_string())
            )
        });
        let joiner = server.clone();
        let reset = args.clicks_offset_reset.clone();
        tokio::spawn(async move {
            let result = kafka::consume_clicks(
                &kafka,
                &topic,
                &group,
                &reset,
                joiner.metrics.clone(),
                |click| {
                    joiner.feedback("kafka", &click.request_id, click.clicked);
                },
            )
            .await;
            if let Err(error) = result {
                tracing::error!(%error, "click topic consumer stopped");
            }
        });
    }

    let rest = axum::serve(http, rest::router(server.clone()));
    let admin = axum::serve(admin, admin::server_router(server.clone(), access));
    let grpc = tonic::transport::Server::builder()
        .add_service(
            grpc::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
                grpc::InferenceService {
                    server: server.clone(),
                },
            )
            .max_decoding_message_size(args.max_body_bytes),
        )
        .add_service(grpc::feedback::feedback_server::FeedbackServer::new(
            grpc::FeedbackService {
                server: server.clone(),
            },
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            shutdown_signal(),
        );
    tokio::select! {
        result = rest.with_graceful_shutdown(shutdown_signal()) => result.context("REST server")?,
        result = admin => result.context("admin server")?,
        result = grpc => result.context("gRPC server")?,
    }
    Ok(())
}

async fn load_config(server: &Arc<Server>, contents: &[u8]) {
    match serde_json::from_slice::<ModelSource>(contents) {
        Ok(source) => {
            let loader = server.clone();
            let _ = tokio::task::spawn_blocking(move || loader.load(&source)).await;
        }
        Err(error) => {
            server.metrics.model_load("failed");
            tracing::error!(%error, "model config is not a model source; keeping the current model");
        }
    }
}

async fn route(args: RouteArgs) -> anyhow::Result<()> {
    let access = admin::AdminAccess {
        token: token_of(args.admin_token_file.as_ref(), "admin-token-file")?,
        model_swap: false,
    };
    let contents = std::fs::read(&args.config)
        .with_context(|| format!("reading route config {}", args.config.display()))?;
    let plan = admin::parse_routes(&contents)
        .map_err(|message| anyhow::anyhow!("{}: {message}", args.config.display()))?;
    let header = http::header::HeaderName::from_bytes(args.sticky_header.as_bytes())
        .with_context(|| format!("--sticky-header {}", args.sticky_header))?;
    tracing::info!(routes = %proxy::describe(&plan), "routing");
    let proxy = Arc::new(proxy::Proxy::new(
        plan,
        header,
        args.max_body_bytes,
        args.model_name.as_deref(),
    ));
    let listener = bind(args.listen).await?;
    let admin = bind(args.admin_listen).await?;
    let watched = proxy.clone();
    tokio::spawn(admin::watch_file(
        args.config.clone(),
        Some(contents),
        move |contents| match admin::parse_routes(contents) {
            Ok(plan) => {
                tracing::info!(routes = %proxy::describe(&plan), "routes reloaded");
                watched.set_plan(plan);
            }
            Err(error) => {
                watched.rejected_plan();
                tracing::error!(%error, "route config rejected; keeping the current routes");
            }
        },
    ));
    let admin = axum::serve(admin, admin::router_router(proxy.clone(), access));
    tokio::select! {
        result = proxy::serve(listener, proxy) => result.context("router")?,
        result = admin => result.context("admin server")?,
        () = shutdown_signal() => {}
    }
    Ok(())
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let text = match (&args.view_json, &args.view) {
        (Some(json), _) => json.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the FeatureView {}", path.display()))?,
        (None, None) => {
            anyhow::bail!("give the FeatureView with --view FILE or FLYWHEEL_FEATURE_VIEW")
        }
    };
    let manifest = flywheel_features::view::parse_manifest(&text)?;
    let namespace = manifest
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = manifest
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "features".into());
    let spec = &manifest.spec;
    let Some(stream) = &spec.source.stream else {
        anyhow::bail!("spec.source.stream: the view has no stream source to ingest");
    };
    let Some(online) = &spec.online else {
        anyhow::bail!("spec.online: the view has no online store to ingest into");
    };
    let view = flywheel_features::View::of_manifest(&manifest, &stream.timestamp_field)?;
    let topic = args.topic.clone().unwrap_or_else(|| stream.topic.clone());
    let settings = ingest::IngestSettings {
        kafka: kafka::KafkaConnection {
            brokers: args
                .brokers
                .clone()
                .unwrap_or_else(|| stream.brokers.join(",")),
            security: args.kafka_client.settings()?,
        },
        dead_letter_topic: args
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.dlq")),
        topic,
        group: args
            .group
            .clone()
            .unwrap_or_else(|| format!("flywheel-ingest.{namespace}.{name}")),
        event_id_field: args.event_id_field.clone(),
        batch_size: args.batch_size.max(1),
        batch_wait: args.batch_wait,
    };
    let address = args.redis.as_deref().unwrap_or(&online.redis.address);
    let url = flywheel_features::online::redis_url(address, online.redis.database);
    let connection = flywheel_features::online::redis_client(
        &url,
        args.redis_password.as_deref(),
        args.redis_client.tls()?.as_ref(),
    )
    .context("the online store address")?
    .get_connection_manager()
    .await
    .with_context(|| format!("connecting to the online store at {address}"))?;
    let metrics = Arc::new(ingest::IngestMetrics::new());
    let admin = bind(args.admin_listen).await?;
    tracing::info!(topic = settings.topic, group = settings.group, "ingesting");
    let pipeline = ingest::Ingest::connect(Arc::new(view), settings, connection, metrics.clone())
        .await
        .context("connecting to Kafka")?;
    tokio::select! {
        () = pipeline.run() => {}
        result = axum::serve(admin, admin::ingest_router(metrics)) => result.context("admin server")?,
        () = shutdown_signal() => {}
    }
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))
}
