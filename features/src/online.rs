//! The online store layout in Redis, shared by batch materialization and streaming ingestion:
//!
//! - an entity's features are the hash `<prefix><entity key>`: one field per feature holding its value as text
//!   (null values are absent fields), which is what `flywheel-serving` reads, plus [`AS_OF_FIELD`], the time the
//!   values hold at;
//! - the hash expires at its newest event's time plus the view's TTL, so stale values read as missing;
//! - a write replaces the hash only if it is as new as the stored one ([`WRITE_SCRIPT`], atomic in Redis, many
//!   hashes per call), so re-running a materialization or replaying a stream rewrites the same values, and an
//!   older batch never overwrites newer streamed values;
//! - streaming keeps each entity's recent events in the sorted set `<hash key>#events` (score: event time,
//!   member: the event), which makes replays idempotent: a replayed event is the same member.

use crate::value::{EntityKey, FeatureValue};
use crate::view::{Micros, View};

/// Hash field holding the time (µs since the epoch) the entity's values hold at.
pub const AS_OF_FIELD: &str = "_as_of_us";

/// Entities per script call: large enough that the call's overhead vanishes, small enough not to stall Redis.
pub const WRITE_BATCH: usize = 256;

/// KEYS: the hashes; ARGV[1] the as-of field's name, then per hash: its as-of time, expiry (ms since the epoch),
/// the number of fields n and n field/value pairs. A hash is replaced only when its stored values are not
/// newer. Returns how many hashes were written. When none of the hashes exists yet (a view's first run, a
/// backfill, new entities), one EXISTS over them all stands for the per-hash reads.
pub const WRITE_SCRIPT: &str = r"
local written = 0
local at = 2
local fresh = redis.call('EXISTS', unpack(KEYS)) == 0
for _, key in ipairs(KEYS) do
  local as_of, expire_at, fields = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  local stored = (not fresh) and redis.call('HGET', key, ARGV[1])
  if not (stored and tonumber(stored) > tonumber(as_of)) then
    if stored then redis.call('DEL', key) end
    redis.call('HSET', key, ARGV[1], as_of, unpack(ARGV, at + 3, at + 2 + 2 * fields))
    redis.call('PEXPIREAT', key, expire_at)
    written = written + 1
  end
  at = at + 3 + 2 * fields
end
return written
";

/// One entity's values, ready to write.
#[derive(Clone, Debug, PartialEq)]
pub struct OnlineRow {
    pub key: String,
    pub as_of: Micros,
    /// Milliseconds since the epoch after which the values are stale.
    pub expire_at_ms: i64,
    pub fields: Vec<(String, String)>,
}

impl View {
    /// The Redis key of an entity's hash.
    pub fn online_key(&self, entity: &EntityKey) -> String {
        format!("{}{entity}", self.key_prefix)
    }

    /// The sorted set of an entity's recent events (streaming ingestion).
    pub fn events_key(&self, entity: &EntityKey) -> String {
        format!("{}{entity}#events", self.key_prefix)
    }

    /// The row to write for `entity`, whose `values` (in feature order) hold at `as_of` and whose newest event
    /// is at `newest_event`.
    pub fn online_row(
        &self,
        entity: &EntityKey,
        as_of: Micros,
        newest_event: Micros,
        values: &[FeatureValue],
    ) -> OnlineRow {
        let fields = self
            .features
            .iter()
            .zip(values)
            .filter_map(|(feature, value)| Some((feature.name.clone(), value.to_text()?)))
            .collect();
        OnlineRow {
            key: self.online_key(entity),
            as_of,
            expire_at_ms: expiry_ms(newest_event, self.ttl),
            fields,
        }
    }
}

/// The first millisecond after `newest_event + ttl`: the values are valid through that instant.
pub fn expiry_ms(newest_event: Micros, ttl: Micros) -> i64 {
    newest_event.saturating_add(ttl).div_euclid(1_000) + 1
}

/// Whether a row whose newest event is at `newest_event` is already stale at `now`.
pub fn is_expired(newest_event: Micros, ttl: Micros, now: Micros) -> bool {
    now - newest_event > ttl
}

/// Appends the conditional writes of `rows` to `pipeline`, [`WRITE_BATCH`] rows per script call; each call
/// answers how many of its rows were written (the others' stored values are newer).
pub fn add_writes(pipeline: &mut redis::Pipeline, rows: &[OnlineRow]) {
    for batch in rows.chunks(WRITE_BATCH) {
        let command = pipeline.cmd("EVAL").arg(WRITE_SCRIPT).arg(batch.len());
        for row in batch {
            command.arg(&row.key);
        }
        command.arg(AS_OF_FIELD);
        for row in batch {
            command
                .arg(row.as_of)
                .arg(row.expire_at_ms)
                .arg(row.fields.len());
            for (field, value) in &row.fields {
                command.arg(field).arg(value);
            }
        }
    }
}

/// The URL of a Redis server at `address` (`host:port`).
pub fn redis_url(address: &str, password: Option<&str>, database: u8) -> String {
    match password {
        Some(password) => format!("redis://:{password}@{address}/{database}"),
        None => format!("redis://{address}/{database}"),
    }
}

/// Now, in microseconds since the epoch.
pub fn now_micros() -> Micros {
    jiff::Timestamp::now().as_microsecond()
}
