//! Value encodings: one format byte, then bincode 2 (standard config).
//!
//! A new layout gets a new format byte; old ones stay decodable. The fixed-bytes tests below pin
//! each version so that an accidental change of layout fails loudly.

use bincode::{Decode, Encode};

use crate::clock::ClockRecord;
use crate::profile::record::ProfileRecord;
use crate::profile::Reason;

/// Profile values as JSON text (stores of formats 1 and 2). Read and upgraded, never written.
pub const PROFILE_V1: u8 = 1;
/// Profile values as typed records ([`ProfileRecord`]), since store format 3.
pub const PROFILE_V2: u8 = 2;
/// Exports before the run-time clock: no `queued_at_uptime_ms`. Read, never written.
pub const EXPORT_V1: u8 = 1;
pub const EXPORT_V2: u8 = 2;
pub const CLOCK_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error("unknown format byte {0}")]
    UnknownFormat(u8),
    #[error("corrupt value: {0}")]
    Corrupt(String),
}

/// A stored profile version of format 1: its time and the (pruned) profile as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProfileJson {
    /// Microseconds since the Unix epoch.
    pub timestamp_micros: Option<i64>,
    pub json: String,
}

/// One export, pending or dead.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ExportRecord {
    pub profile_id: String,
    pub reason: u8,
    /// The JSON body, exactly as it will be sent.
    pub payload: String,
    pub created_at_ms: i64,
    /// When it entered the outbox (wall clock): created, or put back by `outbox retry`.
    pub queued_at_ms: i64,
    /// The same moment on the store's run-time clock ([`crate::clock`]): `max_age_s` counts
    /// from here. Records written before this field (format 1) read 0: their store began to
    /// count run time when this version first ran on it, so they wait from their first sight.
    pub queued_at_uptime_ms: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub last_attempt_at_ms: Option<i64>,
    /// Set when the export was dead-lettered.
    pub dead_at_ms: Option<i64>,
}

/// The layout of format 1, kept to read old stores.
#[derive(Decode)]
struct ExportRecordV1 {
    profile_id: String,
    reason: u8,
    payload: String,
    created_at_ms: i64,
    queued_at_ms: i64,
    attempts: u32,
    last_error: Option<String>,
    last_attempt_at_ms: Option<i64>,
    dead_at_ms: Option<i64>,
}

/// The first layout written with format byte 1, before `queued_at_ms`: read when a format 1
/// value does not read as [`ExportRecordV1`]. One written so mostly does not: it ends a field
/// short, or its `last_error` tag reads as another field's. One whose `last_error` is empty
/// text does, with its attempts and queue time read wrong and that empty error lost.
#[derive(Decode)]
struct ExportRecordV1First {
    profile_id: String,
    reason: u8,
    payload: String,
    created_at_ms: i64,
    attempts: u32,
    last_error: Option<String>,
    last_attempt_at_ms: Option<i64>,
    dead_at_ms: Option<i64>,
}

impl From<ExportRecordV1First> for ExportRecordV1 {
    fn from(first: ExportRecordV1First) -> Self {
        ExportRecordV1 {
            profile_id: first.profile_id,
            reason: first.reason,
            payload: first.payload,
            created_at_ms: first.created_at_ms,
            queued_at_ms: first.created_at_ms,
            attempts: first.attempts,
            last_error: first.last_error,
            last_attempt_at_ms: first.last_attempt_at_ms,
            dead_at_ms: first.dead_at_ms,
        }
    }
}

impl From<ExportRecordV1> for ExportRecord {
    fn from(v1: ExportRecordV1) -> Self {
        ExportRecord {
            profile_id: v1.profile_id,
            reason: v1.reason,
            payload: v1.payload,
            created_at_ms: v1.created_at_ms,
            queued_at_ms: v1.queued_at_ms,
            queued_at_uptime_ms: 0,
            attempts: v1.attempts,
            last_error: v1.last_error,
            last_attempt_at_ms: v1.last_attempt_at_ms,
            dead_at_ms: v1.dead_at_ms,
        }
    }
}

impl ExportRecord {
    /// A new pending export, never attempted, queued when it was created (wall clock and run
    /// time).
    pub fn new_pending(
        profile_id: String,
        reason: Reason,
        payload: String,
        created_at_ms: i64,
        queued_at_uptime_ms: u64,
    ) -> ExportRecord {
        ExportRecord {
            profile_id,
            reason: reason.code(),
            payload,
            created_at_ms,
            queued_at_ms: created_at_ms,
            queued_at_uptime_ms,
            attempts: 0,
            last_error: None,
            last_attempt_at_ms: None,
            dead_at_ms: None,
        }
    }

    /// The reason; [`decode_export`] refuses records whose code is not one.
    pub fn reason(&self) -> Reason {
        Reason::from_code(self.reason).expect("checked when decoded")
    }
}

fn encode<T: Encode>(format: u8, value: &T) -> Vec<u8> {
    let mut bytes = vec![format];
    bincode::encode_into_std_write(value, &mut bytes, bincode::config::standard())
        .expect("writing to a Vec cannot fail");
    bytes
}

fn format_of(bytes: &[u8]) -> Result<u8, CodecError> {
    bytes.first().copied().ok_or(CodecError::Empty)
}

/// What the length prefixes of a small value may claim. bincode allocates what a prefix claims
/// before reading it, so without a limit a damaged prefix asks for more memory than exists (a
/// panic) or than the host has.
pub const DECODE_LIMIT: usize = 64 << 20;

/// What the length prefixes of a value stored in at most so many bytes may claim, for values
/// larger than [`DECODE_LIMIT`] allows: 32 times that many bytes. A sound value claims its
/// strings' and byte slices' lengths, together at most its own, and for a moment each list's
/// count times its items' size in memory: a segment entry takes 112 bytes in memory and at
/// least 4 stored, a group's entry 32 and 2, an identity 24 and 2, so a sound value claims at
/// most 29 times its length. A damaged prefix may so ask for at most 128 times the value's
/// length, which a host that holds the value can mostly give (an allocation it cannot give
/// ends the process). Nothing else bounds what is stored (a profile's text through `outpost
/// ingest`, escapes that take six bytes for each character parsed, profiles that share a
/// group), and a value stored is to read back: so it does up to 512 MiB, past which the
/// limit stays at 16 GiB.
pub(crate) mod limits {
    pub const SMALL: (usize, usize) = (2 << 20, super::DECODE_LIMIT);
    pub const MEDIUM: (usize, usize) = (8 << 20, 256 << 20);
    pub const LARGE: (usize, usize) = (32 << 20, 1 << 30);
    #[cfg(target_pointer_width = "64")]
    pub const HUGE: (usize, usize) = (128 << 20, 4 << 30);
    #[cfg(target_pointer_width = "64")]
    pub const LARGEST: usize = 16 << 30;
    #[cfg(not(target_pointer_width = "64"))]
    pub const HUGE: (usize, usize) = (128 << 20, usize::MAX);
    #[cfg(not(target_pointer_width = "64"))]
    pub const LARGEST: usize = usize::MAX;
}

/// Runs `$body` with `$config`: bincode's standard encoding, its length prefixes limited to what
/// a value stored in `$len` bytes may claim ([`limits`]).
macro_rules! with_decode_config {
    ($len:expr, |$config:ident| $body:expr) => {{
        use $crate::store::codec::limits::{HUGE, LARGE, LARGEST, MEDIUM, SMALL};
        let len: usize = $len;
        if len <= SMALL.0 {
            let $config = bincode::config::standard().with_limit::<{ SMALL.1 }>();
            $body
        } else if len <= MEDIUM.0 {
            let $config = bincode::config::standard().with_limit::<{ MEDIUM.1 }>();
            $body
        } else if len <= LARGE.0 {
            let $config = bincode::config::standard().with_limit::<{ LARGE.1 }>();
            $body
        } else if len <= HUGE.0 {
            let $config = bincode::config::standard().with_limit::<{ HUGE.1 }>();
            $body
        } else {
            let $config = bincode::config::standard().with_limit::<LARGEST>();
            $body
        }
    }};
}
pub(crate) use with_decode_config;

/// A value of format byte `expected`, every byte of it read.
pub(super) fn decode<T: Decode<()>>(expected: u8, bytes: &[u8]) -> Result<T, CodecError> {
    let (&format, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    if format != expected {
        return Err(CodecError::UnknownFormat(format));
    }
    let (value, used) = with_decode_config!(rest.len(), |config| {
        bincode::decode_from_slice(rest, config)
    })
    .map_err(|e| CodecError::Corrupt(e.to_string()))?;
    if used != rest.len() {
        return Err(CodecError::Corrupt(format!(
            "{} trailing bytes",
            rest.len() - used
        )));
    }
    Ok(value)
}

/// A small `meta` value kept as one format byte and JSON (the mapping last run with, the
/// backfill state), so that a person can read it with sled's own tools.
pub fn encode_json<T: serde::Serialize>(format: u8, value: &T) -> Vec<u8> {
    let mut bytes = vec![format];
    serde_json::to_writer(&mut bytes, value).expect("meta values serialize");
    bytes
}

pub fn decode_json<T: serde::de::DeserializeOwned>(
    expected: u8,
    bytes: &[u8],
) -> Result<T, CodecError> {
    let (&format, json) = bytes.split_first().ok_or(CodecError::Empty)?;
    if format != expected {
        return Err(CodecError::UnknownFormat(format));
    }
    serde_json::from_slice(json).map_err(|e| CodecError::Corrupt(e.to_string()))
}

pub fn encode_profile(record: &ProfileRecord) -> Vec<u8> {
    encode(PROFILE_V2, record)
}

/// Format 1, as older stores hold it: for tests and benches of the upgrade.
pub fn encode_profile_json(record: &ProfileJson) -> Vec<u8> {
    encode(PROFILE_V1, record)
}

/// A profile of either format; format 1 is converted ([`ProfileRecord::from_json_profile`]).
pub fn decode_profile(bytes: &[u8]) -> Result<ProfileRecord, CodecError> {
    if format_of(bytes)? == PROFILE_V1 {
        let old: ProfileJson = decode(PROFILE_V1, bytes)?;
        let profile: serde_json::Value = serde_json::from_str(&old.json)
            .map_err(|e| CodecError::Corrupt(format!("profile JSON: {e}")))?;
        let record = ProfileRecord::from_json_profile(old.timestamp_micros, &profile);
        record
            .check()
            .map_err(|e| CodecError::Corrupt(format!("profile: {e}")))?;
        return Ok(record);
    }
    let record: ProfileRecord = decode(PROFILE_V2, bytes)?;
    record
        .check()
        .map_err(|e| CodecError::Corrupt(format!("profile: {e}")))?;
    Ok(record)
}

/// Whether `bytes` is a profile of format 1 (to be upgraded).
pub fn is_profile_json(bytes: &[u8]) -> bool {
    bytes.first() == Some(&PROFILE_V1)
}

pub fn encode_export(record: &ExportRecord) -> Vec<u8> {
    encode(EXPORT_V2, record)
}

pub fn decode_export(bytes: &[u8]) -> Result<ExportRecord, CodecError> {
    let record: ExportRecord = match format_of(bytes)? {
        EXPORT_V1 => match decode::<ExportRecordV1>(EXPORT_V1, bytes) {
            Ok(v1) => v1.into(),
            Err(e) => decode::<ExportRecordV1First>(EXPORT_V1, bytes)
                .map_err(|_| e)
                .map(ExportRecordV1::from)?
                .into(),
        },
        _ => decode(EXPORT_V2, bytes)?,
    };
    if Reason::from_code(record.reason).is_none() {
        return Err(CodecError::Corrupt(format!(
            "unknown reason code {}",
            record.reason
        )));
    }
    Ok(record)
}

/// The profile id an export belongs to, read without the rest of the record: every export
/// format begins with it.
pub fn export_profile_id(bytes: &[u8]) -> Result<&str, CodecError> {
    let (&format, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    if format != EXPORT_V1 && format != EXPORT_V2 {
        return Err(CodecError::UnknownFormat(format));
    }
    let (id, _) = with_decode_config!(rest.len(), |config| {
        bincode::borrow_decode_from_slice::<&str, _>(rest, config)
    })
    .map_err(|e| CodecError::Corrupt(e.to_string()))?;
    Ok(id)
}

pub fn encode_clock(record: &ClockRecord) -> Vec<u8> {
    encode(CLOCK_V1, record)
}

pub fn decode_clock(bytes: &[u8]) -> Result<ClockRecord, CodecError> {
    decode(CLOCK_V1, bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::clock::Jump;

    /// Regression (found by fuzzing `decode_records`): a length prefix claiming more than
    /// memory holds was a panic ("capacity overflow"), not an error.
    #[test]
    fn a_huge_length_prefix_is_an_error_not_a_panic() {
        for format in [EXPORT_V1, EXPORT_V2] {
            // The format byte, then a varint length of u64::MAX for the first string field.
            let mut bytes = vec![format, 0xFF];
            bytes.extend_from_slice(&u64::MAX.to_le_bytes());
            assert!(decode_export(&bytes).is_err(), "format {format}");
        }
        for format in [PROFILE_V1, PROFILE_V2] {
            let mut bytes = vec![format, 0, 0xFF];
            bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
            assert!(decode_profile(&bytes).is_err(), "format {format}");
        }
    }

    /// A value larger than the small values' limit reads back as it was stored (an export of
    /// a profile whose text is mostly escapes, read in through `outpost ingest`, was stored and
    /// then unreadable), and a damaged prefix in a large value is still an error.
    #[test]
    fn a_value_of_any_size_stored_reads_back() {
        let mut export = sample_export();
        export.payload = "\\u0001".repeat(12 << 20);
        let bytes = encode_export(&export);
        assert!(bytes.len() > DECODE_LIMIT);
        assert_eq!(decode_export(&bytes).unwrap(), export);
        assert_eq!(export_profile_id(&bytes).unwrap(), "p1");

        // Claiming more than 32 times its length, or more than its tier allows.
        for (claim, len) in [(1u64 << 41, limits::SMALL.0 + 10), (300 << 20, 3 << 20)] {
            let mut damaged = vec![EXPORT_V2, 0xFF];
            damaged.extend_from_slice(&claim.to_le_bytes());
            damaged.resize(len, 0);
            assert!(decode_export(&damaged).is_err(), "{claim} in {len}");
        }
    }

    /// A profile of many small segment entries claims far more than its stored length while it
    /// is read (112 bytes in memory for each entry of about 10 stored): it reads back.
    #[test]
    fn a_record_of_many_small_entries_reads_back() {
        use crate::profile::record::{Membership, Rest};
        let record = ProfileRecord {
            timestamp_micros: Some(1),
            segments: (0..700_000)
                .map(|i| Membership {
                    segment: format!("{i:06}"),
                    status: None,
                    last_qualification_time: None,
                    rest: Rest::Nothing,
                })
                .collect(),
            identities: Vec::new(),
            attributes: Vec::new(),
        };
        let bytes = encode_profile(&record);
        assert!(bytes.len() > limits::SMALL.0 && bytes.len() <= limits::MEDIUM.0);
        assert!(700_000 * std::mem::size_of::<Membership>() > DECODE_LIMIT);
        assert_eq!(decode_profile(&bytes).unwrap(), record);
    }

    pub(crate) fn sample_export() -> ExportRecord {
        ExportRecord {
            profile_id: "p1".into(),
            reason: Reason::Attribute.code(),
            payload: "{}".into(),
            created_at_ms: 1000,
            queued_at_ms: 1000,
            queued_at_uptime_ms: 300,
            attempts: 2,
            last_error: Some("HTTP 500".into()),
            last_attempt_at_ms: Some(2000),
            dead_at_ms: None,
        }
    }

    #[test]
    fn profile_v1_bytes_are_pinned_and_read_as_records() {
        let json = r#"{"a":1,"segmentMembership":{"ups":{"s":{"status":"realized"}}}}"#;
        let old = ProfileJson {
            timestamp_micros: Some(5),
            json: json.into(),
        };
        let bytes = encode_profile_json(&old);
        assert_eq!(bytes[..4], [1, 1, 10, json.len() as u8]);
        let record = decode_profile(&bytes).unwrap();
        assert_eq!(
            record,
            ProfileRecord::from_json_profile(Some(5), &serde_json::from_str(json).unwrap())
        );
        assert!(record.is_member("s"));
        let not_json = encode_profile_json(&ProfileJson {
            timestamp_micros: None,
            json: "{".into(),
        });
        assert!(matches!(
            decode_profile(&not_json),
            Err(CodecError::Corrupt(_))
        ));
    }

    #[test]
    fn profile_v2_bytes_are_pinned() {
        use crate::profile::record::{Attribute, Membership, Namespace, Rest, Status};
        let record = ProfileRecord {
            timestamp_micros: Some(5),
            segments: vec![Membership {
                segment: "s".into(),
                status: Some(Status::Existing),
                last_qualification_time: None,
                rest: Rest::Nothing,
            }],
            identities: vec![Namespace {
                namespace: "n".into(),
                items: vec!["1".into()],
            }],
            attributes: vec![Attribute {
                path: "a".into(),
                json: "2".into(),
            }],
        };
        let bytes = encode_profile(&record);
        let expected: Vec<u8> = [
            &[2u8, 1, 10][..],         // format 2, Some(5): zigzag 10
            &[1, 1, b's', 1, 1, 0, 0], // one segment "s", Some(Existing), None, Nothing
            &[1, 1, b'n', 1, 1, b'1'], // one namespace "n" with one identity `1`
            &[1, 1, b'a', 1, b'2'],    // one attribute "a" = `2`
        ]
        .concat();
        assert_eq!(bytes, expected);
        assert_eq!(decode_profile(&bytes).unwrap(), record);
        // JSON text that is not JSON makes the record unreadable, not a bad payload.
        let mut bad = record.clone();
        bad.attributes[0].json = "{".into();
        assert!(matches!(
            decode_profile(&encode_profile(&bad)),
            Err(CodecError::Corrupt(_))
        ));
    }

    #[test]
    fn export_v1_bytes_are_still_read() {
        // As format 1 wrote them; they read as queued at run time 0.
        let bytes: Vec<u8> = [
            &[1u8, 2, b'p', b'1', 2, 2, b'{', b'}'][..],
            &[251, 0xd0, 0x07], // created_at_ms 1000: zigzag 2000, varint
            &[251, 0xd0, 0x07], // queued_at_ms
            &[2, 1, 8],         // attempts 2, Some, len 8
            b"HTTP 500",
            &[1, 251, 0xa0, 0x0f], // Some(2000)
            &[0],                  // None
        ]
        .concat();
        let expected = ExportRecord {
            queued_at_uptime_ms: 0,
            ..sample_export()
        };
        assert_eq!(decode_export(&bytes).unwrap(), expected);
        assert_eq!(export_profile_id(&bytes).unwrap(), "p1");
    }

    /// As the first builds wrote format 1, before it had `queued_at_ms`: read as queued when
    /// made, pending or dead.
    #[test]
    fn export_v1_bytes_of_the_first_layout_are_still_read() {
        let pending: Vec<u8> = [
            &[1u8, 2, b'p', b'1', 2, 2, b'{', b'}'][..],
            &[251, 0xd0, 0x07], // created_at_ms 1000: zigzag 2000, varint
            &[0, 0, 0, 0],      // attempts 0, None, None, None
        ]
        .concat();
        let expected = ExportRecord {
            attempts: 0,
            last_error: None,
            last_attempt_at_ms: None,
            queued_at_uptime_ms: 0,
            ..sample_export()
        };
        assert_eq!(decode_export(&pending).unwrap(), expected);
        let dead: Vec<u8> = [
            &[1u8, 2, b'p', b'1', 2, 2, b'{', b'}'][..],
            &[251, 0xd0, 0x07], // created_at_ms 1000
            &[2, 1, 8],         // attempts 2, Some, len 8
            b"HTTP 500",
            &[1, 251, 0xa0, 0x0f], // Some(2000)
            &[1, 251, 0x70, 0x17], // dead at Some(3000): zigzag 6000
        ]
        .concat();
        let expected = ExportRecord {
            dead_at_ms: Some(3000),
            queued_at_uptime_ms: 0,
            ..sample_export()
        };
        assert_eq!(decode_export(&dead).unwrap(), expected);
        let mut cut = dead.clone();
        cut.pop();
        assert!(decode_export(&cut).is_err(), "read as neither layout");
    }

    #[test]
    fn export_v2_bytes_are_pinned() {
        let bytes = encode_export(&sample_export());
        let expected: Vec<u8> = [
            &[2u8, 2, b'p', b'1', 2, 2, b'{', b'}'][..],
            &[251, 0xd0, 0x07], // created_at_ms 1000: zigzag 2000, varint
            &[251, 0xd0, 0x07], // queued_at_ms
            &[251, 0x2c, 0x01], // queued_at_uptime_ms 300 (unsigned: no zigzag)
            &[2, 1, 8],         // attempts 2, Some, len 8
            b"HTTP 500",
            &[1, 251, 0xa0, 0x0f], // Some(2000)
            &[0],                  // None
        ]
        .concat();
        assert_eq!(bytes, expected);
        assert_eq!(decode_export(&bytes).unwrap(), sample_export());
        assert_eq!(export_profile_id(&bytes).unwrap(), "p1");
        assert!(export_profile_id(&bytes[..3]).is_err(), "cut inside the id");
        assert!(matches!(
            export_profile_id(&[9, 0]),
            Err(CodecError::UnknownFormat(9))
        ));
    }

    #[test]
    fn clock_v1_bytes_are_pinned() {
        let record = ClockRecord {
            uptime_ms: 5,
            wall_ms: -1,
            boot_id: Some("b".into()),
            boot_ms: Some(7),
            jumps: 1,
            last_jump: Some(Jump {
                by_ms: 2,
                noticed_at_ms: 3,
            }),
        };
        let bytes = encode_clock(&record);
        assert_eq!(bytes, [1, 5, 1, 1, 1, b'b', 1, 7, 1, 1, 4, 6]);
        assert_eq!(decode_clock(&bytes).unwrap(), record);
        assert!(matches!(
            decode_clock(&[2, 0]),
            Err(CodecError::UnknownFormat(2))
        ));
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert!(matches!(decode_export(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode_export(&[9, 0]),
            Err(CodecError::UnknownFormat(9))
        ));
        assert!(matches!(
            decode_export(&[1, 200]),
            Err(CodecError::Corrupt(_))
        ));
        assert!(matches!(
            decode_export(&[2, 200]),
            Err(CodecError::Corrupt(_))
        ));
        let mut long = encode_export(&sample_export());
        long.push(0);
        assert!(matches!(decode_export(&long), Err(CodecError::Corrupt(_))));
        let unknown_reason = ExportRecord {
            reason: 9,
            ..sample_export()
        };
        assert!(matches!(
            decode_export(&encode_export(&unknown_reason)),
            Err(CodecError::Corrupt(_))
        ));
    }
}
