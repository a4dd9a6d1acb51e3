//! Where a committed score goes in Redis: the score cache and, with
//! `leaderboard.live`, the live board — composed here, above both, so that
//! neither knows the other, and sent as one pipeline: one round trip per
//! write, as the score write has always cost.

use crate::cache;
use crate::context::Context;
use crate::leaderboard::live::{self, Board};
use crate::score_row::ScoreRow;

/// Writes committed scores to the cache and (when on) the live board, each
/// guarded by the score's version; false when Redis could not be reached
/// (the cache sync writes them later: they are committed).
pub async fn scores(ctx: &Context, rows: &[ScoreRow]) -> bool {
    if rows.is_empty() {
        return true;
    }
    let mut pipe = redis::pipe();
    ctx.cache.add_set_if_newer(&mut pipe, rows);
    if ctx.config.leaderboard.live {
        Board::new(&ctx.redis).add_set(&mut pipe, rows);
    }
    ctx.redis
        .exec_pipeline(
            "EVALSHA",
            &pipe,
            true,
            &[cache::write_script(), live::library(&ctx.redis)],
        )
        .await
}
