//! The file `outpost nats hand-over` writes and `outpost nats take-over` reads: the stored
//! profiles of some stream partitions and how far each partition was consumed.
//!
//! Layout: [`MAGIC`]; the bincode (standard config) of a [`Header`]; one entry a profile, byte
//! 1 then the bincode of `(id, stored value)`, the value as the store keeps it (format byte +
//! record); byte 0; the number of profiles (u64 BE); the XxHash64 (seed 0) of every byte
//! before it (u64 BE). A file cut short or changed is refused before anything is taken from
//! it: a take-over reads it whole once to check it, then again to store it.

use std::hash::Hasher;
use std::io::{self, Read, Write};

use bincode::{Decode, Encode};
use twox_hash::XxHash64;

pub const MAGIC: &[u8] = b"outpost hand-over v1\n";

const ENTRY: u8 = 1;
const END: u8 = 0;

/// Bounds what one damaged length can make a reader allocate.
const MAX_ENTRY_BYTES: usize = 64 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENTRY_BYTES>()
}

/// What the configs of the two stores of a move must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, serde::Serialize, serde::Deserialize)]
pub struct Terms {
    /// `source.nats.partitions`: a profile's partition depends on it.
    pub partition_count: u32,
    /// [`crate::config::Mapping::fingerprint`]: stored records keep only what the mapping
    /// asks for.
    pub mapping: String,
    /// The stream and the consumer prefix: which fleet the partitions belong to.
    pub fleet: String,
    /// The mapped segments (also in `mapping`): a store that has not run with one of them
    /// has not backfilled it, and moves nothing until it has.
    pub segments: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Header {
    pub terms: Terms,
    pub partitions: Vec<HandedPartition>,
    /// The store that handed over (its `meta/store_id`).
    pub store_id: u32,
    pub written_at_ms: i64,
}

impl Header {
    /// Names this file among all hand-overs: the store that wrote it and when. The claims of
    /// its partitions carry it until they are taken over.
    pub fn file_id(&self) -> String {
        format!("{:08x}-{}", self.store_id, self.written_at_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct HandedPartition {
    pub partition: u32,
    /// The highest stream sequence in the store, and the stream's fingerprint; `None` when
    /// nothing of the partition was consumed.
    pub position: Option<(u64, u64)>,
}

/// Hashes what passes through it.
struct Hashing<T> {
    inner: T,
    hasher: XxHash64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Hashing<T> {
        Hashing {
            inner,
            hasher: XxHash64::with_seed(0),
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.write(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.write(&buf[..n]);
        Ok(n)
    }
}

fn encode_error(e: bincode::error::EncodeError) -> io::Error {
    match e {
        bincode::error::EncodeError::Io { inner, .. } => inner,
        other => io::Error::other(other.to_string()),
    }
}

pub struct FileWriter<W: Write> {
    out: Hashing<W>,
    profiles: u64,
}

impl<W: Write> FileWriter<W> {
    pub fn new(out: W, header: &Header) -> io::Result<FileWriter<W>> {
        let mut out = Hashing::new(out);
        out.write_all(MAGIC)?;
        bincode::encode_into_std_write(header, &mut out, config()).map_err(encode_error)?;
        Ok(FileWriter { out, profiles: 0 })
    }

    pub fn profile(&mut self, id: &str, value: &[u8]) -> io::Result<()> {
        self.out.write_all(&[ENTRY])?;
        bincode::encode_into_std_write((id, value), &mut self.out, config())
            .map_err(encode_error)?;
        self.profiles += 1;
        Ok(())
    }

    /// Writes the end; returns the output and the number of profiles written.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.out.write_all(&[END])?;
        self.out.write_all(&self.profiles.to_be_bytes())?;
        let hash = self.out.hasher.finish();
        let mut out = self.out.inner;
        out.write_all(&hash.to_be_bytes())?;
        Ok((out, self.profiles))
    }
}

/// Why a file cannot be taken over.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("it is not a hand-over file (written by `outpost nats hand-over`)")]
    NotHandOver,
    #[error("it is cut short after {0} profile(s)")]
    CutShort(u64),
    #[error("it is damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Io(String),
}

fn read_error(e: io::Error, profiles: u64) -> FileError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FileError::CutShort(profiles)
    } else {
        FileError::Io(e.to_string())
    }
}

fn decode_error(e: bincode::error::DecodeError, profiles: u64) -> FileError {
    match e {
        bincode::error::DecodeError::UnexpectedEnd { .. } => FileError::CutShort(profiles),
        bincode::error::DecodeError::Io { inner, .. } => read_error(inner, profiles),
        other => FileError::Damaged(other.to_string()),
    }
}

pub struct FileReader<R: Read> {
    input: Hashing<R>,
    profiles: u64,
    ended: bool,
}

impl<R: Read> FileReader<R> {
    pub fn open(input: R) -> Result<(Header, FileReader<R>), FileError> {
        let mut input = Hashing::new(input);
        let mut magic = vec![0u8; MAGIC.len()];
        match input.read_exact(&mut magic) {
            Ok(()) if magic == MAGIC => {}
            Ok(()) => return Err(FileError::NotHandOver),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(FileError::NotHandOver)
            }
            Err(e) => return Err(FileError::Io(e.to_string())),
        }
        let header: Header =
            bincode::decode_from_std_read(&mut input, config()).map_err(|e| decode_error(e, 0))?;
        let reader = FileReader {
            input,
            profiles: 0,
            ended: false,
        };
        Ok((header, reader))
    }

    /// The next profile, `None` at the end, once the count and the checksum are found right.
    pub fn next_profile(&mut self) -> Result<Option<(String, Vec<u8>)>, FileError> {
        if self.ended {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.input
            .read_exact(&mut tag)
            .map_err(|e| read_error(e, self.profiles))?;
        match tag[0] {
            ENTRY => {
                let entry: (String, Vec<u8>) =
                    bincode::decode_from_std_read(&mut self.input, config())
                        .map_err(|e| decode_error(e, self.profiles))?;
                self.profiles += 1;
                Ok(Some(entry))
            }
            END => {
                let mut count = [0u8; 8];
                self.input
                    .read_exact(&mut count)
                    .map_err(|e| read_error(e, self.profiles))?;
                let expected = self.input.hasher.finish();
                let mut hash = [0u8; 8];
                self.input
                    .inner
                    .read_exact(&mut hash)
                    .map_err(|e| read_error(e, self.profiles))?;
                if u64::from_be_bytes(hash) != expected {
                    return Err(FileError::Damaged("its checksum does not match".into()));
                }
                if u64::from_be_bytes(count) != self.profiles {
                    return Err(FileError::Damaged(format!(
                        "it says {} profiles and holds {}",
                        u64::from_be_bytes(count),
                        self.profiles
                    )));
                }
                let mut rest = [0u8; 1];
                match self.input.inner.read(&mut rest) {
                    Ok(0) => {}
                    Ok(_) => return Err(FileError::Damaged("bytes follow its end".into())),
                    Err(e) => return Err(FileError::Io(e.to_string())),
                }
                self.ended = true;
                Ok(None)
            }
            other => Err(FileError::Damaged(format!(
                "an entry begins with byte {other}, not 0 or 1"
            ))),
        }
    }

    pub fn profiles_read(&self) -> u64 {
        self.profiles
    }

    pub fn into_inner(self) -> R {
        self.input.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            terms: Terms {
                partition_count: 8,
                mapping: "segments=a,b".into(),
                fleet: "UPDATES outpost".into(),
                segments: vec!["a".into(), "b".into()],
            },
            partitions: vec![
                HandedPartition {
                    partition: 3,
                    position: Some((41, 0xfeed)),
                },
                HandedPartition {
                    partition: 5,
                    position: None,
                },
            ],
            store_id: 7,
            written_at_ms: 1_700_000_000_000,
        }
    }

    fn written(profiles: &[(&str, &[u8])]) -> Vec<u8> {
        let mut writer = FileWriter::new(Vec::new(), &header()).unwrap();
        for (id, value) in profiles {
            writer.profile(id, value).unwrap();
        }
        let (bytes, count) = writer.finish().unwrap();
        assert_eq!(count, profiles.len() as u64);
        bytes
    }

    type Profiles = Vec<(String, Vec<u8>)>;

    fn read_all(bytes: &[u8]) -> Result<(Header, Profiles), FileError> {
        let (header, mut reader) = FileReader::open(bytes)?;
        let mut profiles = Vec::new();
        while let Some(entry) = reader.next_profile()? {
            profiles.push(entry);
        }
        Ok((header, profiles))
    }

    #[test]
    fn a_file_reads_back_as_written() {
        let bytes = written(&[("p-1", b"\x02abc"), ("p-2", b"")]);
        let (read_header, profiles) = read_all(&bytes).unwrap();
        assert_eq!(read_header, header());
        assert_eq!(
            profiles,
            [
                ("p-1".to_string(), b"\x02abc".to_vec()),
                ("p-2".to_string(), Vec::new())
            ]
        );
        let empty = written(&[]);
        assert_eq!(read_all(&empty).unwrap().1, []);
    }

    #[test]
    fn a_file_cut_short_or_changed_is_refused() {
        let bytes = written(&[("p-1", b"\x02abc"), ("p-2", b"\x02de")]);
        for cut in [bytes.len() - 1, bytes.len() - 9, bytes.len() - 12, 40] {
            let error = read_all(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(error, FileError::CutShort(_)),
                "cut at {cut}: {error}"
            );
        }
        // Every byte after the magic changed in turn is noticed: as damage, or as a cut.
        for at in MAGIC.len()..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 0x10;
            assert!(
                read_all(&changed).is_err(),
                "byte {at} changed went unnoticed"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            read_all(&longer).unwrap_err(),
            FileError::Damaged("bytes follow its end".into())
        );
        assert_eq!(
            read_all(b"{\"id\": 1}\n").unwrap_err(),
            FileError::NotHandOver
        );
        assert_eq!(read_all(b"").unwrap_err(), FileError::NotHandOver);
    }
}
