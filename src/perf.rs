//! The Redis perf lists, in one room: the timer every service operation
//! records through, the background writer, and the `stats` reader.
//!
//! # The timer
//! [`Timer::start`] returns a guard. [`Timer::ok`] records a success: its
//! time in `loyaltyd_operation_duration_seconds{outcome="ok"}` and a perf
//! sample. Dropped without it (a `?` on the way out, a panic, a cancelled
//! future), it records the time under `outcome="error"` and counts
//! `loyaltyd_operation_errors_total`: a failed operation cannot go unseen.
//!
//! # The lists
//! The seed's shape (`perf:loyalty_updates`, `perf:queue:{operation}:{queue}`,
//! JSON entries `{"duration_ms", "timestamp"}`, newest first, trimmed), written
//! off the request path: a bounded channel feeds one background writer that
//! sends a batch of samples as one atomic pipeline (LPUSH + LTRIM per list).
//! A full channel or an unavailable Redis drops samples and counts them in
//! `loyaltyd_perf_samples_dropped_total`; an operation never waits for Redis.
//!
//! # The reader
//! [`collect`] summarizes every list under the key prefix. It reads any
//! entry with a numeric `duration_ms`, whatever else it holds: the seed's own
//! code writes `user_id` as a string, and a list shared with a seed-era
//! application counts its samples too. An entry it cannot read is counted as
//! skipped, never an error.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::counter;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::redis_runner::Redis;
use crate::telemetry::{self, Operation, PERF_DROPPED};
use crate::types::{QueueKind, UserId};

/// Times one operation; see the module docs.
#[must_use = "a timer records its operation as failed unless ok() is called"]
pub struct Timer {
    op: Operation,
    queue: Option<QueueKind>,
    start: Instant,
    perf: PerfLists,
    done: bool,
}

impl Timer {
    /// Starts timing `op` (on `queue`, for queue operations).
    pub fn start(perf: &PerfLists, op: Operation, queue: Option<QueueKind>) -> Timer {
        Timer {
            op,
            queue,
            start: Instant::now(),
            perf: perf.clone(),
            done: false,
        }
    }

    /// Records a success (for `user`, in the loyalty perf list).
    pub fn ok(mut self, user: Option<UserId>) {
        self.done = true;
        let took = self.start.elapsed();
        telemetry::operation(self.op, self.queue, took, true);
        if !self.perf.enabled() {
            return;
        }
        let list = match (self.op, self.op.perf_name(), self.queue) {
            (Operation::RecordEvent, _, _) => Some("perf:loyalty_updates".to_owned()),
            (_, Some(name), Some(q)) => Some(format!("perf:queue:{name}:{q}")),
            _ => None,
        };
        if let Some(list) = list {
            self.perf.push(list, PerfEntry::new(took, user));
        }
    }
}

impl Timer {
    /// Records nothing: the call found nothing to do (a refresh check with
    /// no refresh due, or another instance on it). Neither a success to time
    /// nor an error: an idle, healthy daemon's checks must not read as
    /// failures on the dashboard or in `LoyaltydOperationErrors`.
    pub fn nothing_to_do(mut self) {
        self.done = true;
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if !self.done {
            telemetry::operation(self.op, self.queue, self.start.elapsed(), false);
        }
    }
}

/// One perf list entry, the seed's JSON shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PerfEntry {
    /// The user, for loyalty updates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    /// How long the operation took, in milliseconds.
    pub duration_ms: f64,
    /// When it finished, in seconds since the Unix epoch.
    pub timestamp: f64,
}

impl PerfEntry {
    fn new(took: Duration, user: Option<UserId>) -> PerfEntry {
        PerfEntry {
            user_id: user.map(UserId::get),
            duration_ms: took.as_secs_f64() * 1000.0,
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }
}

enum PerfMsg {
    Sample(String, PerfEntry),
    Flush(oneshot::Sender<()>),
}

/// Samples waiting for the writer at most; beyond this they are dropped.
const PERF_CHANNEL: usize = 8192;
/// Samples sent to Redis in one pipeline at most.
const PERF_BATCH: usize = 512;

/// The sending side of the perf lists; cheap to clone, never blocks.
#[derive(Clone)]
pub struct PerfLists {
    tx: Option<mpsc::Sender<PerfMsg>>,
}

impl PerfLists {
    /// Perf lists turned off: samples go nowhere.
    pub fn disabled() -> PerfLists {
        PerfLists { tx: None }
    }

    /// Starts the background writer; `len` samples are kept per list (0: off).
    pub fn start(redis: Redis, len: u32) -> PerfLists {
        if len == 0 {
            return PerfLists::disabled();
        }
        let (tx, rx) = mpsc::channel(PERF_CHANNEL);
        tokio::spawn(write_perf_lists(redis, len, rx));
        PerfLists { tx: Some(tx) }
    }

    /// True when samples are kept.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    fn push(&self, list: String, entry: PerfEntry) {
        if let Some(tx) = &self.tx
            && tx.try_send(PerfMsg::Sample(list, entry)).is_err()
        {
            counter!(PERF_DROPPED).increment(1);
        }
    }

    /// Waits (at most `limit`) until every sample pushed so far was written or dropped.
    pub async fn flush(&self, limit: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = oneshot::channel();
        let flushed = async {
            if tx.send(PerfMsg::Flush(done_tx)).await.is_ok() {
                let _ = done_rx.await;
            }
        };
        let _ = tokio::time::timeout(limit, flushed).await;
    }
}

/// The writer: batches whatever is waiting into one pipeline per round trip.
async fn write_perf_lists(redis: Redis, len: u32, mut rx: mpsc::Receiver<PerfMsg>) {
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut batch: BTreeMap<String, Vec<PerfEntry>> = BTreeMap::new();
        let mut count = 0usize;
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                PerfMsg::Sample(list, entry) => {
                    batch.entry(list).or_default().push(entry);
                    count += 1;
                }
                PerfMsg::Flush(done) => flushes.push(done),
            }
            next = if count < PERF_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if count > 0 {
            // LPUSH of several values leaves the last one at the head:
            // oldest first keeps the list newest first.
            let lists: Vec<(String, Vec<String>)> = batch
                .into_iter()
                .map(|(list, entries)| {
                    let values = entries
                        .iter()
                        .filter_map(|e| serde_json::to_string(e).ok())
                        .collect();
                    (list, values)
                })
                .collect();
            if !redis.push_lists(&lists, len).await {
                counter!(PERF_DROPPED).increment(count as u64);
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Statistics of one perf list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ListStats {
    /// The list's key (with the configured prefix).
    pub key: String,
    /// Samples in the list.
    pub count: usize,
    /// Mean, in milliseconds.
    pub avg_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest sample.
    pub max_ms: f64,
    /// Entries without a numeric `duration_ms` (not counted above).
    pub skipped: usize,
}

/// Every perf list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    /// One entry per list, by key.
    pub lists: Vec<ListStats>,
}

/// Summarizes samples (nearest-rank percentiles); `None` for no samples.
pub fn summarize(key: String, mut samples: Vec<f64>, skipped: usize) -> Option<ListStats> {
    samples.retain(|s| s.is_finite());
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    // Nearest rank: the smallest sample with at least p % of samples at or below it.
    let pct = |p: f64| samples[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some(ListStats {
        key,
        count: n,
        avg_ms: samples.iter().sum::<f64>() / n as f64,
        p50_ms: pct(50.0),
        p95_ms: pct(95.0),
        p99_ms: pct(99.0),
        max_ms: samples[n - 1],
        skipped,
    })
}

/// The duration of one entry, whatever its other fields hold: any JSON
/// object with a numeric `duration_ms`.
pub fn duration_of(entry: &str) -> Option<f64> {
    serde_json::from_str::<serde_json::Value>(entry)
        .ok()?
        .get("duration_ms")?
        .as_f64()
}

/// Reads every `perf:*` list under the key prefix and summarizes it.
pub async fn collect(redis: &Redis, perf: &PerfLists) -> Result<Stats> {
    let timer = Timer::start(perf, Operation::Stats, None);
    let unavailable = || Error::RedisUnavailable {
        needed: "no perf lists to read",
    };
    let mut keys = redis.keys("perf:*").await.ok_or_else(unavailable)?;
    keys.sort();
    keys.dedup();
    let mut lists = Vec::new();
    for key in keys {
        let entries = redis.list(&key).await.ok_or_else(unavailable)?;
        let samples: Vec<f64> = entries.iter().filter_map(|e| duration_of(e)).collect();
        let skipped = entries.len() - samples.len();
        lists.extend(summarize(key, samples, skipped));
    }
    timer.ok(None);
    Ok(Stats { lists })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize("k".into(), samples, 0).unwrap_or_else(|| panic!("no stats"));
        assert_eq!(
            (s.count, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 95.0, 99.0, 100.0)
        );
        assert!((s.avg_ms - 50.5).abs() < 1e-9);
    }

    #[test]
    fn a_single_sample_is_every_percentile() {
        let s = summarize("k".into(), vec![3.5], 0).unwrap_or_else(|| panic!("no stats"));
        assert_eq!(
            (s.p50_ms, s.p99_ms, s.max_ms, s.avg_ms),
            (3.5, 3.5, 3.5, 3.5)
        );
    }

    #[test]
    fn no_samples_means_no_entry() {
        assert_eq!(summarize("k".into(), vec![], 0), None);
        assert_eq!(summarize("k".into(), vec![f64::NAN], 0), None);
    }

    #[test]
    fn entries_the_seed_writes_are_read_and_malformed_ones_skipped() {
        assert_eq!(
            duration_of(r#"{"user_id": "42", "duration_ms": 3.5, "timestamp": 1.0}"#),
            Some(3.5)
        );
        assert_eq!(
            duration_of(r#"{"user_id": 42, "duration_ms": 2, "timestamp": 1.0}"#),
            Some(2.0)
        );
        assert_eq!(duration_of(r#"{"duration_ms": "fast"}"#), None);
        assert_eq!(duration_of("not json"), None);
    }

    #[test]
    fn glob_characters_in_the_prefix_are_literal() {
        assert_eq!(
            crate::redis_runner::escape_glob("t[1]*?:"),
            "t\\[1\\]\\*\\?:"
        );
    }
}
