//! One error type for the whole program, and the only home of SPEC §5's exit codes.
//!
//! Every variant's doc names the exit code it maps to. `Display` is one line that
//! names what went wrong and, where there is one, how to fix it; `main` prints it
//! on stderr and exits with [`Error::exit_code`]. Database errors are classified
//! once, here ([`DbContext::db`]): a lost or refused connection is "PostgreSQL
//! unreachable" (69), a named constraint is turned into the domain error it means.

use std::fmt;

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code for a runtime failure.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code for bad usage or invalid input (clap uses it too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a request the data refuses (unknown user or item, duplicate queue item).
pub const EXIT_DATA: u8 = 65;
/// Exit code for PostgreSQL unreachable.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code for a configuration error.
pub const EXIT_CONFIG: u8 = 78;

/// The result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable (exit 78). The message names the key.
    #[error("configuration error: {0}")]
    Config(String),

    /// An argument is out of range or malformed (exit 2). Nothing was written.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The argument, as the operator knows it (e.g. `--limit`).
        what: &'static str,
        /// What is wrong with it and what is accepted.
        reason: String,
    },

    /// The user does not exist (exit 65). Nothing was written.
    #[error("unknown user {0}: no row in users has this id (create the user first)")]
    UnknownUser(i64),

    /// The item is not in the queue (exit 65).
    #[error("{queue} queue has no item {item:?}")]
    UnknownItem {
        /// Queue name (`topic`, `post`, `message`).
        queue: &'static str,
        /// The content id asked for.
        item: String,
    },

    /// The item is already queued (exit 65). Nothing was changed.
    #[error("{queue} queue already holds item {item:?}: remove it first to queue it again")]
    DuplicateItem {
        /// Queue name (`topic`, `post`, `message`).
        queue: &'static str,
        /// The content id that is already queued.
        item: String,
    },

    /// An idempotency key was reused for another event (exit 65). Nothing was written.
    #[error("{detail}: use a new --event-id for a new event")]
    EventIdConflict {
        /// The reused key.
        event_id: String,
        /// What the key already recorded, as the database says it.
        detail: String,
    },

    /// The event would take the user's score outside the 64-bit range (exit 65).
    #[error(
        "the event would take user {0}'s loyalty score outside the 64-bit range; nothing was recorded"
    )]
    ScoreOverflow(i64),

    /// The database cannot be adopted as it is (exit 65): the message says
    /// what is wrong with it. Nothing was changed.
    #[error("cannot adopt this database: {0}")]
    Adopt(String),

    /// PostgreSQL cannot be reached or dropped the connection (exit 69).
    #[error(
        "PostgreSQL unreachable while {context}: {} (is the server running and database.url right?)",
        describe(source)
    )]
    Unavailable {
        /// What the program was doing.
        context: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },

    /// A statement ran past its time limit or was cancelled (exit 1).
    #[error("{context} was cancelled: it ran past its time limit or the program is stopping")]
    Cancelled {
        /// What was cancelled.
        context: &'static str,
    },

    /// Any other database failure (exit 1).
    #[error("database error while {context}: {}", describe(source))]
    Database {
        /// What the program was doing.
        context: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },

    /// Applying migrations failed (exit 1, or 69 when the server is unreachable).
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A file of the current SQL definitions (`sql/`) failed to apply
    /// (exit 1): nothing of the apply was kept.
    #[error("applying {file} failed: {} (nothing was changed)", describe(source))]
    Definitions {
        /// The file, as `sql/<name>.sql`.
        file: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },

    /// The schema is not (fully) there: an undefined table, function or
    /// column (exit 1).
    #[error(
        "database error while {context}: {} (is the schema migrated? run `loyaltyd migrate`)",
        describe(source)
    )]
    SchemaMissing {
        /// What the program was doing.
        context: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },

    /// A statement of `adopt` failed (exit 1); running it again resumes.
    #[error(
        "adoption step failed ({statement} …): {}; run `loyaltyd adopt` again to resume",
        describe(source)
    )]
    AdoptStep {
        /// The statement's first words.
        statement: String,
        /// The driver's error.
        source: sqlx::Error,
    },

    /// Redis is needed for this and is away (exit 1).
    #[error("Redis is unavailable: {needed} (check redis.url)")]
    RedisUnavailable {
        /// What could not be done without it.
        needed: &'static str,
    },

    /// The operating system refused what the program needs (exit 1).
    #[error("{context}: {source}")]
    Io {
        /// What the program was doing.
        context: &'static str,
        /// The system's error.
        source: std::io::Error,
    },

    /// The job scheduler failed (exit 1).
    #[error("{context}: {source}")]
    Scheduler {
        /// What the program was doing.
        context: String,
        /// The scheduler's error.
        source: tokio_cron_scheduler::JobSchedulerError,
    },

    /// The metrics recorder could not be built or installed (exit 1).
    #[error("{context}: {source}")]
    Metrics {
        /// What the program was doing.
        context: &'static str,
        /// The exporter's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// JSON output could not be encoded (exit 1).
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),

    /// A job's cluster lock is held by a connection that leaked it (exit 1).
    #[error(
        "the {job} lock is held by an idle connection (backend {pid}, idle {idle_seconds:.0} s, past the job's time limit): a leaked lock; the job cannot run until that connection ends"
    )]
    LeakedLock {
        /// The job.
        job: &'static str,
        /// The holding backend.
        pid: i32,
        /// How long it has been idle.
        idle_seconds: f64,
    },

    /// A job ran past its time limit and was cancelled (exit 1).
    #[error("{job} ran past its time limit of {limit} and was cancelled")]
    TimedOut {
        /// The job.
        job: &'static str,
        /// Its time limit, as configured.
        limit: String,
    },

    /// Writers held what a job needed through every try (exit 1); the job
    /// tries again on its next run.
    #[error("{what} stayed held by writers; it will be tried again")]
    Busy {
        /// What was held.
        what: String,
    },

    /// An internal invariant did not hold (exit 1): a bug to report.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// The process exit code of SPEC §5 for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => EXIT_CONFIG,
            Error::Invalid { .. } => EXIT_USAGE,
            Error::UnknownUser(_)
            | Error::UnknownItem { .. }
            | Error::DuplicateItem { .. }
            | Error::EventIdConflict { .. }
            | Error::ScoreOverflow(_)
            | Error::Adopt(_) => EXIT_DATA,
            Error::Unavailable { .. } => EXIT_UNAVAILABLE,
            Error::Migrate(sqlx::migrate::MigrateError::Execute(e)) if is_unavailable(e) => {
                EXIT_UNAVAILABLE
            }
            Error::Cancelled { .. }
            | Error::Database { .. }
            | Error::Migrate(_)
            | Error::Definitions { .. }
            | Error::SchemaMissing { .. }
            | Error::AdoptStep { .. }
            | Error::RedisUnavailable { .. }
            | Error::Io { .. }
            | Error::Scheduler { .. }
            | Error::Metrics { .. }
            | Error::Json(_)
            | Error::LeakedLock { .. }
            | Error::TimedOut { .. }
            | Error::Busy { .. }
            | Error::Runtime(_) => EXIT_RUNTIME,
        }
    }

    /// An invalid-argument error.
    pub fn invalid(what: &'static str, reason: impl fmt::Display) -> Self {
        Error::Invalid {
            what,
            reason: reason.to_string(),
        }
    }

    /// True when PostgreSQL could not be reached (worth retrying later).
    pub fn is_unavailable(&self) -> bool {
        self.exit_code() == EXIT_UNAVAILABLE
    }

    /// The error as one line: the chain of sources, newlines folded.
    pub fn one_line(&self) -> String {
        one_line(&self.to_string())
    }

    /// The SQLSTATE PostgreSQL answered with, where a database error is
    /// behind this one.
    pub fn sqlstate(&self) -> Option<String> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>() {
                return db.code().map(|c| c.into_owned());
            }
            if let Some(sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db))) =
                e.downcast_ref::<sqlx::migrate::MigrateError>()
            {
                return db.code().map(|c| c.into_owned());
            }
            cause = e.source();
        }
        None
    }
}

/// Folds a message onto one line (drivers sometimes put detail on a second one).
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// True for errors that mean "the server is not there (any more)".
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exception; 57P01..57P03: the server is shutting
        // down, crashed, or not accepting connections yet.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// True when PostgreSQL cancelled a statement (statement_timeout or pg_cancel_backend).
pub fn is_cancelled(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
}

/// SQLSTATE raised by `record_moderation_event` when an event id is reused
/// with another payload (sql/recording.sql).
pub const SQLSTATE_EVENT_ID_REUSED: &str = "LY001";

/// What a refused statement means, named from the constraint or SQLSTATE
/// the database reported: the one table of the schema's refusals (in the
/// manner of realworld-axum-sqlx's `on_constraint`). A service turns a
/// [`Refusal`] into its domain [`Error`] with the ids it knows; a renamed
/// constraint is fixed here, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `moderation_events_user_id_fkey`: the event's user does not exist.
    UnknownUser,
    /// `LY001` (sql/recording.sql): an event id reused with another payload.
    EventIdReused,
    /// `22003` numeric value out of range: a score would leave `BIGINT`.
    OutOfRange,
    /// A queue table's primary key: the item is already queued.
    DuplicateItem,
    /// `55P03` lock not available: `lock_timeout` or `NOWAIT` gave up; retry.
    LockBusy,
    /// `40P01` deadlock detected or `40001` serialization failure: the
    /// transaction was rolled back and PostgreSQL asks for it to be retried.
    Retry,
}

impl Refusal {
    /// The refusal a driver error is, if it is one of the schema's.
    pub fn of(e: &sqlx::Error) -> Option<Refusal> {
        let sqlx::Error::Database(db) = e else {
            return None;
        };
        match db.constraint() {
            Some("moderation_events_user_id_fkey") => return Some(Refusal::UnknownUser),
            // A queue table's primary key.
            Some(c)
                if crate::types::QueueKind::ALL
                    .iter()
                    .any(|q| c.strip_suffix("_pkey") == Some(q.table().0)) =>
            {
                return Some(Refusal::DuplicateItem);
            }
            _ => {}
        }
        match db.code().as_deref() {
            Some(SQLSTATE_EVENT_ID_REUSED) => Some(Refusal::EventIdReused),
            Some("22003") => Some(Refusal::OutOfRange),
            Some("55P03") => Some(Refusal::LockBusy),
            Some("40P01" | "40001") => Some(Refusal::Retry),
            _ => None,
        }
    }
}

/// A driver error as an operator reads it: for a server error its message,
/// detail and hint (not the driver's wrapping, nor the server's source-file
/// line it reports), else the driver's own text.
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => {
            let mut text = db.message().to_owned();
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                if let Some(detail) = pg.detail() {
                    text.push_str(&format!(" ({detail})"));
                }
                if let Some(hint) = pg.hint() {
                    text.push_str(&format!("; {hint}"));
                }
            }
            text
        }
        other => other.to_string(),
    }
}

/// The server's own message of a database error (no driver prefix, no context).
pub fn database_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

/// Turns a driver error into an [`Error`] that says what the program was doing.
pub trait DbContext<T> {
    /// Classifies the error: unreachable server, cancelled statement, or other.
    fn db(self, context: &'static str) -> Result<T>;
}

impl<T> DbContext<T> for std::result::Result<T, sqlx::Error> {
    fn db(self, context: &'static str) -> Result<T> {
        self.map_err(|source| from_sqlx(context, source))
    }
}

/// What to do about a login the server refused for a reason of the
/// configuration: a role or a database that does not exist, a password it
/// does not take (SQLSTATE 28000, 28P01, 3D000).
pub fn login_refused(e: &sqlx::Error) -> Option<&'static str> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    match db.code().as_deref() {
        Some("3D000") => Some(
            "create it (createdb, as a superuser) or name another in database.url / PGDATABASE",
        ),
        Some("28000") => Some(
            "create the role (CREATE ROLE … LOGIN), or give the user in database.url / PGUSER; without one, the operating-system user is used, as libpq does",
        ),
        Some("28P01") => Some("give the right password in database.url or PGPASSWORD"),
        _ => None,
    }
}

/// Classifies one driver error (see [`DbContext::db`]).
pub fn from_sqlx(context: &'static str, source: sqlx::Error) -> Error {
    if let Some(fix) = login_refused(&source) {
        // The server answered: not "unreachable", but a configuration to fix.
        Error::Config(format!(
            "PostgreSQL refused the login while {context}: {} ({fix})",
            describe(&source)
        ))
    } else if is_unavailable(&source) {
        Error::Unavailable { context, source }
    } else if is_cancelled(&source) {
        Error::Cancelled { context }
    } else if matches!(&source, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01" | "42883" | "42703")))
    {
        // Undefined table, function or column: the schema is not (fully) there.
        Error::SchemaMissing { context, source }
    } else {
        Error::Database { context, source }
    }
}
