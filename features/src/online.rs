//! The online store layout in Redis, shared by batch materialization and streaming ingestion:
//!
//! - an entity's features are the hash `<prefix><entity key>`: one field per feature holding its value as text
//!   (null values are absent fields), which is what `flywheel-serving` reads, plus [`AS_OF_FIELD`], the time the
//!   values hold at;
//! - the hash expires at its newest event's time plus the view's TTL, so stale values read as missing;
//! - a write replaces the hash only if it is as new as the stored one ([`WRITE_SCRIPT`], atomic in Redis, many
//!   hashes per call), so re-running a materialization or replaying a stream rewrites the same values, and an
//!   older batch never overwrites newer streamed values;
//! - a hash that does not exist yet can instead be created by `RESTORE` of its [`hash_dump`] with its expiry:
//!   one plain command, which Redis refuses (`BUSYKEY`) when the key exists, so it never replaces newer values
//!   and costs Redis a fifth of the script's work per hash;
//! - streaming keeps each entity's recent events in the sorted set `<hash key>#events` (score: event time,
//!   member: the event), which makes replays idempotent: a replayed event is the same member.

use flywheel_auth::store_clients::ClientTls;

use crate::value::{EntityKey, FeatureValue};
use crate::view::{Micros, View};

/// Hash field holding the time (µs since the epoch) the entity's values hold at.
pub const AS_OF_FIELD: &str = "_as_of_us";

/// Entities per script call: large enough that the call's overhead vanishes, small enough not to stall Redis.
pub const WRITE_BATCH: usize = 256;

/// KEYS: the hashes; `ARGV[1]` the as-of field's name, then per hash: its as-of time, expiry (ms since the epoch),
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

/// The RDB version [`hash_dump`] declares: 10, the first with hashes stored as listpacks (Redis 7.0, Valkey 7.2).
/// Servers restore payloads of their own version or older; an older server refuses the dump, and the writer
/// falls back to the conditional script.
const DUMP_RDB_VERSION: u16 = 10;
/// RDB's type tag of a hash stored as a listpack, Redis's own encoding of small hashes: restoring one is a copy,
/// where a hash sent as a list of strings is rebuilt entry by entry (about 4× Redis's time per hash).
const RDB_TYPE_HASH_LISTPACK: u8 = 16;
/// The checksum closing a dump: Redis's CRC-64 (Jones polynomial, reflected) of everything before it, 16 bytes
/// per step.
const DUMP_CHECKSUM: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_REDIS);
/// A listpack's header: its total size (u32) and entry count (u16); then the entries and [`LISTPACK_END`].
const LISTPACK_HEADER: usize = 6;
const LISTPACK_END: u8 = 0xFF;
/// The entry count a listpack's header holds when it does not know (too many to count in 16 bits).
const LISTPACK_UNKNOWN_COUNT: u16 = u16::MAX;

/// The `DUMP` payload of the hash holding `row` (its as-of time and fields), as `RESTORE` takes it: the hash as
/// a listpack of field, value, field, value…, the RDB version, and the checksum.
pub fn hash_dump(row: &OnlineRow) -> Vec<u8> {
    let as_of = row.as_of.to_string();
    let entries: Vec<&[u8]> = [AS_OF_FIELD.as_bytes(), as_of.as_bytes()]
        .into_iter()
        .chain(
            row.fields
                .iter()
                .flat_map(|(field, value)| [field.as_bytes(), value.as_bytes()]),
        )
        .collect();
    let listpack_size = LISTPACK_HEADER
        + entries
            .iter()
            .map(|e| listpack_entry_size(e.len()))
            .sum::<usize>()
        + 1;
    let mut dump = Vec::with_capacity(listpack_size + 16);
    dump.push(RDB_TYPE_HASH_LISTPACK);
    push_rdb_length(&mut dump, listpack_size);
    let total = u32::try_from(listpack_size).unwrap_or(u32::MAX);
    dump.extend_from_slice(&total.to_le_bytes());
    let count = u16::try_from(entries.len())
        .ok()
        .filter(|&n| n < LISTPACK_UNKNOWN_COUNT)
        .unwrap_or(LISTPACK_UNKNOWN_COUNT);
    dump.extend_from_slice(&count.to_le_bytes());
    for entry in entries {
        push_listpack_string(&mut dump, entry);
    }
    dump.push(LISTPACK_END);
    dump.extend_from_slice(&DUMP_RDB_VERSION.to_le_bytes());
    let checksum = DUMP_CHECKSUM.checksum(&dump);
    dump.extend_from_slice(&checksum.to_le_bytes());
    dump
}

/// The bytes a string of `length` bytes takes in a listpack: its encoding, itself, and its back-length.
fn listpack_entry_size(length: usize) -> usize {
    let encoded = listpack_string_header(length) + length;
    encoded + listpack_back_length(encoded, &mut Vec::new())
}

fn listpack_string_header(length: usize) -> usize {
    match length {
        0..64 => 1,
        64..4096 => 2,
        _ => 5,
    }
}

/// A listpack string entry: a 6-, 12- or 32-bit length with its tag, the bytes, then the entry's own size
/// written so that it reads backwards (for walking the list from its end).
fn push_listpack_string(out: &mut Vec<u8>, entry: &[u8]) {
    let length = entry.len();
    match length {
        0..64 => out.push(0x80 | length as u8),
        64..4096 => out.extend_from_slice(&[0xE0 | (length >> 8) as u8, length as u8]),
        _ => {
            out.push(0xF0);
            out.extend_from_slice(&(length as u32).to_le_bytes());
        }
    }
    out.extend_from_slice(entry);
    listpack_back_length(listpack_string_header(length) + length, out);
}

/// Appends `size` as a listpack back-length (7 bits per byte, most significant first, every byte but the first
/// flagged) and returns how many bytes that took. The widths switch where Redis's `lpEncodeBacklen` switches
/// them (one below each power of 128), which its integrity check walks by.
fn listpack_back_length(size: usize, out: &mut Vec<u8>) -> usize {
    let bytes = match size {
        0..=127 => 1,
        128..16_383 => 2,
        16_383..2_097_151 => 3,
        2_097_151..268_435_455 => 4,
        _ => 5,
    };
    for index in (0..bytes).rev() {
        let group = ((size >> (7 * index)) & 0x7F) as u8;
        out.push(if index == bytes - 1 {
            group
        } else {
            group | 0x80
        });
    }
    bytes
}

/// RDB's variable-length integer: 6 bits in one byte, 14 bits in two, else a marker and 32 or 64 big-endian bits.
fn push_rdb_length(out: &mut Vec<u8>, length: usize) {
    match u32::try_from(length) {
        Ok(short) if short < 1 << 6 => out.push(short as u8),
        Ok(medium) if medium < 1 << 14 => {
            out.extend_from_slice(&[0x40 | (medium >> 8) as u8, medium as u8])
        }
        Ok(long) => {
            out.push(0x80);
            out.extend_from_slice(&long.to_be_bytes());
        }
        Err(_) => {
            out.push(0x81);
            out.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
}

/// Appends a `RESTORE` creating each of `rows`' hashes with its expiry, unless the key exists (`BUSYKEY`):
/// one reply per row, in order.
pub fn add_creates(pipeline: &mut redis::Pipeline, rows: &[OnlineRow]) {
    for row in rows {
        pipeline
            .cmd("RESTORE")
            .arg(&row.key)
            .arg(row.expire_at_ms)
            .arg(hash_dump(row))
            .arg("ABSTTL");
    }
}

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
    now.saturating_sub(newest_event) > ttl
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

/// A client of the Redis server at `url` (`redis://host:port/db`). The password is set on the connection, never
/// spliced into the URL, so no character of it can change the host; with `tls` the connection is `rediss://`,
/// verified against the given CA or the system's roots.
pub fn redis_client(
    url: &str,
    password: Option<&str>,
    tls: Option<&ClientTls>,
) -> Result<redis::Client, redis::RedisError> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    let Some(tls) = tls else {
        return redis::Client::open(info);
    };
    if let redis::ConnectionAddr::Tcp(host, port) = info.addr().clone() {
        info = info.set_addr(redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        });
    }
    match &tls.ca_pem {
        Some(ca) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            },
        ),
        None => redis::Client::open(info),
    }
}

/// The URL of a Redis server at `address` (`host:port`).
pub fn redis_url(address: &str, database: u8) -> String {
    format!("redis://{address}/{database}")
}

/// Now, in microseconds since the epoch.
pub fn now_micros() -> Micros {
    jiff::Timestamp::now().as_microsecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn length(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        push_rdb_length(&mut out, n);
        out
    }

    #[test]
    fn a_password_with_url_characters_stays_the_password() {
        let url = redis_url("redis.cache:6379", 2);
        assert_eq!(url, "redis://redis.cache:6379/2");
        let client =
            redis_client(&url, Some("p@ss:w/rd#1% é"), None).unwrap_or_else(|e| panic!("{e}"));
        let info = client.get_connection_info();
        assert_eq!(info.redis_settings().password(), Some("p@ss:w/rd#1% é"));
        assert_eq!(
            info.addr(),
            &redis::ConnectionAddr::Tcp("redis.cache".into(), 6379)
        );
    }

    #[test]
    fn tls_makes_the_connection_rediss_to_the_same_host() {
        let tls = ClientTls { ca_pem: None };
        let client =
            redis_client("redis://r:6380/0", None, Some(&tls)).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { host, port: 6380, insecure: false, .. } if host == "r"
        ));
    }

    #[test]
    fn rdb_lengths_take_the_shortest_form_at_each_boundary() {
        assert_eq!(length(0), [0]);
        assert_eq!(length(63), [63]);
        assert_eq!(length(64), [0x40, 64]);
        assert_eq!(length(16_383), [0x7f, 0xff]);
        assert_eq!(length(16_384), [0x80, 0, 0, 0x40, 0]);
    }

    #[test]
    fn the_dump_checksum_is_redis_crc64() {
        // The check value Redis's own crc64 test asserts.
        assert_eq!(DUMP_CHECKSUM.checksum(b"123456789"), 0xe9c6d914c4b8d9ca);
    }

    #[test]
    fn a_hash_dump_is_a_listpack_of_the_as_of_time_then_the_fields() {
        let row = OnlineRow {
            key: "user:7".into(),
            as_of: 42,
            expire_at_ms: 1,
            fields: vec![("price".into(), "1.5".into())],
        };
        let dump = hash_dump(&row);
        // Type, the listpack's RDB length (34 bytes), its header (34 bytes, 4 entries), each entry as its
        // 6-bit-length tag, its bytes and its size, the end mark, then RDB version 10.
        let mut expected = vec![RDB_TYPE_HASH_LISTPACK, 34, 34, 0, 0, 0, 4, 0, 0x80 | 9];
        expected.extend_from_slice(b"_as_of_us");
        expected.extend_from_slice(&[10, 0x82, b'4', b'2', 3, 0x85]);
        expected.extend_from_slice(b"price");
        expected.extend_from_slice(&[6, 0x83, b'1', b'.', b'5', 4, LISTPACK_END, 10, 0]);
        let (body, checksum) = dump.split_at(dump.len() - 8);
        assert_eq!(body, expected.as_slice());
        assert_eq!(checksum, DUMP_CHECKSUM.checksum(body).to_le_bytes());
    }

    #[test]
    fn listpack_entries_switch_widths_where_redis_does() {
        let back_length = |size| {
            let mut out = Vec::new();
            listpack_back_length(size, &mut out);
            out
        };
        assert_eq!(back_length(127), [127]);
        assert_eq!(back_length(128), [1, 0x80]);
        assert_eq!(back_length(16_382), [127, 0xFE]);
        assert_eq!(back_length(16_383), [0, 0xFF, 0xFF]);
        for length in [0, 63, 64, 4_095, 4_096, 16_380] {
            let mut out = Vec::new();
            push_listpack_string(&mut out, &vec![b'x'; length]);
            assert_eq!(out.len(), listpack_entry_size(length), "length {length}");
        }
        let mut twelve_bit = Vec::new();
        push_listpack_string(&mut twelve_bit, &[b'x'; 300]);
        assert_eq!(twelve_bit[..2], [0xE0 | 1, 44]);
        let mut wide = Vec::new();
        push_listpack_string(&mut wide, &[b'x'; 5_000]);
        assert_eq!(wide[..5], [0xF0, 0x88, 0x13, 0, 0]);
    }
}
