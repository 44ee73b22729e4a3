//! Writes a materialization's latest values to the Redis online store (layout: `flywheel_features::online`).
//!
//! A hash that does not exist yet is created by `RESTORE` (one plain command, refused with `BUSYKEY` when the
//! key exists), which costs Redis a fifth of the work of the conditional write script. Keys that exist, and
//! every key once `RESTORE` is refused for another reason (an ACL without it, a managed Redis that renamed
//! it, a server too old for the dump's format) or most keys turn out to exist (an incremental run over a
//! populated store), go through the script, which keeps whichever values are newer. Several batches are in
//! flight, so Redis runs one while the next is prepared and sent.
//!
//! Whether the server runs `RESTORE` at all is asked once, with an empty payload (which restores nothing), before
//! any dump is sent: a server that does not know the command echoes its first arguments in the error, and a
//! dump's bytes there would make the answer unreadable.

use std::collections::VecDeque;

use anyhow::{Context, bail};
use flywheel_features::online::{OnlineRow, WRITE_BATCH, add_creates, add_writes};
use redis::Value;

/// Batches ([`WRITE_BATCH`] entities each) sent to Redis before the oldest one's answer is awaited.
const BATCHES_IN_FLIGHT: usize = 4;

/// A batch sent and not yet answered.
enum Sent {
    /// `RESTORE`s, one answer per row: the rows whose key exists are written conditionally later.
    Creates(Vec<OnlineRow>),
    /// One call of the conditional script, answering how many of its hashes it wrote.
    Conditional,
}

/// One materialization's writes over one connection.
pub struct OnlineWriter<'a> {
    connection: redis::Connection,
    address: &'a str,
    sent: VecDeque<Sent>,
    /// Whether new batches are sent as `RESTORE`s; unknown until the server is asked.
    creating: Option<bool>,
    /// Rows whose key existed, waiting for the conditional script.
    existing: Vec<OnlineRow>,
    written: i64,
}

impl<'a> OnlineWriter<'a> {
    pub fn new(connection: redis::Connection, address: &'a str) -> OnlineWriter<'a> {
        OnlineWriter {
            connection,
            address,
            sent: VecDeque::new(),
            creating: None,
            existing: Vec::new(),
            written: 0,
        }
    }

    /// Sends one batch of at most [`WRITE_BATCH`] rows.
    pub fn write(&mut self, rows: Vec<OnlineRow>) -> anyhow::Result<()> {
        if let (None, Some(first)) = (self.creating, rows.first()) {
            let runs_restore = self.runs_restore(&first.key)?;
            self.creating = Some(runs_restore);
        }
        self.send(rows, self.creating == Some(true))?;
        if self.existing.len() >= WRITE_BATCH {
            let existing = self.existing.drain(..WRITE_BATCH).collect();
            self.send(existing, false)?;
        }
        Ok(())
    }

    /// Waits for every answer and writes the remaining existing keys; returns how many hashes were written.
    pub fn finish(mut self) -> anyhow::Result<i64> {
        while !self.sent.is_empty() {
            self.receive_oldest()?;
        }
        for batch in std::mem::take(&mut self.existing).chunks(WRITE_BATCH) {
            self.send(batch.to_vec(), false)?;
        }
        while !self.sent.is_empty() {
            self.receive_oldest()?;
        }
        Ok(self.written)
    }

    fn send(&mut self, rows: Vec<OnlineRow>, create: bool) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        let sent = if create {
            add_creates(&mut pipeline, &rows);
            Sent::Creates(rows)
        } else {
            add_writes(&mut pipeline, &rows);
            Sent::Conditional
        };
        self.connection
            .send_packed_command(&pipeline.get_packed_pipeline())
            .with_context(|| format!("writing to the online store at {}", self.address))?;
        self.sent.push_back(sent);
        while self.sent.len() > BATCHES_IN_FLIGHT {
            self.receive_oldest()?;
        }
        Ok(())
    }

    /// Whether the server runs `RESTORE`, asked with an empty payload for `key` (a key of the view, which an
    /// ACL limited to the view's keys allows): it answers that the payload is malformed, or that the key
    /// exists, and restores nothing.
    fn runs_restore(&mut self, key: &str) -> anyhow::Result<bool> {
        let probe = redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg("")
            .get_packed_command();
        self.connection
            .send_packed_command(&probe)
            .with_context(|| format!("writing to the online store at {}", self.address))?;
        Ok(match self.receive()? {
            Value::ServerError(error)
                if error.code() == "BUSYKEY"
                    || error.details().is_some_and(|d| d.contains("payload")) =>
            {
                true
            }
            answer => {
                eprintln!(
                    "flywheel-trainer: the online store at {} does not run RESTORE ({answer:?}); writing with \
                     the conditional script",
                    self.address
                );
                false
            }
        })
    }

    fn receive_oldest(&mut self) -> anyhow::Result<()> {
        match self.sent.pop_front() {
            None => Ok(()),
            Some(Sent::Conditional) => match self.receive()? {
                Value::Int(count) => {
                    self.written += count;
                    Ok(())
                }
                other => bail!(
                    "the online store at {} answered a write with {other:?}",
                    self.address
                ),
            },
            Some(Sent::Creates(rows)) => {
                let mut busy = 0;
                let batch = rows.len();
                for row in rows {
                    match self.receive()? {
                        Value::Okay => self.written += 1,
                        Value::ServerError(error) => {
                            if error.code() == "BUSYKEY" {
                                busy += 1;
                            } else if self.creating == Some(true) {
                                eprintln!(
                                    "flywheel-trainer: the online store at {} refused RESTORE ({error}); \
                                     writing with the conditional script",
                                    self.address
                                );
                                self.creating = Some(false);
                            }
                            self.existing.push(row);
                        }
                        other => bail!(
                            "the online store at {} answered RESTORE with {other:?}",
                            self.address
                        ),
                    }
                }
                // Mostly existing keys: a refused RESTORE and then the script cost more than the script alone.
                if busy * 2 > batch {
                    self.creating = Some(false);
                }
                Ok(())
            }
        }
    }

    fn receive(&mut self) -> anyhow::Result<Value> {
        self.connection
            .recv_response()
            .with_context(|| format!("writing to the online store at {}", self.address))
    }
}
