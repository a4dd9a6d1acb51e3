//! The data rules of an adoption: what the original design's data may hold
//! that loyaltyd's constraints refuse (every NULL its schema allows, values
//! spelt otherwise, rows no rule scores), and what adoption does about each.
//!
//! Each rule is defined once, here, and both halves of `adopt` read it: the
//! dry run counts and samples the rows its predicate selects, the adoption
//! applies its fix to the same rows. So the plan and the outcome cannot
//! disagree: what the plan says a rule will repair or quarantine is what
//! lands in `adoption_repairs` (under the rule's `kind`) or
//! `adoption_quarantine` (under its reason). A quarantine rule's predicate
//! leaves out the rows an earlier quarantine rule of the same table moves,
//! so a row is counted, and moved, once.

use super::target::queues;

/// What a rule does to the rows it selects.
#[derive(Debug, Clone)]
pub(super) enum Fix {
    /// `column := value` (SQL over the row, the table named in full), the
    /// value before recorded in `adoption_repairs` under `kind`.
    Set {
        column: &'static str,
        value: String,
        kind: String,
        /// More assignments of the same UPDATE (`, c = v`), or empty.
        also: &'static str,
    },
    /// Moved to `adoption_quarantine` with `reason`; never dropped.
    Quarantine { reason: String },
}

/// One rule.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) table: &'static str,
    /// The table's key column (batches, and the repair's subject).
    pub(super) key: &'static str,
    /// The repair's subject, as recorded (SQL).
    pub(super) subject: String,
    /// How one offending row reads in the report (SQL).
    pub(super) example: String,
    /// The problem, as the report names it.
    pub(super) problem: String,
    /// The rows it applies to (SQL over the table's columns).
    pub(super) when: String,
    pub(super) fix: Fix,
}

impl Rule {
    /// What the report says adoption does.
    pub(super) fn action(&self) -> String {
        match &self.fix {
            Fix::Set { column, kind, .. } => format!(
                "{column} repaired (the value before is in adoption_repairs, kind {kind:?})"
            ),
            Fix::Quarantine { reason } => {
                format!("moved to adoption_quarantine (reason {reason:?})")
            }
        }
    }

    /// Where the outcome is recorded: `adoption_repairs: <kind>` or
    /// `adoption_quarantine: <source table>: <reason>`.
    pub(super) fn recorded_as(&self) -> String {
        match &self.fix {
            Fix::Set { kind, .. } => format!("adoption_repairs: {kind}"),
            Fix::Quarantine { reason } => {
                format!("adoption_quarantine: {}: {reason}", self.table)
            }
        }
    }
}

const CONTENT_TYPES: &str = "('post', 'topic', 'private_message')";
const OUTCOMES: &str = "('approved', 'rejected', 'calibrated')";

/// Every rule, in the order adoption applies them. `event_id` tells
/// whether `moderation_events.event_id` exists yet (a forum of the
/// original design has none; a resumed adoption may).
pub(super) fn rules(event_id: bool) -> Vec<Rule> {
    let mut out = event_rules(event_id);
    out.extend(user_rules());
    out.extend(queue_rules());
    // A quarantine rule leaves out what an earlier one of its table moves.
    let mut earlier: Vec<(&'static str, String)> = Vec::new();
    for rule in &mut out {
        if let Fix::Quarantine { .. } = rule.fix {
            let before: Vec<&String> = earlier
                .iter()
                .filter(|(t, _)| *t == rule.table)
                .map(|(_, w)| w)
                .collect();
            let own = rule.when.clone();
            if !before.is_empty() {
                let not: Vec<String> = before
                    .iter()
                    .map(|w| format!("NOT COALESCE(({w}), false)"))
                    .collect();
                rule.when = format!("({own}) AND {}", not.join(" AND "));
            }
            earlier.push((rule.table, own));
        }
    }
    out
}

/// A repair of `column` to `value` (SQL over the row), recorded under `kind`.
fn set(column: &'static str, value: &str, kind: &str) -> Fix {
    Fix::Set {
        column,
        value: value.into(),
        kind: kind.into(),
        also: "",
    }
}

/// A move to the quarantine, with its reason.
fn quarantine(reason: &str) -> Fix {
    Fix::Quarantine {
        reason: reason.into(),
    }
}

/// The events' rules (spellings, then what no rule scores).
fn event_rules(event_id: bool) -> Vec<Rule> {
    let mut out = Vec::new();
    let event = |problem: &str, when: String, fix: Fix| Rule {
        table: "moderation_events",
        key: "id",
        subject: "'event ' || id".into(),
        example:
            "format('id %s: user %s, %s %s, %s', id, user_id, quote_nullable(content_type::TEXT), \
                  quote_nullable(content_id::TEXT), quote_nullable(outcome::TEXT))"
                .into(),
        problem: problem.into(),
        when,
        fix,
    };
    for (column, valid, what) in [
        ("content_type", CONTENT_TYPES, "content type"),
        ("outcome", OUTCOMES, "outcome"),
    ] {
        out.push(event(
            &format!("events whose {what} is spelt otherwise (case, spaces)"),
            format!("{column} NOT IN {valid} AND lower(btrim({column})) IN {valid}"),
            set(
                column,
                &format!("lower(btrim(moderation_events.{column}))"),
                &format!("moderation_events.{column}"),
            ),
        ));
    }
    out.push(event(
        "events with a content type no rule scores",
        format!("content_type IS NULL OR lower(btrim(content_type)) NOT IN {CONTENT_TYPES}"),
        quarantine("a content type no rule scores"),
    ));
    out.push(event(
        "events with an outcome no rule scores",
        format!("outcome IS NULL OR lower(btrim(outcome)) NOT IN {OUTCOMES}"),
        quarantine("an outcome no rule scores"),
    ));
    out.push(event(
        "events without a valid event type or content id (NULL, empty, over 255 bytes)",
        "event_type IS NULL OR octet_length(event_type::TEXT) NOT BETWEEN 1 AND 255 \
         OR content_id IS NULL OR octet_length(content_id::TEXT) NOT BETWEEN 1 AND 255"
            .into(),
        quarantine("no valid event type or content id"),
    ));
    if event_id {
        out.push(event(
            "events with an event id that is empty or over 255 bytes",
            "event_id IS NOT NULL AND octet_length(event_id::TEXT) NOT BETWEEN 1 AND 255".into(),
            quarantine("an event id that is empty or over 255 bytes"),
        ));
    }
    out.push(event(
        "events of users that no longer exist (or of no user: NULL)",
        "user_id IS NULL OR NOT EXISTS (SELECT 1 FROM users u WHERE u.id = moderation_events.user_id)"
            .into(),
        quarantine("the user no longer exists"),
    ));
    out.push(event(
        "events without a time (NULL)",
        "created_at IS NULL".into(),
        // The time of the event recorded just before it, else the adoption's.
        set(
            "created_at",
            "COALESCE((SELECT p.created_at FROM moderation_events p
                       WHERE p.id < moderation_events.id AND p.created_at IS NOT NULL
                       ORDER BY p.id DESC LIMIT 1), now())",
            "moderation_events.created_at (null)",
        ),
    ));

    out
}

/// The users' rules (after the events: a NULL score is the sum of the
/// events that stay).
fn user_rules() -> Vec<Rule> {
    let mut out = Vec::new();
    let user = |problem: &str, when: &str, fix: Fix| Rule {
        table: "users",
        key: "id",
        subject: "'user ' || id".into(),
        example: "format('user %s', id)".into(),
        problem: problem.into(),
        when: when.into(),
        fix,
    };
    out.push(user(
        "users without a name (NULL)",
        "username IS NULL",
        set("username", "'user-' || users.id", "users.username (null)"),
    ));
    out.push(user(
        "users without a sign-up time (NULL)",
        "created_at IS NULL",
        // Their first event's time, else the adoption's.
        set(
            "created_at",
            "COALESCE((SELECT min(e.created_at) FROM moderation_events e WHERE e.user_id = users.id), now())",
            "users.created_at (null)",
        ),
    ));
    out.push(user(
        "users without an update time (NULL)",
        "updated_at IS NULL",
        set(
            "updated_at",
            "COALESCE(users.created_at, now())",
            "users.updated_at (null)",
        ),
    ));
    out.push(user(
        "users without a score (NULL)",
        "loyalty_score IS NULL",
        // A score loyaltyd writes advances its version itself: on a resumed
        // run, whose SQL contract is in place, it is no direct write of the
        // forum's (sql/scoring.sql, users_score_changed), and no credit.
        Fix::Set {
            column: "loyalty_score",
            value: "COALESCE((SELECT sum(e.score_delta) FROM moderation_events e WHERE e.user_id = users.id), 0)".into(),
            kind: "users.loyalty_score (null)".into(),
            also: ", score_version = users.score_version + 1",
        },
    ));

    out
}

/// Each queue's rules.
fn queue_rules() -> Vec<Rule> {
    let mut out = Vec::new();
    for (queue, table, item, scope) in queues() {
        let q = |problem: String, when: String, fix: Fix| Rule {
            table,
            key: item,
            subject: format!("{item}::TEXT"),
            example: format!("quote_nullable({item}::TEXT)"),
            problem,
            when,
            fix,
        };
        out.push(q(
            format!("{queue} queue items with an invalid id, scope or priority"),
            format!(
                "{item} IS NULL OR octet_length({item}::TEXT) NOT BETWEEN 1 AND 255 OR {scope}::TEXT IS NULL \
                 OR octet_length({scope}::TEXT) > 255 OR ({scope}::TEXT = '' AND '{queue}' <> 'topic') \
                 OR priority_score::FLOAT8 IN ('NaN', 'Infinity', '-Infinity')"
            ),
            quarantine("an id, scope or priority that cannot be queued"),
        ));
        // Behind the others of its scope, in entry order (NULL times last).
        let scoped = |alias: &str| {
            if scope == "''" {
                "true".to_owned()
            } else {
                format!("{alias}.{scope} = {table}.{scope}")
            }
        };
        out.push(q(
            format!("{queue} queue items without a position (NULL)"),
            "position_in_queue IS NULL".into(),
            set(
                "position_in_queue",
                &format!(
                    "(SELECT COALESCE(max(q2.position_in_queue), 0) FROM {table} q2 WHERE {s2})
                     + (SELECT count(*) FROM {table} q3 WHERE {s3} AND q3.position_in_queue IS NULL
                          AND (COALESCE(q3.entered_queue_at, 'infinity'), q3.{item})
                            < (COALESCE({table}.entered_queue_at, 'infinity'), {table}.{item})) + 1",
                    s2 = scoped("q2"),
                    s3 = scoped("q3"),
                ),
                &format!("{table}.position_in_queue (null)"),
            ),
        ));
        out.push(q(
            format!("{queue} queue items without an entry time (NULL)"),
            "entered_queue_at IS NULL".into(),
            // The entry time of the item ahead of it, else the adoption's.
            set(
                "entered_queue_at",
                &format!(
                    "COALESCE((SELECT max(q2.entered_queue_at) FROM {table} q2
                               WHERE {s2} AND q2.position_in_queue < {table}.position_in_queue), now())",
                    s2 = scoped("q2"),
                ),
                &format!("{table}.entered_queue_at (null)"),
            ),
        ));
        out.push(q(
            format!("{queue} queue items without a priority (NULL)"),
            "priority_score IS NULL".into(),
            set(
                "priority_score",
                "0",
                &format!("{table}.priority_score (null)"),
            ),
        ));
    }

    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarantine_rule_leaves_out_what_an_earlier_one_moves() {
        let rules = rules(true);
        let user = rules
            .iter()
            .find(|r| r.problem.starts_with("events of users"))
            .unwrap_or_else(|| panic!("no user rule"));
        assert!(user.when.contains("NOT COALESCE((content_type IS NULL"));
        // Set rules keep their own predicate.
        let spelt = &rules[0];
        assert!(!spelt.when.contains("NOT COALESCE"));
        // Every problem is named once, so the report is unambiguous.
        let mut names: Vec<&str> = rules.iter().map(|r| r.problem.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), rules.len());
    }
}
