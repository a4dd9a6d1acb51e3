//! A user's committed score as every reader of `users` selects it: the one
//! row shape the cache, the live board, the sweep and the cache sync share,
//! and its one select list.

use crate::types::UserId;

/// A committed score: the score and the version it was read or written
/// at, and the user's sign-up time (the live board's tie-break). Read from
/// `users` with [`score_row_columns!`].
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ScoreRow {
    /// The user (`users.id`; a row whose id is not a user id does not decode).
    #[sqlx(rename = "user_id", try_from = "i64")]
    pub user: UserId,
    /// `users.loyalty_score`.
    #[sqlx(rename = "loyalty_score")]
    pub score: i64,
    /// `users.score_version` of that score.
    #[sqlx(rename = "score_version")]
    pub version: i64,
    /// `users.created_at`, in microseconds since the Unix epoch.
    pub created_us: i64,
    /// `users.username` (empty for NULL), where the read had it (`None`: a
    /// function's result without it; the live board keeps the name it has).
    pub username: Option<String>,
}

impl ScoreRow {
    /// From its parts where they come otherwise than as a row of `users`
    /// (a function's result, arrays); `None` for an id that is not a user id.
    pub fn from_parts(id: i64, score: i64, version: i64, created_us: i64) -> Option<ScoreRow> {
        Some(ScoreRow {
            user: UserId::new(id).ok()?,
            score,
            version,
            created_us,
            username: None,
        })
    }
}

/// The select list of a [`ScoreRow`] from `users` (a macro, for `concat!`
/// into a static query). The casts let an adopted forum's columns of its own
/// types (INTEGER ids and scores) read as BIGINT.
#[macro_export]
macro_rules! score_row_columns {
    () => {
        "id::BIGINT AS user_id, loyalty_score::BIGINT AS loyalty_score, score_version, \
         (EXTRACT(EPOCH FROM created_at) * 1000000)::BIGINT AS created_us, \
         COALESCE(username::TEXT, '') AS username"
    };
}
