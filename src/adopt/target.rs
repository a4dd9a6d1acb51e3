//! The target schema: the forum tables' columns and named constraints as
//! loyaltyd's migrations leave them, which an adoption brings the forum to.

use crate::types::QueueKind;

/// A column of a forum table as it is now.
#[derive(Debug, Clone)]
pub(super) struct Column {
    /// `format_type` of the column.
    pub(super) sql_type: String,
    pub(super) not_null: bool,
    pub(super) default: Option<String>,
    pub(super) generated: bool,
}

/// A column of a forum table as loyaltyd wants it.
pub(super) struct Want {
    pub(super) table: &'static str,
    pub(super) column: &'static str,
    pub(super) sql_type: &'static str,
    pub(super) not_null: bool,
    pub(super) default: Option<&'static str>,
    /// How the new type is computed from the old (`{c}` is the column).
    pub(super) convert: &'static str,
}

/// The forum tables' columns after migrations 1, 3, 5 and 6.
pub(super) const WANTED: &[Want] = &[
    w("users", "id", "bigint", true, None),
    w("users", "username", "text", true, None),
    w("users", "loyalty_score", "bigint", true, Some("0")),
    w("users", "score_version", "bigint", true, Some("0")),
    w(
        "users",
        "created_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w(
        "users",
        "updated_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w("users", "score_xid", "xid8", false, None),
    w(
        "moderation_events",
        "id",
        "bigint",
        true,
        Some("nextval('moderation_events_id_seq'::regclass)"),
    ),
    w("moderation_events", "user_id", "bigint", true, None),
    w("moderation_events", "event_type", "text", true, None),
    w("moderation_events", "content_type", "text", true, None),
    w("moderation_events", "content_id", "text", true, None),
    w("moderation_events", "outcome", "text", true, None),
    w("moderation_events", "score_delta", "integer", true, None),
    w("moderation_events", "event_id", "text", false, None),
    w(
        "moderation_events",
        "created_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w("topic_creation_queue", "topic_id", "text", true, None),
    w(
        "topic_creation_queue",
        "position_in_queue",
        "bigint",
        true,
        None,
    ),
    w(
        "topic_creation_queue",
        "priority_score",
        "double precision",
        true,
        Some("0"),
    ),
    w(
        "topic_creation_queue",
        "entered_queue_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w("post_moderation_queue", "post_id", "text", true, None),
    w("post_moderation_queue", "topic_id", "text", true, None),
    w(
        "post_moderation_queue",
        "position_in_queue",
        "bigint",
        true,
        None,
    ),
    w(
        "post_moderation_queue",
        "priority_score",
        "double precision",
        true,
        Some("0"),
    ),
    w(
        "post_moderation_queue",
        "entered_queue_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w("private_message_queue", "message_id", "text", true, None),
    w(
        "private_message_queue",
        "conversation_id",
        "text",
        true,
        None,
    ),
    w(
        "private_message_queue",
        "position_in_queue",
        "bigint",
        true,
        None,
    ),
    w(
        "private_message_queue",
        "priority_score",
        "double precision",
        true,
        Some("0"),
    ),
    w(
        "private_message_queue",
        "entered_queue_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
];

pub(super) const fn w(
    table: &'static str,
    column: &'static str,
    sql_type: &'static str,
    not_null: bool,
    default: Option<&'static str>,
) -> Want {
    Want {
        table,
        column,
        sql_type,
        not_null,
        default,
        convert: "{c}",
    }
}

/// Named constraints of the forum tables (migrations 1 and 3), as
/// `pg_get_constraintdef` prints them once added.
pub(super) const CHECKS: &[(&str, &str, &str)] = &[
    ("users", "users_id_positive", "CHECK (id > 0)"),
    (
        "moderation_events",
        "moderation_events_event_type_check",
        "CHECK (octet_length(event_type) BETWEEN 1 AND 255)",
    ),
    (
        "moderation_events",
        "moderation_events_content_type_check",
        "CHECK (content_type IN ('post', 'topic', 'private_message'))",
    ),
    (
        "moderation_events",
        "moderation_events_content_id_check",
        "CHECK (octet_length(content_id) BETWEEN 1 AND 255)",
    ),
    (
        "moderation_events",
        "moderation_events_outcome_check",
        "CHECK (outcome IN ('approved', 'rejected', 'calibrated'))",
    ),
    (
        "moderation_events",
        "moderation_events_event_id_check",
        "CHECK (octet_length(event_id) BETWEEN 1 AND 255)",
    ),
    (
        "moderation_events",
        "moderation_events_user_id_fkey",
        "FOREIGN KEY (user_id) REFERENCES users (id)",
    ),
    (
        "topic_creation_queue",
        "topic_creation_queue_topic_id_check",
        "CHECK (octet_length(topic_id) BETWEEN 1 AND 255)",
    ),
    (
        "topic_creation_queue",
        "topic_creation_queue_priority_finite",
        "CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity'))",
    ),
    (
        "post_moderation_queue",
        "post_moderation_queue_post_id_check",
        "CHECK (octet_length(post_id) BETWEEN 1 AND 255)",
    ),
    (
        "post_moderation_queue",
        "post_moderation_queue_topic_id_check",
        "CHECK (octet_length(topic_id) BETWEEN 1 AND 255)",
    ),
    (
        "post_moderation_queue",
        "post_moderation_queue_priority_finite",
        "CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity'))",
    ),
    (
        "private_message_queue",
        "private_message_queue_message_id_check",
        "CHECK (octet_length(message_id) BETWEEN 1 AND 255)",
    ),
    (
        "private_message_queue",
        "private_message_queue_conversation_id_check",
        "CHECK (octet_length(conversation_id) BETWEEN 1 AND 255)",
    ),
    (
        "private_message_queue",
        "private_message_queue_priority_finite",
        "CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity'))",
    ),
];

/// Each queue as adoption's SQL names it: (queue, table, item column,
/// scope expression: the scope column, or '' for the one global scope),
/// from [`QueueKind::table`].
pub(super) fn queues() -> [(&'static str, &'static str, &'static str, &'static str); 3] {
    QueueKind::ALL.map(|q| {
        let (table, item, scope) = q.table();
        (q.as_str(), table, item, scope.unwrap_or("''"))
    })
}
