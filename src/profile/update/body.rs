//! Where each update of a body lies, and the line it starts on: NDJSON (one update a line, or
//! values wherever they start and end), a JSON array of updates, or one object. A body is
//! refused at its first bad update, named by its line (and array item).

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};
use serde_json::value::RawValue;

use super::decode::{
    beyond_what_is_read, is_gzip, not_utf8_before, strip_serde_position, update_from_json_with,
    GZIP_DATA, NOT_UTF8,
};
use super::{InputError, Parsing, Update};

/// JSON's whitespace (RFC 8259): not Rust's ASCII whitespace, which also takes a form feed.
fn is_json_space(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// `text` without JSON whitespace at either end.
pub(super) fn trim_json_space(text: &[u8]) -> &[u8] {
    let start = text.iter().position(|b| !is_json_space(b));
    let end = text.iter().rposition(|b| !is_json_space(b));
    match (start, end) {
        (Some(start), Some(end)) => &text[start..=end],
        _ => &[],
    }
}

/// Parses a whole body: NDJSON (also several objects on a line, or pretty-printed objects),
/// a JSON array of updates, or one object. An empty body is an error.
pub fn parse_body(body: &[u8]) -> Result<Vec<Update>, InputError> {
    parse_body_with(body, &Parsing::default())
}

/// [`parse_body`] with [`Parsing`]'s checks (naming the line refused) and pruning.
pub fn parse_body_with(body: &[u8], parsing: &Parsing) -> Result<Vec<Update>, InputError> {
    let mut updates = Vec::new();
    parse_into(body, parsing, &mut updates)?;
    Ok(updates)
}

/// Where one update's text lies in a body and the line it starts on: enough to parse it again
/// ([`BodyItem::parse`]) without keeping what it parsed into.
#[derive(Debug, Clone, Copy)]
pub struct BodyItem<'b> {
    text: &'b [u8],
    line: u64,
    /// Its place in a body that is a JSON array, from 1.
    array_item: Option<usize>,
}

impl BodyItem<'_> {
    /// Parses the update as [`parse_body_with`] did, with the same `parsing`.
    pub fn parse(&self, parsing: &Parsing) -> Result<Update, InputError> {
        update_from_json_with(self.text, self.line, parsing).map_err(|mut e| {
            if let Some(item) = self.array_item {
                e.reason = format!("array item {item}: {}", e.reason);
            }
            e
        })
    }
}

/// A body's updates, each checked as [`parse_body_with`] checks it: the first ones parsed, and
/// the others kept only as where they lie, to be parsed again a chunk at a time, so that a
/// large body is not held parsed whole while it is stored.
#[derive(Debug, Default)]
pub struct LocatedBody<'b> {
    /// The first updates, up to the number asked for.
    pub first: Vec<Update>,
    body: &'b [u8],
    /// Where in `body` each update after those lies, in 16 bytes: a delete is hardly longer.
    /// Its line and array item are found again from it ([`LocatedBody::rest`]).
    rest: Vec<std::ops::Range<usize>>,
    /// Whether the body is a JSON array, whose updates are numbered as its items.
    in_array: bool,
    /// The [`id_hash`](crate::source::partition::id_hash) of each update of `rest`: enough to
    /// tell its partition, in 8 bytes (an update can be shorter than its id's `String`).
    pub rest_id_hashes: Vec<u64>,
    keep: usize,
}

/// [`parse_body_with`], keeping the first `keep` updates parsed and of the others only where
/// they lie ([`LocatedBody`]). Refuses what it refuses, with the same error.
pub fn locate_body<'b>(
    body: &'b [u8],
    parsing: &Parsing,
    keep: usize,
) -> Result<LocatedBody<'b>, InputError> {
    let mut located = LocatedBody {
        keep,
        body,
        ..LocatedBody::default()
    };
    parse_into(body, parsing, &mut located)?;
    Ok(located)
}

impl<'b> LocatedBody<'b> {
    /// How many updates the body holds.
    pub fn count(&self) -> usize {
        self.first.len() + self.rest.len()
    }

    /// The updates after the first ones, in order, each as [`parse_body_with`] found it.
    pub fn rest(&self) -> impl Iterator<Item = BodyItem<'b>> + '_ {
        let mut lines = LineCounter::default();
        self.rest.iter().enumerate().map(move |(i, range)| {
            let body: &'b [u8] = self.body;
            BodyItem {
                text: &body[range.clone()],
                line: lines.line_at(body, range.start),
                // Those kept parsed come first, as many as asked for.
                array_item: self.in_array.then_some(self.keep + i + 1),
            }
        })
    }

    /// Every update, when all of them were kept parsed (the body is then no longer needed);
    /// else the located body itself.
    pub fn all_parsed(self) -> Result<Vec<Update>, Self> {
        if self.rest.is_empty() {
            Ok(self.first)
        } else {
            Err(self)
        }
    }
}

/// What takes a body's updates as they are parsed, in order.
trait UpdateSink<'b> {
    /// Whether the next update is kept: one that is not is only checked.
    fn keeps_next(&self) -> bool;
    fn take(&mut self, item: BodyItem<'b>, update: Update);
    /// Drops what was taken: the body is parsed again from its start (its lines turned out not
    /// to be one update each).
    fn restart(&mut self);
}

impl<'b> UpdateSink<'b> for Vec<Update> {
    fn keeps_next(&self) -> bool {
        true
    }

    fn take(&mut self, _: BodyItem<'b>, update: Update) {
        self.push(update);
    }

    fn restart(&mut self) {
        self.clear();
    }
}

impl<'b> UpdateSink<'b> for LocatedBody<'b> {
    fn keeps_next(&self) -> bool {
        self.first.len() < self.keep
    }

    fn take(&mut self, item: BodyItem<'b>, update: Update) {
        if self.keeps_next() {
            self.first.push(update);
        } else {
            // The item's text is a slice of the body.
            let start = item.text.as_ptr() as usize - self.body.as_ptr() as usize;
            self.rest.push(start..start + item.text.len());
            self.in_array = item.array_item.is_some();
            self.rest_id_hashes
                .push(crate::source::partition::id_hash(&update.id));
        }
    }

    fn restart(&mut self) {
        self.first.clear();
        self.rest.clear();
        self.rest_id_hashes.clear();
    }
}

/// Parses `item`, handing the update to `sink`.
fn parse_item<'b>(
    item: BodyItem<'b>,
    parsing: &Parsing,
    sink: &mut impl UpdateSink<'b>,
) -> Result<(), InputError> {
    let update = if sink.keeps_next() {
        item.parse(parsing)?
    } else {
        // Not made its record (which cannot fail), since it is dropped.
        let checking = Parsing {
            layout: None,
            ..*parsing
        };
        item.parse(&checking)?
    };
    sink.take(item, update);
    Ok(())
}

fn parse_into<'b>(
    body: &'b [u8],
    parsing: &Parsing,
    sink: &mut impl UpdateSink<'b>,
) -> Result<(), InputError> {
    let body = without_bom(body);
    let start = body.iter().position(|b| !is_json_space(b));
    let Some(start) = start else {
        return Err(InputError::new(1, "the input holds no update"));
    };
    if body[start] == b'[' {
        return parse_array(body, start, parsing, sink);
    }
    if parse_lines(body, parsing, sink) {
        return Ok(());
    }
    sink.restart();
    parse_values(body, parsing, sink)
}

/// The general way through a body that is not an array: value after value, wherever each
/// starts and ends.
fn parse_values<'b>(
    body: &'b [u8],
    parsing: &Parsing,
    sink: &mut impl UpdateSink<'b>,
) -> Result<(), InputError> {
    let mut stream = serde_json::Deserializer::from_slice(body).into_iter::<&RawValue>();
    let mut lines = LineCounter::default();
    loop {
        // The line of the next value: where its first byte is.
        let offset = stream.byte_offset();
        let next_start = body[offset..]
            .iter()
            .position(|b| !is_json_space(b))
            .map(|p| offset + p);
        let Some(next_start) = next_start else { break };
        let line = lines.line_at(body, next_start);
        match stream.next() {
            None => break,
            Some(Ok(raw)) => {
                let item = BodyItem {
                    text: raw.get().as_bytes(),
                    line,
                    array_item: None,
                };
                parse_item(item, parsing, sink)?
            }
            Some(Err(e)) => {
                if is_gzip(&body[next_start..]) {
                    return Err(InputError::new(line, GZIP_DATA));
                }
                // An unfinished value is reported at the line where it starts.
                let error_line = if e.is_eof() || e.line() == 0 {
                    line
                } else {
                    syntax_error_line(&e)
                };
                if not_utf8_before(body, &e) {
                    return Err(InputError::new(error_line, NOT_UTF8));
                }
                let mut reason = match beyond_what_is_read(&e) {
                    Some(reason) => reason.to_owned(),
                    None => format!("not valid JSON: {}", strip_serde_position(e.to_string())),
                };
                // Found past its update's first line: a closing brace left out shows only
                // where the next update begins, so the line it is missing from is named too.
                if error_line > line {
                    reason.push_str(&format!(" (in the update that starts on line {line})"));
                }
                return Err(InputError::new(error_line, reason));
            }
        }
    }
    Ok(())
}

/// Parses a body whose first byte that is not whitespace, at `bracket`, is `[`.
fn parse_array<'b>(
    body: &'b [u8],
    bracket: usize,
    parsing: &Parsing,
    sink: &mut impl UpdateSink<'b>,
) -> Result<(), InputError> {
    let refused = |e: serde_json::Error, context: String| {
        let reason = match not_utf8_before(body, &e) {
            true => NOT_UTF8.to_owned(),
            false => strip_serde_position(e.to_string()),
        };
        InputError::new(
            syntax_error_line(&e),
            format!("not a valid JSON array: {reason}{context}"),
        )
    };
    let mut values: Vec<&RawValue> = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    if let Err(e) = ArrayItems(&mut values).deserialize(&mut deserializer) {
        // serde names no position inside the array, and a whole array is often one line.
        let context = where_in_array(body, bracket, &values, syntax_error_line(&e));
        return Err(refused(e, context));
    }
    deserializer.end().map_err(|e| refused(e, String::new()))?;
    let mut lines = LineCounter::default();
    if values.is_empty() {
        let line = lines.line_at(body, bracket);
        return Err(InputError::new(line, "the input holds no update"));
    }
    for (i, value) in values.into_iter().enumerate() {
        let text = value.get().as_bytes();
        // The item's text is a slice of `body`: its offset gives its line.
        let offset = text.as_ptr() as usize - body.as_ptr() as usize;
        let item = BodyItem {
            text,
            line: lines.line_at(body, offset),
            array_item: Some(i + 1),
        };
        parse_item(item, parsing, sink)?;
    }
    Ok(())
}

/// Where in an array a syntax error at `error_line` lies, from the items read whole before
/// it: " (in array item N)", with the line it starts on if that is another, or " (after
/// array item N)" when an item ended and no comma or bracket followed.
fn where_in_array(body: &[u8], bracket: usize, read: &[&RawValue], error_line: u64) -> String {
    let skip_space =
        |from: usize| from + body[from..].iter().take_while(|b| is_json_space(b)).count();
    let after_read = skip_space(read.last().map_or(bracket + 1, |last| end_of(last, body)));
    let (item, start) = match (read.len(), body.get(after_read)) {
        (0, None | Some(b']')) => return String::new(),
        (0, Some(_)) => (1, after_read),
        (n, Some(b',')) => (n + 1, skip_space(after_read + 1)),
        (n, _) => return format!(" (after array item {n})"),
    };
    let start_line = LineCounter::default().line_at(body, start.min(body.len()));
    if start_line == error_line {
        format!(" (in array item {item})")
    } else {
        format!(" (in array item {item}, which starts on line {start_line})")
    }
}

/// The items of a JSON array as their text, each kept as it is read, so that those read
/// before a syntax error tell where it is.
struct ArrayItems<'v, 'de>(&'v mut Vec<&'de RawValue>);

impl<'de> DeserializeSeed<'de> for ArrayItems<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ArrayItems<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while let Some(item) = items.next_element()? {
            self.0.push(item);
        }
        Ok(())
    }
}

/// The offset in `body` just past `item`, a slice of it.
fn end_of(item: &RawValue, body: &[u8]) -> usize {
    item.get().as_ptr() as usize + item.get().len() - body.as_ptr() as usize
}

/// The input without a UTF-8 byte-order mark at its start, which editors on Windows write and
/// RFC 8259 lets a parser ignore.
pub fn without_bom(input: &[u8]) -> &[u8] {
    input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input)
}

/// 1-based line numbers of offsets into a body, asked for in increasing order.
#[derive(Default)]
struct LineCounter {
    scanned: usize,
    newlines: u64,
}

impl LineCounter {
    fn line_at(&mut self, body: &[u8], offset: usize) -> u64 {
        self.newlines += body[self.scanned..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        self.scanned = offset;
        self.newlines + 1
    }
}

/// NDJSON as it is mostly sent, one update a line: each line parsed as it is, without the pass
/// that first finds where each value ends. False when a line is not exactly one update that
/// is taken: the body then goes the general way, which finds the same updates, since a line
/// that holds exactly one value holds the value the general way finds there, and names the
/// first error.
fn parse_lines<'b>(body: &'b [u8], parsing: &Parsing, sink: &mut impl UpdateSink<'b>) -> bool {
    for (index, line) in body.split(|&b| b == b'\n').enumerate() {
        // JSON's whitespace, as the general way passes over it between values.
        if line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r')) {
            continue;
        }
        let item = BodyItem {
            text: line,
            line: index as u64 + 1,
            array_item: None,
        };
        if parse_item(item, parsing, sink).is_err() {
            return false;
        }
    }
    true
}

/// The line of a syntax error. serde_json counts the newline it failed on (a value cut short
/// at the end of its line) into the next line, at column 0: that is the line it ends.
fn syntax_error_line(e: &serde_json::Error) -> u64 {
    match (e.line(), e.column()) {
        (line, 0) if line > 1 => line as u64 - 1,
        (line, _) => line.max(1) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::layout::Layout;
    use crate::profile::prune::KeepTree;
    use crate::profile::update::tests::error_of;
    use crate::profile::update::{FutureLimit, Op, UpdateReader};
    use crate::source::partition::id_hash;
    use serde_json::Value;

    #[test]
    fn ndjson_array_and_single_object_are_accepted() {
        let ndjson = b"{\"id\":\"a\",\"profile\":{}}\n\n{\"id\":\"b\",\"op\":\"delete\"}\n";
        let updates = parse_body(ndjson).unwrap();
        assert_eq!(updates.len(), 2);
        assert_eq!(updates[1].op, Op::Delete);

        let array = br#"[{"id":"a","profile":{}},{"id":"b","op":"merge","profile":{"x":null}}]"#;
        let updates = parse_body(array).unwrap();
        assert_eq!(updates[1].op, Op::Merge);
        assert_eq!(updates[1].profile["x"], Value::Null);

        let pretty = b"{\n  \"id\": \"a\",\n  \"profile\": {}\n}\n";
        assert_eq!(parse_body(pretty).unwrap().len(), 1);
    }

    /// serde gives no position inside an array but its line, and an array is often one line:
    /// the item the error lies in (or after) is named.
    #[test]
    fn a_syntax_error_in_an_array_names_its_item() {
        let a = r#"{"id":"a","profile":{}}"#;
        let cases = [
            (
                format!(r#"[{a},{a},{{"id":"c",}}]"#),
                1,
                "not a valid JSON array: key must be a string (in array item 3)",
            ),
            (
                format!(r#"[{a} {a}]"#),
                1,
                "not a valid JSON array: expected `,` or `]` (after array item 1)",
            ),
            (
                r#"[{"id":"a",]"#.to_owned(),
                1,
                "not a valid JSON array: key must be a string (in array item 1)",
            ),
            (
                format!("[\n{a},\n{{\"id\":\"b\",\n\"profile\":{{}}\n,}}]"),
                5,
                "not a valid JSON array: key must be a string (in array item 2, which starts on line 3)",
            ),
            (
                format!("[{a},\n]"),
                2,
                "not a valid JSON array: trailing comma (in array item 2)",
            ),
            (
                format!("[{a}"),
                1,
                "not a valid JSON array: EOF while parsing a list (after array item 1)",
            ),
            (
                format!("[{a}] x"),
                1,
                "not a valid JSON array: trailing characters",
            ),
            (
                "[".to_owned(),
                1,
                "not a valid JSON array: EOF while parsing a list",
            ),
            // JSON that serde_json does not read is not called invalid either.
            (
                format!(
                    "[{a},\n{{\"id\":\"b\",\"profile\":{{\"x\":{}1{}}}}}]",
                    "[".repeat(200),
                    "]".repeat(200)
                ),
                2,
                "array item 2: arrays and objects are nested more than 128 deep, more than \
                 outpost reads",
            ),
            (
                format!(r#"[{a},{{"id":"b","profile":{{"x":1e400}}}}]"#),
                1,
                "array item 2: a number is beyond what a double holds (about ±1.8e308), so it \
                 cannot be kept: send it as a string",
            ),
        ];
        for (body, line, reason) in cases {
            let error = parse_body(body.as_bytes()).unwrap_err();
            assert_eq!(
                (error.line, error.reason.as_str()),
                (line, reason),
                "{body}"
            );
        }
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_ignored() {
        let ndjson =
            b"\xEF\xBB\xBF{\"id\":\"a\",\"profile\":{}}\n{\"id\":\"b\",\"op\":\"delete\"}\n";
        let array =
            b"\xEF\xBB\xBF[{\"id\":\"a\",\"profile\":{}},\n{\"id\":\"b\",\"op\":\"delete\"}]";
        for body in [&ndjson[..], &array[..]] {
            let parsed = parse_body(body).unwrap();
            assert_eq!(parsed.len(), 2);
            let read: Vec<_> = UpdateReader::new(body).collect::<Result<_, _>>().unwrap();
            assert_eq!(read, parsed);
        }
        // Only at the start.
        let later =
            b"{\"id\":\"a\",\"profile\":{}}\n\xEF\xBB\xBF{\"id\":\"b\",\"op\":\"delete\"}\n";
        assert_eq!(error_of(later).line, 2);
    }

    /// One update a line is parsed line by line; every other body goes the general way, and
    /// either way the updates, or the first error, are those the general way finds.
    #[test]
    fn bodies_parsed_line_by_line_read_as_the_general_way_reads_them() {
        let mapping = crate::config::Mapping::new(&["person.name.firstName"], &["s"], &[]);
        let keep = KeepTree::for_mapping(&mapping);
        let layout = Layout::new(&mapping);
        let ingest = Parsing {
            keep: Some(&keep),
            layout: Some(&layout),
            ..Parsing::default()
        };
        let sample = crate::demo::SAMPLE_UPDATES;
        let a = r#"{"id":"a","profile":{"person":{"name":{"firstName":"A"}}}}"#;
        let b = r#"{"id":"b","op":"delete"}"#;
        // (body, whether it is parsed line by line)
        let bodies: Vec<(String, bool)> = vec![
            (sample.to_owned(), true),
            (sample.replace('\n', "\r\n"), true),
            (format!("\n{a}\n \t\r\n\n{b}  \n\n"), true),
            (format!("{a}\n{b}"), true),
            (format!("\u{feff}{a}\n \t{b}\t \r\n"), true),
            (format!("{a} {b}\n{a}"), false),
            // Two lines taken before the fast way fails: what it took is dropped.
            (format!("{a}\n{b}\n{a} {b}"), false),
            (
                format!("{a}\n{{\n\"id\":\"c\",\n\"profile\":{{}}\n}}\n{b}"),
                false,
            ),
            (format!("{a}\n{b}\n{{\"id\":\"\"}}\n{a}"), false),
            (format!("{a}\n\u{c}\n{b}"), false),
            (format!("{a}\n12\n"), false),
            (format!("{a}\n{{\"id\":\"c\","), false),
        ];
        for parsing in [Parsing::default(), ingest] {
            for (body, by_line) in &bodies {
                let body = body.as_bytes();
                // As `parse_body_with` hands the body on.
                let without = without_bom(body);
                assert_eq!(
                    parse_lines(without, &parsing, &mut Vec::new()),
                    *by_line,
                    "{body:?}"
                );
                let seen = |r: Result<Vec<Update>, InputError>| r.map_err(|e| (e.line, e.reason));
                let mut general = Vec::new();
                let general_way = parse_values(without, &parsing, &mut general).map(|()| general);
                assert_eq!(
                    seen(parse_body_with(body, &parsing)),
                    seen(general_way),
                    "{body:?}"
                );
                // Located, the first one kept parsed, the others parsed again item by item:
                // the same updates, or error.
                let again = locate_body(body, &parsing, 1).and_then(|located| {
                    assert_eq!(located.rest_id_hashes.len(), located.rest.len());
                    let rest: Vec<Update> = located
                        .rest()
                        .map(|item| item.parse(&parsing))
                        .collect::<Result<_, _>>()?;
                    assert_eq!(located.first.len(), 1);
                    let ids: Vec<u64> = rest.iter().map(|u| id_hash(&u.id)).collect();
                    assert_eq!(located.rest_id_hashes, ids);
                    Ok(located.first.into_iter().chain(rest).collect::<Vec<_>>())
                });
                assert_eq!(
                    seen(again),
                    seen(parse_body_with(body, &parsing)),
                    "{body:?}"
                );
            }
        }
        assert_eq!(
            parse_body(sample.as_bytes()).unwrap().len(),
            sample.lines().count()
        );
    }

    /// An update kept only as where it lies is named, parsed again, by the line (and array
    /// item) the whole body's parse names it by: a byte-order mark, blank lines, CRLF, a
    /// value over several lines, an array.
    #[test]
    fn an_update_located_is_named_again_by_its_line_and_item() {
        let limit = FutureLimit {
            now: "2020-01-01T00:00:00Z".parse().unwrap(),
            max_future_s: 0,
        };
        let late = |id: &str| {
            format!(r#"{{"id":"{id}","profile":{{}},"timestamp":"2026-01-01T00:00:00Z"}}"#)
        };
        let (a, b) = (late("a"), late("b"));
        let multi_line = late("b").replacen(',', ",\n", 1);
        let bodies = [
            (format!("\u{feff}{a}\n\n{b}\r\n"), [(1, None), (3, None)]),
            (format!("{a}\n\n{multi_line}\n"), [(1, None), (3, None)]),
            (format!("[\n{a},\n\n {b}]"), [(2, Some(1)), (4, Some(2))]),
        ];
        for (body, named) in bodies {
            for keep in [0, 1] {
                let located = locate_body(body.as_bytes(), &Parsing::default(), keep).unwrap();
                let found: Vec<(u64, Option<usize>)> = located
                    .rest()
                    .map(|item| {
                        let refused = item.parse(&Parsing::within(limit)).unwrap_err();
                        let item = refused
                            .reason
                            .strip_prefix("array item ")
                            .map(|rest| rest.split(':').next().unwrap().parse().unwrap());
                        (refused.line, item)
                    })
                    .collect();
                assert_eq!(found, named[keep..], "{body:?}, {keep} kept");
            }
            let whole = parse_body_with(body.as_bytes(), &Parsing::within(limit)).unwrap_err();
            assert_eq!(whole.line, named[0].0, "{body:?}");
        }
    }

    #[test]
    fn a_located_array_parses_again_into_its_items() {
        let body = b"[\n{\"id\":\"a\",\"profile\":{}},\n {\"id\":\"b\",\"op\":\"delete\"}]";
        let located = locate_body(body, &Parsing::default(), 2).unwrap();
        assert_eq!(located.first, parse_body(body).unwrap());
        assert!(located.rest.is_empty());
        let located = locate_body(body, &Parsing::default(), 0).unwrap();
        assert_eq!(located.rest_id_hashes, [id_hash("a"), id_hash("b")]);
        let again: Vec<Update> = located
            .rest()
            .map(|item| item.parse(&Parsing::default()).unwrap())
            .collect();
        assert_eq!(again, parse_body(body).unwrap());
        // Parsed again with other checks, an item is named as parse_body names it.
        let limit = FutureLimit {
            now: "2020-01-01T00:00:00Z".parse().unwrap(),
            max_future_s: 0,
        };
        let late = br#"[{"id":"a","profile":{}},{"id":"b","profile":{},"timestamp":"2026-01-01T00:00:00Z"}]"#;
        let located = locate_body(late, &Parsing::default(), 0).unwrap();
        assert!(located.first.is_empty());
        let refused = located
            .rest()
            .nth(1)
            .unwrap()
            .parse(&Parsing::within(limit))
            .unwrap_err();
        let whole = parse_body_with(late, &Parsing::within(limit)).unwrap_err();
        assert_eq!((refused.line, &refused.reason), (whole.line, &whole.reason));
        assert!(refused.reason.starts_with("array item 2: "), "{refused}");
    }

    /// A form feed is not JSON whitespace: refused wherever it stands, by the body parser and
    /// the streaming reader alike (Rust's ASCII whitespace takes it).
    #[test]
    fn a_form_feed_is_refused_at_its_line() {
        for (input, line) in [
            (&b"{\"id\":\"a\",\"profile\":{}}\n\x0c"[..], 2),
            (
                &b"{\"id\":\"a\",\"profile\":{}}\n\x0c{\"id\":\"b\",\"profile\":{}}\n"[..],
                2,
            ),
            (&b"\x0c{\"id\":\"a\",\"profile\":{}}\n"[..], 1),
            (&b"\x0c"[..], 1),
        ] {
            let shown = String::from_utf8_lossy(input);
            let error = parse_body(input).expect_err(&shown);
            assert_eq!(error.line, line, "{shown:?}: {error}");
            let read: Result<Vec<_>, _> = UpdateReader::new(input).collect();
            let error = read.expect_err(&shown);
            assert_eq!(error.line, line, "{shown:?}: {error}");
        }
    }
}
