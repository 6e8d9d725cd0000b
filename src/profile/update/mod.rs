//! A profile update (`upsert`, `merge` or `delete` of one profile, by its id) and how input
//! becomes updates: NDJSON, a JSON array or one object, parsed from memory ([`parse_body`],
//! [`locate_body`]) or read from a stream a line at a time ([`UpdateReader`]).
//!
//! Parsing is strict: any unknown field, missing or ill-typed field, or a line that is not JSON
//! refuses the whole input, naming the line (and array item) and the reason. So does a
//! profile whose memberships or identities are not shaped as XDM shapes them (`shape`).
//!
//! `time` reads timestamps and bounds how far ahead they may be; `decode` reads one update and
//! checks it; `body` finds each update of a body and the line it starts on; `reader` reads a
//! stream.

mod body;
mod decode;
mod reader;
mod time;

pub use body::{locate_body, parse_body, parse_body_with, without_bom, BodyItem, LocatedBody};
pub(crate) use decode::json_kind;
pub use decode::{
    update_from_json, update_from_json_with, update_from_value, update_from_value_with,
};
pub use reader::UpdateReader;
pub use time::{format_stored_time, format_time, parse_timestamp, FutureLimit};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::profile::layout::Layout;
use crate::profile::prune::KeepTree;
use crate::profile::record::ProfileRecord;

pub const MAX_ID_BYTES: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Upsert,
    Merge,
    Delete,
}

/// One validated profile update.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub id: String,
    pub op: Op,
    /// The whole profile (`upsert`) or a merge patch (`merge`); empty for `delete`.
    pub profile: Map<String, Value>,
    pub timestamp: Option<DateTime<Utc>>,
    /// For an upsert, its profile as the store keeps it, built ahead by
    /// [`crate::profile::engine::prepare`] on the thread that parsed it, so that the single
    /// committer thread does not; `profile` is then empty. `None`: built when the update is
    /// applied. Only updates on their way to the store are prepared.
    pub record: Option<Box<ProfileRecord>>,
    /// For a merge whose patch takes much memory as a `Value` tree, the patch as JSON text,
    /// made by [`crate::profile::engine::prepare`]: parsed again as it is applied, one at a
    /// time, rather than held as a tree with the rest of its request; `profile` is then empty.
    pub patch_text: Option<Box<str>>,
}

impl Update {
    /// A merge's patch: `profile`, or [`Update::patch_text`] parsed again.
    pub fn patch(&self) -> std::borrow::Cow<'_, Map<String, Value>> {
        match &self.patch_text {
            None => std::borrow::Cow::Borrowed(&self.profile),
            Some(text) => std::borrow::Cow::Owned(
                serde_json::from_str(text).expect("a patch kept as the text of its object"),
            ),
        }
    }

    /// The update as an input line again (the CLI forwards validated updates to the agent).
    /// Not for a prepared update, whose profile is gone.
    pub fn to_value(&self) -> Value {
        debug_assert!(
            self.record.is_none() && self.patch_text.is_none(),
            "a prepared update has no profile left"
        );
        let mut object = Map::new();
        object.insert("id".into(), Value::String(self.id.clone()));
        let op = match self.op {
            Op::Upsert => "upsert",
            Op::Merge => "merge",
            Op::Delete => "delete",
        };
        object.insert("op".into(), Value::String(op.into()));
        if self.op != Op::Delete {
            object.insert("profile".into(), Value::Object(self.profile.clone()));
        }
        if let Some(t) = self.timestamp {
            object.insert("timestamp".into(), Value::String(format_stored_time(t)));
        }
        Value::Object(object)
    }

    /// The length of [`Update::to_value`]'s JSON, without building it (nor copying the
    /// profile): `{"id":…,"op":…,"profile":…,"timestamp":…}`, keys in that order.
    pub fn json_len(&self) -> usize {
        let mut total = r#"{"id":,"op":}"#.len() + json_len(&self.id) + json_len(&self.op);
        if self.op != Op::Delete {
            total += r#","profile":"#.len() + json_len(&self.profile);
        }
        if let Some(t) = self.timestamp {
            total += r#","timestamp":"#.len() + json_len(&format_stored_time(t));
        }
        total
    }
}

/// The length of `value` as JSON, without keeping the text.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value).expect("serializes as JSON");
    counter.0
}

/// What parsing does besides reading the JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct Parsing<'a> {
    /// Refuse timestamps beyond this.
    pub limit: Option<FutureLimit>,
    /// Keep only this part of each profile (what the store keeps, see [`KeepTree`]). The rest
    /// is checked but never built, which saves most of the parse's allocations.
    pub keep: Option<&'a KeepTree>,
    /// Make each upsert its record as soon as it is parsed, while its profile is in the cache
    /// ([`engine::prepare`](crate::profile::engine::prepare)); only for updates on their way to the store.
    pub layout: Option<&'a Layout>,
}

impl Parsing<'_> {
    pub fn within(limit: FutureLimit) -> Self {
        Parsing {
            limit: Some(limit),
            keep: None,
            layout: None,
        }
    }
}

/// Why an input was refused; `line` is 1-based (in a JSON array, where the item starts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct InputError {
    pub line: u64,
    pub reason: String,
}

impl InputError {
    fn new(line: u64, reason: impl Into<String>) -> Self {
        InputError {
            line,
            reason: shortened(reason.into()),
        }
    }
}

/// The most of a name or value from the input that an error quotes between backticks, and
/// the most of an error in all: a key of megabytes would otherwise come back whole in the
/// answer to the producer and in the log. A quote cut short keeps its end too
/// ([`QUOTED_END`] of it): a path's last key says which field is meant.
const QUOTED_AT_MOST: usize = 64;
const QUOTED_END: usize = 20;
const REASON_AT_MOST: usize = 1024;

/// `reason` with each quoted piece longer than [`QUOTED_AT_MOST`] cut in the middle, marked
/// `…`, and all of it cut at [`REASON_AT_MOST`].
fn shortened(reason: String) -> String {
    let mut out = String::with_capacity(reason.len().min(REASON_AT_MOST));
    let mut rest = reason.as_str();
    while let Some(open) = rest.find('`') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let close = rest.find('`').unwrap_or(rest.len());
        out.push_str(&quoted_ends(&rest[..close]));
        rest = &rest[close..];
        if let Some(after) = rest.strip_prefix('`') {
            out.push('`');
            rest = after;
        }
    }
    out.push_str(rest);
    crate::explain::cut_to(out, REASON_AT_MOST)
}

/// `text` as an error quotes it: whole up to [`QUOTED_AT_MOST`] bytes, else its first bytes and
/// its last [`QUOTED_END`] around a `…`. A value quoted so before it goes into a reason is
/// left as it is by [`shortened`], and no more than its ends is copied.
pub(crate) fn quoted_ends(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= QUOTED_AT_MOST {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = text.len() - QUOTED_END;
    while !text.is_char_boundary(end) {
        end += 1;
    }
    let start = truncate(text, QUOTED_AT_MOST - QUOTED_END);
    std::borrow::Cow::Owned(format!("{start}…{}", &text[end..]))
}

/// The longest start of `text` of at most `max` bytes that ends at a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    /// The error `parse_body` refuses `body` with (the tests of `decode` and `body` use it too).
    pub(super) fn error_of(body: &[u8]) -> InputError {
        parse_body(body).expect_err("input should be refused")
    }

    /// A name of the input an error quotes is cut short: a key of megabytes came back whole in
    /// the answer and the log, once for each time the error named it.
    #[test]
    fn errors_quote_only_the_ends_of_a_long_name() {
        let long = "k".repeat(100_000);
        let bodies = [
            format!(r#"{{"id":"a","{long}":1,"profile":{{}}}}"#),
            format!(r#"[{{"id":"a","{long}":1,"profile":{{}}}}]"#),
            format!(r#"{{"id":"a","profile":{{"xdm:{long}":1}}}}"#),
            format!(
                r#"{{"id":"a","profile":{{"segmentMembership":{{"ups":{{"{long}":{{"status":5}}}}}}}}}}"#
            ),
        ];
        for body in bodies {
            let error = error_of(body.as_bytes());
            let start = &body[..40];
            assert!(error.reason.len() <= 300, "{start}: {}", error.reason);
            assert!(
                error
                    .reason
                    .contains(&format!("{}…{}", &long[..10], &long[..10])),
                "{start}: {}",
                error.reason
            );
        }
    }

    /// Values an error quotes are cut as names are, keeping both ends: a `timestamp` was cut
    /// at 64 bytes with no mark (read as whole), an `op` cut twice.
    #[test]
    fn errors_quote_only_the_ends_of_a_long_value() {
        let long = format!(
            "{}{}{}",
            "s".repeat(50),
            "m".repeat(100_000),
            "e".repeat(30)
        );
        let ends = format!("{}…{}", "s".repeat(44), "e".repeat(20));
        for field in ["timestamp", "op"] {
            let body = format!(r#"{{"id":"a","{field}":"{long}","profile":{{}}}}"#);
            let error = error_of(body.as_bytes());
            assert!(
                error.reason.contains(&format!("`{ends}`")),
                "{field}: {}",
                error.reason
            );
        }
        assert_eq!(quoted_ends("short"), "short");
        assert_eq!(quoted_ends(&long), ends);
    }

    #[test]
    fn a_reason_keeps_short_quotes_and_is_cut_at_its_most() {
        let long = format!("{}.status", "b".repeat(60));
        let quoted = format!("`{}` and `{long}` and `x", "a".repeat(64));
        assert_eq!(
            shortened(quoted),
            format!(
                "`{}` and `{}…bbbbbbbbbbbbb.status` and `x",
                "a".repeat(64),
                "b".repeat(44)
            )
        );
        let plain = "é".repeat(600);
        let cut = shortened(plain.clone());
        assert!(
            cut.len() <= REASON_AT_MOST + '…'.len_utf8(),
            "{}",
            cut.len()
        );
        assert_eq!(cut, format!("{}…", &plain[..REASON_AT_MOST]));
        assert_eq!(shortened("plain".into()), "plain");
    }

    #[test]
    fn an_updates_json_len_is_the_length_of_its_json() {
        let body = concat!(
            r#"{"id":"a\u0001é","profile":{"n":"x\"y","z":[1,2.5,null]},"timestamp":"2026-01-01T00:00:05.25Z"}"#,
            "\n",
            r#"{"id":"b","op":"merge","profile":{"n":null}}"#,
            "\n",
            r#"{"id":"c","op":"delete","timestamp":"2026-01-01T00:00:05Z"}"#,
        );
        for update in parse_body(body.as_bytes()).unwrap() {
            assert_eq!(
                update.json_len(),
                update.to_value().to_string().len(),
                "{update:?}"
            );
        }
    }

    #[test]
    fn to_value_round_trips() {
        let body = br#"[{"id":"a","op":"merge","profile":{"x":null},"timestamp":"2026-01-01T00:00:05.123456+02:00"},{"id":"b","op":"delete"},{"id":"c","profile":{"y":[1]}}]"#;
        let updates = parse_body(body).unwrap();
        for (i, update) in updates.iter().enumerate() {
            assert_eq!(
                &update_from_value(update.to_value(), 1).unwrap(),
                update,
                "update {i}"
            );
        }
    }

    #[test]
    fn timestamps_too_far_ahead_are_refused_with_their_line() {
        // Whole seconds, as the lines carry them.
        let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
        let limit = FutureLimit {
            now,
            max_future_s: 60,
        };
        let line = |id: &str, ahead_s: i64| {
            format!(
                r#"{{"id":"{id}","profile":{{}},"timestamp":"{}"}}"#,
                format_time(now + TimeDelta::seconds(ahead_s))
            )
        };
        let ndjson = [line("a", 0), line("b", 30), line("c", 3600)].join("\n");
        assert!(parse_body(ndjson.as_bytes()).is_ok(), "no limit, no check");
        let error = parse_body_with(ndjson.as_bytes(), &Parsing::within(limit)).unwrap_err();
        assert_eq!(error.line, 3);
        assert!(error.reason.contains("3600 s ahead"), "{error}");

        let array = format!("[{},\n{}]", line("a", 0), line("b", 3600));
        let error = parse_body_with(array.as_bytes(), &Parsing::within(limit)).unwrap_err();
        assert_eq!(error.line, 2);
        assert!(error.reason.contains("array item 2"), "{error}");

        let results: Vec<_> = UpdateReader::new(ndjson.as_bytes()).within(limit).collect();
        assert!(results[0].is_ok() && results[1].is_ok());
        assert_eq!(results[2].as_ref().unwrap_err().line, 3);

        let value: Value = serde_json::from_str(&line("c", 3600)).unwrap();
        assert_eq!(
            update_from_value_with(value, 7, &Parsing::within(limit))
                .unwrap_err()
                .line,
            7
        );
        let no_timestamp = br#"{"id":"d","profile":{}}"#;
        assert!(parse_body_with(no_timestamp, &Parsing::within(limit)).is_ok());
    }
}
