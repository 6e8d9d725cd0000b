//! Updates read from a stream ([`BufRead`]) a line at a time, rather than from a body held
//! whole in memory.

use std::io::BufRead;

use serde::de;

use super::body::{parse_body_with, trim_json_space, without_bom};
use super::decode::update_from_json_with;
use super::{FutureLimit, InputError, Parsing, Update};
use crate::profile::layout::Layout;
use crate::profile::prune::KeepTree;

/// Reads NDJSON from a stream one line at a time, so memory stays bounded by the longest line.
///
/// Input that is not one object per line (an array, a pretty-printed object) is read whole and
/// handed to [`parse_body`](super::parse_body).
pub struct UpdateReader<'k, R> {
    reader: R,
    line: u64,
    bytes_read: u64,
    buffer: Vec<u8>,
    whole: Option<std::vec::IntoIter<Update>>,
    saw_update: bool,
    parsing: Parsing<'k>,
}

impl<'k, R: BufRead> UpdateReader<'k, R> {
    pub fn new(reader: R) -> Self {
        UpdateReader {
            reader,
            line: 0,
            bytes_read: 0,
            buffer: Vec::new(),
            whole: None,
            saw_update: false,
            parsing: Parsing::default(),
        }
    }

    /// The line the reader is at: the last one read.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// How many bytes of input it has read.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Refuses timestamps beyond `limit`.
    pub fn within(mut self, limit: FutureLimit) -> Self {
        self.parsing.limit = Some(limit);
        self
    }

    /// Keeps only the part of each profile `keep` keeps.
    pub fn keeping(mut self, keep: &'k KeepTree) -> Self {
        self.parsing.keep = Some(keep);
        self
    }

    /// Makes each upsert its record as it is read ([`Parsing::layout`]): only for updates on
    /// their way to the store.
    pub fn preparing(mut self, layout: &'k Layout) -> Self {
        self.parsing.layout = Some(layout);
        self
    }

    /// Reads the rest of the input from the current line and parses it whole. The lines before
    /// it (all blank) are kept as newlines, so every line an error names is the input's own.
    fn read_rest_whole(&mut self) -> Result<(), InputError> {
        let mut all = vec![b'\n'; self.line as usize - 1];
        all.append(&mut self.buffer);
        let read = self
            .reader
            .read_to_end(&mut all)
            .map_err(|e| InputError::new(self.line, format!("cannot read input: {e}")))?;
        self.bytes_read += read as u64;
        let updates = parse_body_with(&all, &self.parsing)?;
        self.whole = Some(updates.into_iter());
        Ok(())
    }
}

impl<R: BufRead> Iterator for UpdateReader<'_, R> {
    type Item = Result<Update, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(whole) = &mut self.whole {
            return whole.next().map(Ok);
        }
        loop {
            self.buffer.clear();
            let read = match self.reader.read_until(b'\n', &mut self.buffer) {
                Ok(n) => n,
                Err(e) => {
                    return Some(Err(InputError::new(
                        self.line + 1,
                        format!("cannot read input: {e}"),
                    )))
                }
            };
            self.bytes_read += read as u64;
            if read == 0 {
                if !self.saw_update {
                    self.saw_update = true;
                    // Blank lines alone, as the ingest API names them: at line 1.
                    return Some(Err(InputError::new(1, "the input holds no update")));
                }
                return None;
            }
            self.line += 1;
            let text = match self.line {
                1 => trim_json_space(without_bom(&self.buffer)),
                _ => trim_json_space(&self.buffer),
            };
            if text.is_empty() {
                continue;
            }
            if !self.saw_update
                && (text[0] == b'['
                    || serde_json::from_slice::<de::IgnoredAny>(text).is_err_and(|e| e.is_eof()))
            {
                // Not one object per line: an array or a multi-line object. Read it whole.
                self.saw_update = true;
                if let Err(e) = self.read_rest_whole() {
                    return Some(Err(e));
                }
                return self.next();
            }
            self.saw_update = true;
            return Some(update_from_json_with(text, self.line, &self.parsing));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::update::parse_body;

    #[test]
    fn reader_streams_lines_and_matches_parse_body() {
        let text = "{\"id\":\"a\",\"profile\":{}}\n\n{\"id\":\"b\",\"op\":\"delete\"}\n{\"id\":\"c\",\"profile\":{},\"zz\":1}\n";
        let results: Vec<_> = UpdateReader::new(text.as_bytes()).collect();
        assert_eq!(results.len(), 3);
        assert!(results[0].is_ok() && results[1].is_ok());
        assert_eq!(results[2].as_ref().unwrap_err().line, 4);

        for whole in [
            "[{\"id\":\"a\",\"profile\":{}}]",
            "{\n\"id\":\"a\",\n\"profile\":{}\n}\n",
        ] {
            let results: Vec<_> = UpdateReader::new(whole.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(results, parse_body(whole.as_bytes()).unwrap());
        }
        // Read whole after blank lines: the lines named are the input's own.
        let unfinished = "\n\n{\n\"id\":\"a\",\n\"profile\":{}\n{\"id\":\"b\",\"profile\":{}}\n";
        let results: Vec<_> = UpdateReader::new(unfinished.as_bytes()).collect();
        let error = results[0].as_ref().unwrap_err();
        assert_eq!(error.line, 6, "{error}");
        assert!(
            error
                .reason
                .ends_with("(in the update that starts on line 3)"),
            "{error}"
        );
        let empty: Vec<_> = UpdateReader::new(&b"\n \n[ ]\n"[..]).collect();
        assert!(
            matches!(empty.as_slice(), [Err(e)] if e.line == 3 && e.reason.contains("no update")),
            "{empty:?}"
        );
        let empty: Vec<_> = UpdateReader::new(&b""[..]).collect();
        assert!(matches!(empty.as_slice(), [Err(e)] if e.reason.contains("no update")));
        let blank: Vec<_> = UpdateReader::new(&b"\n\n\n"[..]).collect();
        assert!(
            matches!(blank.as_slice(), [Err(e)] if e.line == 1 && e.reason.contains("no update")),
            "{blank:?}"
        );
    }
}
