//! Writes a materialization's latest values to the Redis online store (layout: `flywheel_features::online`).
//!
//! A hash that does not exist yet is created by `RESTORE` (one plain command, refused with `BUSYKEY` when the
//! key exists), which costs Redis under half the work of the conditional write script. Keys that exist, and
//! every key once `RESTORE` is refused for another reason (an ACL without it, a managed Redis that renamed
//! it) or most keys turn out to exist (an incremental run over a populated store), go through the script,
//! which keeps whichever values are newer. Several batches are in flight, so Redis runs one while the next is
//! prepared and sent.

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

pub struct OnlineWriter<'a> {
    connection: redis::Connection,
    address: &'a str,
    sent: VecDeque<Sent>,
    /// Whether new batches are sent as `RESTORE`s.
    creating: bool,
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
            creating: true,
            existing: Vec::new(),
            written: 0,
        }
    }

    /// Sends one batch of at most [`WRITE_BATCH`] rows.
    pub fn write(&mut self, rows: Vec<OnlineRow>) -> anyhow::Result<()> {
        self.send(rows, self.creating)?;
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
                            } else if self.creating {
                                eprintln!(
                                    "flywheel-trainer: the online store at {} refused RESTORE ({error}); \
                                     writing with the conditional script",
                                    self.address
                                );
                                self.creating = false;
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
                    self.creating = false;
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
