//! `loyaltyd stats`: latency statistics from the Redis perf lists.

use serde::Serialize;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::telemetry::PerfEntry;

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
}

/// Every perf list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    /// One entry per list, by key.
    pub lists: Vec<ListStats>,
}

/// Summarizes samples (nearest-rank percentiles); `None` for no samples.
pub fn summarize(key: String, mut samples: Vec<f64>) -> Option<ListStats> {
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
    })
}

/// Reads every `perf:*` list under the key prefix and summarizes it.
pub async fn collect(cache: &Cache) -> Result<Stats> {
    let unavailable =
        || Error::Runtime("Redis is unavailable: no perf lists to read (check redis.url)".into());
    let mut conn = cache.connection();
    let pattern = format!("{}perf:*", crate::cache::escape_glob(cache.prefix()));
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let scan = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .to_owned();
        let (next, batch): (u64, Vec<String>) = cache
            .run("SCAN", scan.query_async(&mut conn))
            .await
            .ok_or_else(unavailable)?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    let mut lists = Vec::new();
    for key in keys {
        let lrange = redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).to_owned();
        let Some(entries) = cache
            .run::<Vec<String>>("LRANGE", lrange.query_async(&mut conn))
            .await
        else {
            return Err(unavailable());
        };
        let samples = entries
            .iter()
            .filter_map(|e| serde_json::from_str::<PerfEntry>(e).ok())
            .map(|e| e.duration_ms)
            .collect();
        lists.extend(summarize(key, samples));
    }
    Ok(Stats { lists })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize("k".into(), samples).unwrap_or_else(|| panic!("no stats"));
        assert_eq!(
            (s.count, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 95.0, 99.0, 100.0)
        );
        assert!((s.avg_ms - 50.5).abs() < 1e-9);
    }

    #[test]
    fn a_single_sample_is_every_percentile() {
        let s = summarize("k".into(), vec![3.5]).unwrap_or_else(|| panic!("no stats"));
        assert_eq!(
            (s.p50_ms, s.p99_ms, s.max_ms, s.avg_ms),
            (3.5, 3.5, 3.5, 3.5)
        );
    }

    #[test]
    fn no_samples_means_no_entry() {
        assert_eq!(summarize("k".into(), vec![]), None);
        assert_eq!(summarize("k".into(), vec![f64::NAN]), None);
    }

    #[test]
    fn glob_characters_in_the_prefix_are_literal() {
        assert_eq!(crate::cache::escape_glob("t[1]*?:"), "t\\[1\\]\\*\\?:");
    }
}
