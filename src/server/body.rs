//! Request bodies of the ingest API: the room they may take at once, how long they may take
//! to arrive, and their encoding.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_ENCODING, TRANSFER_ENCODING};
use tokio::sync::Semaphore;

/// Before its body is read, a request reserves room for it until its commit answers (or, its
/// client gone, until the committer is done with the jobs it queued): its
/// declared length, else (and when gzip) the whole `ingest.max_body_bytes`; all requests at
/// once, at most this many times that. A request past it waits for room up to
/// `ingest.read_timeout_ms`, then gets 503 with `Retry-After`.
pub const BODIES_IN_FLIGHT: u64 = 4;

/// The room for request bodies, in KiB permits.
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    /// What one body of `ingest.max_body_bytes` takes.
    max_kib: u32,
}

impl BodyBudget {
    pub fn for_max_body_bytes(max_body_bytes: u64) -> BodyBudget {
        let limit = u64::from(u32::MAX >> 3) / BODIES_IN_FLIGHT;
        let max_kib = max_body_bytes.div_ceil(1024).clamp(1, limit) as u32;
        BodyBudget {
            permits: Arc::new(Semaphore::new(max_kib as usize * BODIES_IN_FLIGHT as usize)),
            max_kib,
        }
    }

    /// Room for a body of `bytes`, given back when the permit drops; `None` if there was none
    /// within `wait`.
    pub async fn room_for(
        &self,
        bytes: u64,
        wait: Duration,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let kib = bytes.div_ceil(1024).clamp(1, u64::from(self.max_kib)) as u32;
        let acquired = Arc::clone(&self.permits).acquire_many_owned(kib);
        let permit = tokio::time::timeout(wait, acquired).await;
        permit
            .ok()
            .map(|p| p.expect("the budget's semaphore is never closed"))
    }
}

/// A body must arrive whole within this many read timeouts.
pub const BODY_DEADLINE_TIMEOUTS: u32 = 4;

pub enum BodyError {
    TooLarge,
    /// No frame arrived for `ingest.read_timeout_ms`, or not all of them in time.
    Stalled,
    /// The connection failed mid-body, or its framing was broken (a bad chunk size, say);
    /// with the newlines of what was read before.
    Unreadable {
        reason: String,
        lines_read: u64,
    },
}

pub enum GunzipError {
    TooLarge,
    /// Not gzip from this line of the text decompressed before it on (1 if none was).
    NotGzip {
        line: u64,
        reason: String,
    },
}

/// What a client may still send of a body refused before or while it is read, on top of what
/// was read: it is read and dropped, since closing a connection with unread bytes resets it,
/// and a client still sending would see the reset rather than the answer.
const DRAINED_BYTES: u64 = 1 << 20;

/// The most of a body's declared length that is set aside before its bytes come.
const PREALLOCATED_BYTES: usize = 16 << 20;

/// The whole body, up to `max_body_bytes`. Past that, what the client still sends (up to
/// [`DRAINED_BYTES`]) is read and dropped before the body is refused.
pub async fn read_body(
    body: Incoming,
    declared: Option<u64>,
    max_body_bytes: u64,
    read_timeout: Duration,
) -> Result<Vec<u8>, BodyError> {
    let limit = usize::try_from(max_body_bytes).unwrap_or(usize::MAX);
    let expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit));
    // Memory follows the bytes that come, not a length a client declares (up to
    // `max_body_bytes`, which may be set far above what the host has).
    let mut bytes = Vec::with_capacity(expected.min(PREALLOCATED_BYTES));
    let mut seen = 0u64;
    let read = for_each_part(
        body,
        read_timeout,
        read_timeout * BODY_DEADLINE_TIMEOUTS,
        |data| {
            seen = seen.saturating_add(data.len() as u64);
            if seen > max_body_bytes {
                bytes = Vec::new();
                return seen <= max_body_bytes.saturating_add(DRAINED_BYTES);
            }
            let needed = bytes.len() + data.len();
            if needed > bytes.capacity() {
                bytes.reserve_exact(grown_capacity(bytes.capacity(), needed, limit) - bytes.len());
            }
            bytes.extend_from_slice(data);
            true
        },
    )
    .await;
    if seen > max_body_bytes {
        return Err(BodyError::TooLarge);
    }
    read.map_err(|e| match e {
        PartError::Stalled => BodyError::Stalled,
        PartError::Failed(e) => BodyError::Unreadable {
            reason: e.to_string(),
            lines_read: bytes.iter().filter(|&&b| b == b'\n').count() as u64,
        },
    })?;
    Ok(bytes)
}

/// The capacity a body's buffer grows to when it must hold `needed` bytes: doubling, as a
/// `Vec` grows, but never past `limit` (at least `needed`, which is within it). A body just
/// past half a limit that is no power of two would otherwise take up to twice the limit.
fn grown_capacity(capacity: usize, needed: usize, limit: usize) -> usize {
    capacity.saturating_mul(2).min(limit).max(needed)
}

/// Reads and drops what a client still sends of a body refused before it was read (up to
/// `max_body_bytes` and [`DRAINED_BYTES`] more), for at most `within`.
pub async fn discard_body(
    body: Incoming,
    max_body_bytes: u64,
    read_timeout: Duration,
    within: Duration,
) {
    let cap = max_body_bytes.saturating_add(DRAINED_BYTES);
    let mut seen = 0u64;
    let _ = for_each_part(body, read_timeout, within, |data| {
        seen += data.len() as u64;
        seen <= cap
    })
    .await;
}

enum PartError<E> {
    Stalled,
    Failed(E),
}

/// Hands each part of `body` to `take` (which says whether to go on), each part arriving
/// within `read_timeout` of the one before, and all of them `within`, so that a trickle
/// cannot hold a request (and its room for bodies) for ever.
async fn for_each_part<B: hyper::body::Body<Data = Bytes> + Unpin>(
    mut body: B,
    read_timeout: Duration,
    within: Duration,
    mut take: impl FnMut(&[u8]) -> bool,
) -> Result<(), PartError<B::Error>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let wait =
            read_timeout.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return Err(PartError::Stalled),
            Ok(None) => return Ok(()),
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !take(data) {
                        return Ok(());
                    }
                }
            }
            Ok(Some(Err(e))) => return Err(PartError::Failed(e)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

/// The body's `Content-Encoding`: none, `identity` or `gzip` (`x-gzip`) once; else why it is
/// refused. Every header and every coding listed is read, since a body coded twice decoded
/// once would be refused as garbage with a reason that misleads.
pub fn body_encoding(headers: &HeaderMap) -> Result<Encoding, String> {
    let mut given = Vec::new();
    for value in headers.get_all(CONTENT_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        given.extend(
            text.split(',')
                .map(|coding| coding.trim().to_owned())
                .filter(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity")),
        );
    }
    match given.as_slice() {
        [] => Ok(Encoding::Identity),
        [one] if one.eq_ignore_ascii_case("gzip") || one.eq_ignore_ascii_case("x-gzip") => {
            Ok(Encoding::Gzip)
        }
        _ => {
            let shown: String = given.join(", ").chars().take(40).collect();
            Err(format!(
                "Content-Encoding `{shown}` is not supported: send the body as it is, or gzip it once"
            ))
        }
    }
}

/// Why a body sent with `Transfer-Encoding` codings besides `chunked` (which the HTTP library
/// undoes) is refused: they would be left on it and read as garbage. `None` when there are
/// none.
pub fn unsupported_transfer_coding(headers: &HeaderMap) -> Option<String> {
    let others: Vec<String> = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .split(',')
                .map(|coding| coding.trim().to_owned())
                .filter(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("chunked"))
                .collect::<Vec<_>>()
        })
        .collect();
    (!others.is_empty()).then(|| {
        let shown: String = others.join(", ").chars().take(40).collect();
        format!(
            "Transfer-Encoding `{shown}` is not supported: send the body as it is or chunked, \
             and a gzip body with Content-Encoding: gzip"
        )
    })
}

/// Decompresses a gzip body (one member or several, as `cat a.gz b.gz` makes), refusing one
/// that grows past `limit` bytes. The compressed bytes are freed once read, and the slack of
/// the growing buffer before the text is kept.
pub fn gunzip(compressed: Vec<u8>, limit: u64) -> Result<Vec<u8>, GunzipError> {
    use std::io::Read;
    let mut decoded = Vec::new();
    flate2::read::MultiGzDecoder::new(compressed.as_slice())
        .take(limit.saturating_add(1))
        .read_to_end(&mut decoded)
        .map_err(|e| GunzipError::NotGzip {
            line: decoded.iter().filter(|&&b| b == b'\n').count() as u64 + 1,
            reason: e.to_string(),
        })?;
    drop(compressed);
    if decoded.len() as u64 > limit {
        return Err(GunzipError::TooLarge);
    }
    decoded.shrink_to_fit();
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bodys_buffer_doubles_but_never_past_the_limit() {
        const MIB: usize = 1 << 20;
        let cases = [
            (8 * MIB, 8 * MIB + 1, 16 * MIB, 16 * MIB),
            (8 * MIB, 8 * MIB + 1, 9 * MIB, 9 * MIB),
            (0, 100, 9 * MIB, 100),
            (64 * 1024, 70 * 1024, 9 * MIB, 128 * 1024),
            (8 * MIB, 9 * MIB, 9 * MIB, 9 * MIB),
            (
                usize::MAX / 2 + 1,
                usize::MAX / 2 + 2,
                usize::MAX,
                usize::MAX,
            ),
        ];
        for (capacity, needed, limit, grown) in cases {
            assert_eq!(
                grown_capacity(capacity, needed, limit),
                grown,
                "{capacity} {needed} {limit}"
            );
        }
    }

    /// Four bodies of `max_body_bytes` fit at once whatever its size (rounded to KiB), and
    /// nothing more does until one gives its room back.
    #[tokio::test]
    async fn four_whole_bodies_fit_and_no_more() {
        let wait = Duration::from_millis(10);
        for max in [1, 100, 1023, 1024, 1025, 16 << 20, (16 << 20) + 1] {
            let budget = BodyBudget::for_max_body_bytes(max);
            let mut held = Vec::new();
            for _ in 0..BODIES_IN_FLIGHT {
                held.push(
                    budget
                        .room_for(max, wait)
                        .await
                        .expect("room for a whole body"),
                );
            }
            assert!(budget.room_for(1, wait).await.is_none(), "max {max}");
            held.pop();
            assert!(budget.room_for(max, wait).await.is_some(), "max {max}");
        }
    }

    #[test]
    fn gzip_bodies_are_bounded_once_decompressed() {
        use std::io::Write;
        let gzip = |text: &[u8]| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(text).unwrap();
            encoder.finish().unwrap()
        };
        let mut two = gzip(b"one\n");
        two.extend(gzip(b"two\n"));
        assert_eq!(gunzip(two, 8).ok(), Some(b"one\ntwo\n".to_vec()));
        assert!(matches!(
            gunzip(gzip(&[b' '; 9]), 8),
            Err(GunzipError::TooLarge)
        ));
        assert!(matches!(
            gunzip(b"not gzip".to_vec(), 8),
            Err(GunzipError::NotGzip { line: 1, .. })
        ));
        // Garbage after a whole member: where the text breaks off is named.
        let mut broken = gzip(b"one\ntwo\n");
        broken.extend(b"not gzip");
        match gunzip(broken, 100) {
            Err(GunzipError::NotGzip { line, reason }) => {
                assert_eq!(line, 3, "{reason}")
            }
            _ => panic!("garbage after a member is refused"),
        }
    }

    /// Every `Content-Encoding` header and every coding in one is read.
    #[test]
    fn a_body_is_taken_as_gzip_only_when_gzip_is_its_one_coding() {
        let cases: &[(&[&str], Result<Encoding, &str>)] = &[
            (&[], Ok(Encoding::Identity)),
            (&["identity"], Ok(Encoding::Identity)),
            (&[""], Ok(Encoding::Identity)),
            (&["GZip"], Ok(Encoding::Gzip)),
            (&["x-gzip"], Ok(Encoding::Gzip)),
            (&["identity", "gzip"], Ok(Encoding::Gzip)),
            (&["identity, gzip"], Ok(Encoding::Gzip)),
            (&["gzip", "gzip"], Err("`gzip, gzip`")),
            (&["gzip, gzip"], Err("`gzip, gzip`")),
            (&["gzip", "br"], Err("`gzip, br`")),
            (&["br"], Err("`br`")),
        ];
        for (values, expected) in cases {
            let mut headers = HeaderMap::new();
            for value in *values {
                headers.append(CONTENT_ENCODING, value.parse().unwrap());
            }
            // A transfer coding is another header's matter.
            assert_eq!(unsupported_transfer_coding(&headers), None);
            match (body_encoding(&headers), expected) {
                (Ok(found), Ok(expected)) => assert_eq!(found, *expected, "{values:?}"),
                (Err(refused), Err(named)) => assert!(
                    refused.contains(&format!("Content-Encoding {named} is not supported")),
                    "{values:?}: {refused}"
                ),
                (found, _) => panic!("{values:?}: {found:?}"),
            }
        }
    }

    #[test]
    fn transfer_codings_but_chunked_are_refused() {
        let cases: &[(&[&str], Option<&str>)] = &[
            (&[], None),
            (&["chunked"], None),
            (&["Chunked"], None),
            (&["gzip, chunked"], Some("`gzip`")),
            (&["gzip", "chunked"], Some("`gzip`")),
            (&["deflate, gzip, chunked"], Some("`deflate, gzip`")),
            (&["identity, chunked"], Some("`identity`")),
        ];
        for (values, expected) in cases {
            let mut headers = HeaderMap::new();
            for value in *values {
                headers.append(TRANSFER_ENCODING, value.parse().unwrap());
            }
            let refused = unsupported_transfer_coding(&headers);
            match expected {
                None => assert_eq!(refused, None, "{values:?}"),
                Some(named) => assert!(
                    refused.as_ref().is_some_and(
                        |r| r.contains(&format!("Transfer-Encoding {named} is not supported"))
                    ),
                    "{values:?}: {refused:?}"
                ),
            }
        }
    }
}
