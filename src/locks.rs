//! Every PostgreSQL advisory lock loyaltyd takes, named in one place.
//!
//! Advisory locks share one key space per database with the forum's own, so
//! each key spells "LY" (0x4c59) in its top bytes, then what it guards. Keys
//! taken as one `bigint` and keys taken as two `int4` halves are distinct
//! locks in PostgreSQL (`pg_locks.objsubid` 1 and 2), so the queue folds'
//! per-scope keys cannot meet the bigint ones.

/// The leaderboard refresh (a transaction lock: any process, any host).
pub const REFRESH: i64 = 0x4c59_4c42_0001; // "LYLB" 1

/// The cache sync (a transaction lock: one daemon at a time).
pub const SYNC: i64 = 0x4c59_5359_0001; // "LYSY" 1

/// The scheduled jobs' ticks (session locks held on one pooled connection
/// for the run, so a job runs once per tick across every daemon; see
/// `jobs::lock_key`): the refresh check, the sweep, the reorder.
pub const JOB_REFRESH: i64 = 0x4c59_4a42_0001; // "LYJB" 1
pub const JOB_SWEEP: i64 = 0x4c59_4a42_0002; // "LYJB" 2
pub const JOB_REORDER: i64 = 0x4c59_4a42_0003; // "LYJB" 3

/// An apply of the current SQL definitions (a transaction lock: one
/// process at a time; see `definitions::apply`).
pub const DEFINITIONS: i64 = 0x4c59_4446_0001; // "LYDF" 1

/// The first half of a queue scope's fold lock, taken in SQL by
/// `queue_fold_lock(queue, scope)` (sql/queues.sql) as
/// `pg_try_advisory_xact_lock(QUEUE_FOLD, hashtext(queue || '/' || scope))`:
/// "LYQF". Only ever tried, never waited for.
pub const QUEUE_FOLD: i32 = 0x4c59_5146;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_are_distinct_and_the_sql_uses_the_fold_key() {
        let keys = vec![
            REFRESH,
            SYNC,
            JOB_REFRESH,
            JOB_SWEEP,
            JOB_REORDER,
            DEFINITIONS,
        ];
        let mut unique = keys.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:x?}");
        let sql = include_str!("../sql/queues.sql");
        assert!(
            sql.contains(&format!("pg_try_advisory_xact_lock({QUEUE_FOLD}, hashtext")),
            "sql/queues.sql's fold lock is not locks::QUEUE_FOLD"
        );
    }
}
