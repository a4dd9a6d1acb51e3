//! SQL text: the migrations split into statements, which statements a
//! later migration supersedes, and how two index definitions compare.

use crate::error::{Error, Result};

/// The triggers and functions a migration drops (`DROP TRIGGER IF EXISTS
/// name ...`, `DROP FUNCTION IF EXISTS name(...)`), with its version: an
/// earlier migration's statement creating one of them is not run again by
/// `adopt`. Resuming an adoption replays every migration, and recreating,
/// say, migration 5's scoring trigger beside migration 8's would count each
/// event twice until migration 8's transaction dropped it again.
pub(super) fn dropped_later() -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for m in crate::db::MIGRATOR.iter() {
        for stmt in split_statements(m.sql.as_str()) {
            let upper = normalize(&stmt);
            for prefix in ["DROP TRIGGER IF EXISTS ", "DROP FUNCTION IF EXISTS "] {
                if let Some(rest) = upper.strip_prefix(prefix) {
                    let name = rest.split(['(', ' ', ';']).next().unwrap_or_default();
                    out.push((format!("{prefix}{name}"), m.version));
                }
            }
        }
    }
    out
}

/// What to do with `stmt` of migration `version` when a later migration
/// drops what it creates: a trigger is not created (the later migration's
/// replaces it); a function is dropped first and created as this migration
/// has it (statements of this migration may name it; the later migration
/// drops it again and makes its own, whose result type may differ).
pub(super) enum Superseded {
    No,
    Skip,
    DropFirst(String),
}

pub(super) fn superseded(stmt: &str, version: i64, dropped: &[(String, i64)]) -> Superseded {
    let upper = normalize(stmt);
    let later = |drop: String| dropped.iter().any(|(d, v)| *d == drop && *v > version);
    let name_after = |prefix: &str| {
        upper
            .strip_prefix(prefix)
            .and_then(|r| r.split(['(', ' ']).next())
            .map(str::to_owned)
    };
    if let Some(name) = name_after("CREATE TRIGGER ")
        && later(format!("DROP TRIGGER IF EXISTS {name}"))
    {
        return Superseded::Skip;
    }
    for prefix in ["CREATE FUNCTION ", "CREATE OR REPLACE FUNCTION "] {
        if let Some(name) = name_after(prefix)
            && later(format!("DROP FUNCTION IF EXISTS {name}"))
        {
            return Superseded::DropFirst(format!(
                "DROP FUNCTION IF EXISTS {}",
                name.to_lowercase()
            ));
        }
    }
    Superseded::No
}

/// The text of migration `version`.
pub(super) fn migration(version: i64) -> Result<&'static str> {
    crate::db::MIGRATOR
        .iter()
        .find(|m| m.version == version)
        .map(|m| m.sql.as_str())
        .ok_or_else(|| Error::Runtime(format!("internal: migration {version} is not embedded")))
}

/// Splits SQL text into statements at top-level semicolons (not inside
/// quotes, dollar quotes or comments); comments are kept with their statement.
pub fn split_statements(sql: &str) -> Vec<String> {
    // Works on bytes: every delimiter is ASCII, so a cut at one of them is
    // a char boundary.
    let b = sql.as_bytes();
    let (mut out, mut start, mut i) = (Vec::new(), 0, 0);
    let mut dollar: Option<Vec<u8>> = None;
    while i < b.len() {
        if let Some(tag) = &dollar {
            if b[i..].starts_with(tag) {
                i += tag.len();
                dollar = None;
            } else {
                i += 1;
            }
            continue;
        }
        match b[i] {
            b'-' if b[i..].starts_with(b"--") => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n);
            }
            b'/' if b[i..].starts_with(b"/*") => {
                i = b[i..]
                    .windows(2)
                    .position(|w| w == b"*/")
                    .map_or(b.len(), |n| i + n + 2);
            }
            b'\'' => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'\'' && b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                    } else if b[i] == b'\'' {
                        break;
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'$' => {
                let close = b[i + 1..]
                    .iter()
                    .position(|&c| c == b'$')
                    .map(|n| i + 1 + n);
                match close {
                    Some(e)
                        if b[i + 1..e]
                            .iter()
                            .all(|c| c.is_ascii_alphanumeric() || *c == b'_') =>
                    {
                        dollar = Some(b[i..=e].to_vec());
                        i = e + 1;
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                push_statement(&mut out, &sql[start..i]);
                start = i + 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    if start < sql.len() {
        push_statement(&mut out, &sql[start..]);
    }
    out
}

/// Keeps a statement byte for byte (function bodies and their comments must
/// come out as `migrate` makes them), unless it is only comments.
pub(super) fn push_statement(out: &mut Vec<String>, text: &str) {
    if !normalize(text).is_empty() {
        out.push(text.trim().to_owned());
    }
}

/// A statement without its whole-line comments, upper-cased, its whitespace
/// folded (for matching).
pub(super) fn normalize(stmt: &str) -> String {
    stmt.lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

/// `(index, table)` of a CREATE INDEX statement.
pub(super) fn index_target(stmt: &str) -> Option<(String, String)> {
    let upper = normalize(stmt);
    let rest = upper
        .strip_prefix("CREATE UNIQUE INDEX ")
        .or_else(|| upper.strip_prefix("CREATE INDEX "))?;
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_lowercase();
    if words.next()? != "ON" {
        return None;
    }
    let table = words.next()?.trim_end_matches('(').to_lowercase();
    Some((name, table))
}

/// Whether an existing index definition (pg_get_indexdef) is the one a
/// migration statement creates: compared without schema, method, quoting,
/// parentheses or spacing.
pub(super) fn same_index(existing: &str, stmt: &str) -> bool {
    let squash = |s: &str| {
        s.replace("public.", "")
            .replace(" USING btree", "")
            .replace("CONCURRENTLY IF NOT EXISTS ", "")
            .chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '(' | ')' | '"' | ';'))
            .collect::<String>()
            .to_lowercase()
    };
    squash(existing) == squash(stmt)
}

/// A SQL string literal.
pub(super) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adopt::columns::replace_word;

    #[test]
    fn statements_split_at_top_level_semicolons_only() {
        let sql = "CREATE TABLE a (x TEXT DEFAULT ';');\n-- a comment; still a comment\nCREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;\nDO $b$ BEGIN PERFORM 1; END $b$;";
        let s = split_statements(sql);
        assert_eq!(s.len(), 3, "{s:?}");
        assert!(s[1].contains("SELECT 1; $$"));
        assert!(s[2].starts_with("DO $b$"));
    }

    #[test]
    fn index_definitions_compare_without_formatting() {
        assert!(same_index(
            "CREATE INDEX idx_users_loyalty_score_desc ON public.users USING btree (loyalty_score DESC) WHERE (loyalty_score > 0)",
            "CREATE INDEX idx_users_loyalty_score_desc ON users (loyalty_score DESC) WHERE loyalty_score > 0"
        ));
        assert!(!same_index(
            "CREATE INDEX idx_topic_queue_position ON public.topic_creation_queue USING btree (position_in_queue)",
            "CREATE UNIQUE INDEX idx_topic_queue_position ON topic_creation_queue (position_in_queue)"
        ));
        assert_eq!(
            index_target(
                "CREATE UNIQUE INDEX x ON post_moderation_queue (topic_id, position_in_queue)"
            ),
            Some(("x".into(), "post_moderation_queue".into()))
        );
    }

    #[test]
    fn whole_words_only_are_replaced() {
        assert_eq!(
            replace_word("(user_id, id) id_x", "id", "id__new"),
            "(user_id, id__new) id_x"
        );
    }
}
