//! SQL text: how two index definitions compare, and a string literal.

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
    fn index_definitions_compare_without_formatting() {
        assert!(same_index(
            "CREATE INDEX idx_users_loyalty_score_desc ON public.users USING btree (loyalty_score DESC) WHERE (loyalty_score > 0)",
            "CREATE INDEX idx_users_loyalty_score_desc ON users (loyalty_score DESC) WHERE loyalty_score > 0"
        ));
        assert!(!same_index(
            "CREATE INDEX idx_topic_queue_position ON public.topic_creation_queue USING btree (position_in_queue)",
            "CREATE UNIQUE INDEX idx_topic_queue_position ON topic_creation_queue (position_in_queue)"
        ));
    }

    #[test]
    fn whole_words_only_are_replaced() {
        assert_eq!(
            replace_word("(user_id, id) id_x", "id", "id__new"),
            "(user_id, id__new) id_x"
        );
    }
}
