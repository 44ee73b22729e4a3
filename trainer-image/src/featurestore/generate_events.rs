//! `generate-events`: synthetic feature events and labels for demos and benchmarks.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
use flywheel_features::online::now_micros;
use flywheel_features::table::write_parquet;
use flywheel_features::view::Micros;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use super::{format_time, micros_of, parse_time};

#[derive(clap::Args)]
pub struct GenerateEventsArgs {
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    #[arg(long, default_value_t = 5_000)]
    users: i64,
    #[arg(long, default_value_t = 50_000)]
    labels: usize,
    /// Span of event times, ending at `--end`.
    #[arg(long, default_value = "1d")]
    span: String,
    /// The newest event time (RFC 3339; default: now).
    #[arg(long)]
    end: Option<String>,
    /// Added to every price: a drifted distribution.
    #[arg(long, default_value_t = 0.0)]
    price_shift: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Writes `events.parquet` and `labels.parquet` here.
    #[arg(long)]
    out: PathBuf,
}

pub fn generate_events(args: &GenerateEventsArgs) -> anyhow::Result<()> {
    let end = match &args.end {
        Some(text) => parse_time(text, "--end")?,
        None => now_micros(),
    };
    let span = micros_of(&args.span, "--span")?;
    if args.users < 1 {
        bail!("--users must be at least 1");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let categories = ["books", "games", "music", "sports", "travel"];
    let mut rows: Vec<(i64, Micros, f64, i64, &str)> = (0..args.events)
        .map(|_| {
            let user = rng.random_range(0..args.users);
            let time = end - rng.random_range(0..=span);
            // Users differ in what they spend; prices are log-normal around that.
            let level = 1.0 + (user % 17) as f64;
            let price = level * (rng.random::<f64>() * 2.0).exp() + args.price_shift;
            let clicks = rng.random_range(0..4);
            let category = categories[(user as usize + rng.random_range(0..2)) % categories.len()];
            (user, time, price, clicks, category)
        })
        .collect();
    rows.sort_by_key(|r| r.1);
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let timestamps = |times: Vec<Micros>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC"))
    };
    write_parquet(
        &args.out.join("events.parquet"),
        vec![
            (
                "user_id".into(),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
            ),
            (
                "event_timestamp".into(),
                timestamps(rows.iter().map(|r| r.1).collect()),
            ),
            (
                "price".into(),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ),
            (
                "clicks".into(),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.3))),
            ),
            (
                "category".into(),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.4))),
            ),
        ],
    )?;
    let mut labels: Vec<(i64, Micros, i64)> = (0..args.labels)
        .map(|_| {
            (
                rng.random_range(0..args.users),
                end - rng.random_range(0..=span),
                rng.random_range(0..2),
            )
        })
        .collect();
    labels.sort_by_key(|l| l.1);
    write_parquet(
        &args.out.join("labels.parquet"),
        vec![
            (
                "user_id".into(),
                Arc::new(Int64Array::from_iter_values(labels.iter().map(|l| l.0))) as ArrayRef,
            ),
            (
                "event_timestamp".into(),
                timestamps(labels.iter().map(|l| l.1).collect()),
            ),
            (
                "label".into(),
                Arc::new(Int64Array::from_iter_values(labels.iter().map(|l| l.2))),
            ),
        ],
    )?;
    println!(
        "{}",
        json!({"event": "generated", "events": rows.len(), "labels": labels.len(), "out": args.out,
               "from": format_time(end - span), "to": format_time(end)})
    );
    Ok(())
}
