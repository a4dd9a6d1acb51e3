//! The program's input types, parsed once at the edge (CLI or library caller).
//!
//! After parsing, a value is known good: a [`UserId`] is positive, an [`Ident`]
//! is 1 to 255 bytes of UTF-8 without NUL, a [`Priority`] is finite. Services
//! take these types, so they never re-check and never see a value SPEC §4 forbids.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::Error;

/// Longest identifier accepted, in bytes (SPEC §4).
pub const MAX_IDENT_BYTES: usize = 255;

/// A user id: a positive 64-bit integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(i64);

impl UserId {
    /// Parses a user id, refusing zero and negatives.
    pub fn new(id: i64) -> Result<Self, Error> {
        if id > 0 {
            Ok(UserId(id))
        } else {
            Err(Error::invalid(
                "user id",
                format!("{id} is not a positive 64-bit integer"),
            ))
        }
    }

    /// The id as stored in `users.id`.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for UserId {
    type Error = Error;
    fn try_from(id: i64) -> Result<Self, Error> {
        UserId::new(id)
    }
}

impl FromStr for UserId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let id = s.parse::<i64>().map_err(|_| {
            Error::invalid(
                "user id",
                format!(
                    "{:?} is not a positive 64-bit integer (1 to {})",
                    truncate(s),
                    i64::MAX
                ),
            )
        })?;
        UserId::new(id)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An identifier (content, topic, conversation, event id): 1 to 255 bytes of
/// UTF-8 without NUL, stored and returned byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Ident(String);

impl Ident {
    /// Checks an identifier; `what` names it in the error (e.g. `--content-id`).
    pub fn parse(what: &'static str, s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(Error::invalid(what, "must not be empty"));
        }
        if s.len() > MAX_IDENT_BYTES {
            return Err(Error::invalid(
                what,
                format!(
                    "is {} bytes long; at most {MAX_IDENT_BYTES} are allowed",
                    s.len()
                ),
            ));
        }
        if s.contains('\0') {
            return Err(Error::invalid(what, "must not contain a NUL byte"));
        }
        Ok(Ident(s.to_owned()))
    }

    /// The identifier's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A queue priority: any finite number (higher is served first on reorder).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Default)]
#[serde(transparent)]
pub struct Priority(f64);

impl Priority {
    /// Checks that a priority is finite.
    pub fn new(p: f64) -> Result<Self, Error> {
        if p.is_finite() {
            Ok(Priority(p))
        } else {
            Err(Error::invalid(
                "priority",
                format!("{p} is not a finite number"),
            ))
        }
    }

    /// The priority as stored in `priority_score`.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl FromStr for Priority {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let p = s.trim().parse::<f64>().map_err(|_| {
            Error::invalid("priority", format!("{:?} is not a number", truncate(s)))
        })?;
        Priority::new(p)
    }
}

/// What kind of content a moderation event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ContentType {
    /// A reply in a topic.
    Post,
    /// A new topic.
    Topic,
    /// A private message.
    PrivateMessage,
}

impl ContentType {
    /// Every content type.
    pub const ALL: [ContentType; 3] = [
        ContentType::Post,
        ContentType::Topic,
        ContentType::PrivateMessage,
    ];

    /// The name stored in `moderation_events.content_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Post => "post",
            ContentType::Topic => "topic",
            ContentType::PrivateMessage => "private_message",
        }
    }
}

/// The moderator's decision on a piece of content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Approved.
    Approved,
    /// Rejected.
    Rejected,
    /// Calibrated.
    Calibrated,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 3] = [Outcome::Approved, Outcome::Rejected, Outcome::Calibrated];

    /// The name stored in `moderation_events.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Approved => "approved",
            Outcome::Rejected => "rejected",
            Outcome::Calibrated => "calibrated",
        }
    }
}

/// One of the three moderation queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueKind {
    /// The global topic-creation queue.
    Topic,
    /// Per-topic post moderation queues.
    Post,
    /// Per-conversation private-message queues.
    Message,
}

impl QueueKind {
    /// Every queue.
    pub const ALL: [QueueKind; 3] = [QueueKind::Topic, QueueKind::Post, QueueKind::Message];

    /// The queue's name in the CLI, metrics and perf lists.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Topic => "topic",
            QueueKind::Post => "post",
            QueueKind::Message => "message",
        }
    }

    /// The queue's table, its item column and its scope column (`None`:
    /// one global scope): SQL's `queue_tables()` (sql/queues.sql), which
    /// this is tested against.
    pub fn table(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            QueueKind::Topic => ("topic_creation_queue", "topic_id", None),
            QueueKind::Post => ("post_moderation_queue", "post_id", Some("topic_id")),
            QueueKind::Message => (
                "private_message_queue",
                "message_id",
                Some("conversation_id"),
            ),
        }
    }
}

impl fmt::Display for QueueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which positions an item's position counts among.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The topic queue: one global scope.
    Global,
    /// A post queue: the posts of one topic.
    Topic(Ident),
    /// A message queue: the messages of one conversation.
    Conversation(Ident),
}

impl Scope {
    /// Builds the scope a queue needs from the `--topic` / `--conversation`
    /// arguments, refusing a missing or superfluous one.
    pub fn for_queue(
        queue: QueueKind,
        topic: Option<Ident>,
        conversation: Option<Ident>,
    ) -> Result<Scope, Error> {
        match (queue, topic, conversation) {
            (QueueKind::Topic, None, None) => Ok(Scope::Global),
            (QueueKind::Post, Some(t), None) => Ok(Scope::Topic(t)),
            (QueueKind::Message, None, Some(c)) => Ok(Scope::Conversation(c)),
            (QueueKind::Topic, _, _) => Err(Error::invalid(
                "scope",
                "the topic queue is global: give neither --topic nor --conversation",
            )),
            (QueueKind::Post, None, _) => Err(Error::invalid(
                "scope",
                "the post queue is per topic: give --topic (and no --conversation)",
            )),
            (QueueKind::Post, Some(_), Some(_)) => Err(Error::invalid(
                "scope",
                "the post queue is per topic: give --topic only, not --conversation",
            )),
            (QueueKind::Message, _, None) => Err(Error::invalid(
                "scope",
                "the message queue is per conversation: give --conversation (and no --topic)",
            )),
            (QueueKind::Message, Some(_), Some(_)) => Err(Error::invalid(
                "scope",
                "the message queue is per conversation: give --conversation only, not --topic",
            )),
        }
    }

    /// The scope's key in `queue_scopes.scope`: empty for the global queue.
    pub fn key(&self) -> &str {
        match self {
            Scope::Global => "",
            Scope::Topic(id) | Scope::Conversation(id) => id.as_str(),
        }
    }
}

/// Shortens a hostile argument for an error message.
fn truncate(s: &str) -> String {
    if s.len() <= 40 {
        s.to_owned()
    } else {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_must_be_1_to_255_bytes_without_nul() {
        assert!(Ident::parse("x", "").is_err());
        assert!(Ident::parse("x", "a\0b").is_err());
        assert!(Ident::parse("x", &"é".repeat(128)).is_err()); // 256 bytes
        assert!(Ident::parse("x", &"a".repeat(255)).is_ok());
        let odd = "'; DROP TABLE users; --\r\nFLUSHALL\r\n{hash}";
        assert_eq!(
            Ident::parse("x", odd).map(|i| i.0).ok().as_deref(),
            Some(odd)
        );
    }

    #[test]
    fn user_ids_are_positive_64_bit() {
        assert!("0".parse::<UserId>().is_err());
        assert!("-3".parse::<UserId>().is_err());
        assert!("9223372036854775808".parse::<UserId>().is_err());
        assert_eq!(
            "9223372036854775807"
                .parse::<UserId>()
                .map(UserId::get)
                .ok(),
            Some(i64::MAX)
        );
    }

    #[test]
    fn priorities_are_finite() {
        for bad in ["NaN", "inf", "-inf", "1e999", "", "x"] {
            assert!(bad.parse::<Priority>().is_err(), "{bad} accepted");
        }
        assert_eq!(
            "-2.5".parse::<Priority>().map(Priority::get).ok(),
            Some(-2.5)
        );
    }

    #[test]
    fn each_queue_takes_exactly_its_own_scope() {
        let t = || Some(Ident("t".into()));
        assert_eq!(
            Scope::for_queue(QueueKind::Topic, None, None).ok(),
            Some(Scope::Global)
        );
        assert!(Scope::for_queue(QueueKind::Topic, t(), None).is_err());
        assert!(Scope::for_queue(QueueKind::Post, None, None).is_err());
        assert!(Scope::for_queue(QueueKind::Post, None, t()).is_err());
        assert!(Scope::for_queue(QueueKind::Message, t(), None).is_err());
        assert!(Scope::for_queue(QueueKind::Message, t(), t()).is_err());
        assert!(Scope::for_queue(QueueKind::Message, None, t()).is_ok());
    }
}
