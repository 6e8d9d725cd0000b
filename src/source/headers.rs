//! Whether the NATS client can read a stream message's header block (pure).
//!
//! async-nats reads the header block of every message it is delivered. One it cannot read
//! (not UTF-8, say, as a producer in another language may write) breaks the connection; one
//! whose first line carries a status it takes for the server's answer to the fetch, and
//! drops. Either way the message comes again at the next fetch, and does the same again: such
//! a message would stop its partition for good. The agent then reads the partition's next
//! messages by their stream sequence (the JetStream API gives a message's headers as base64
//! in JSON, which the client does not parse), up to and including the first whose headers the
//! client cannot read; this tells that one apart.

use std::str::FromStr;

/// Why async-nats (0.51) cannot read `header`, a message's header block, as a message's
/// headers, as its parser refuses it or takes it for a status from the server; `None` when
/// it can.
pub fn unreadable_headers(header: &[u8]) -> Option<String> {
    let Ok(text) = std::str::from_utf8(header) else {
        return Some("its header block is not UTF-8".into());
    };
    let mut lines = text.lines().peekable();
    let Some(version) = lines.next() else {
        return Some("its header block is empty".into());
    };
    let Some(after_version) = version.strip_prefix("NATS/1.0") else {
        return Some("its header block does not begin with `NATS/1.0`".into());
    };
    let status = after_version.trim().split(' ').next().unwrap_or_default();
    // A 200 is what the client takes a message without a status for.
    if !status.is_empty() && status != "200" {
        return Some(format!(
            "its header block carries a status ({status}), which the client takes for one from the server"
        ));
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return Some("a line of its header block holds no `:`".into());
        };
        if async_nats::HeaderName::from_str(name).is_err() {
            return Some("a header name holds a character a header name may not".into());
        }
        // A value may go on over lines that start with whitespace.
        while lines
            .next_if(|l| l.starts_with(char::is_whitespace))
            .is_some()
        {}
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_the_client_reads_and_those_it_cannot() {
        let readable: &[&[u8]] = &[
            b"NATS/1.0\r\n\r\n",
            b"NATS/1.0\r\nNats-Msg-Id: p1-3\r\n\r\n",
            b"NATS/1.0\r\nX-Src: caf\xc3\xa9\r\n\r\n",
            b"NATS/1.0\r\nX-Long: first\r\n  and more\r\nX-Next: 2\r\n\r\n",
            b"NATS/1.0 200\r\nNats-Msg-Id: p1-3\r\n\r\n",
            b"NATS/1.0 200 OK\r\n\r\n",
        ];
        for header in readable {
            assert_eq!(unreadable_headers(header), None, "{header:?}");
        }
        let unreadable: &[(&[u8], &str)] = &[
            (b"NATS/1.0\r\nX-Src: caf\xe9\r\n\r\n", "not UTF-8"),
            (
                b"HTTP/1.1\r\nX-Src: a\r\n\r\n",
                "does not begin with `NATS/1.0`",
            ),
            (b"NATS/1.0 404 No Messages\r\n\r\n", "a status (404)"),
            (b"NATS/1.0 503\r\nX-Src: a\r\n\r\n", "a status (503)"),
            (b"NATS/1.0\r\nX-Src a\r\n\r\n", "holds no `:`"),
            (b"NATS/1.0\r\nX Src: a\r\n\r\n", "a header name"),
            (b"NATS/1.0\r\nX-S\xc3\xa9: a\r\n\r\n", "a header name"),
            (b"", "empty"),
        ];
        for (header, why) in unreadable {
            let said = unreadable_headers(header);
            assert!(
                said.as_deref().is_some_and(|s| s.contains(why)),
                "{header:?}: {said:?}"
            );
        }
    }
}
