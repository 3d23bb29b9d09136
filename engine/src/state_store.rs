//! States of any size stored in the log: projection checkpoints and aggregate snapshots
//! written as content parts under a manifest (docs/FORMAT.md 18.4).
//!
//! A state's encoding (its *content*) is cut into parts of at most one payload each, and
//! every part is appended as an event `$StatePart` of the state's stream. Then one event
//! `$StateManifest` names the parts by stream version, length and BLAKE3 hash, with the
//! position the state was folded up to, the content's length and hash, and, for a delta,
//! the manifest it builds on. The manifest is the commit point: parts that no manifest
//! names (a writer stopped between them) are never read, so a load always sees a whole
//! checkpoint or the one before it. Loading checks every part against the manifest while
//! it reads it, one part at a time, and a damaged, missing or misnamed part is a precise
//! [`StateError`].
//!
//! A partitioned state (see [`crate::projection::Partitions`]) is stored as *entries*
//! (key, value or removal) in ascending key order: a *full* checkpoint holds every
//! partition, a *delta* only those changed since the manifest it names as its base.
//!
//! The encodings here do no I/O (the server's client uses them too); [`write_parts`] and
//! [`PartReader`] store and read them through the log's public API.

use std::io::{self, Read, Write};

use crate::error::Error;
use crate::format::Hash32;
use crate::format::envelope::PAYLOAD_BYTES_MAX;
use crate::log::{Direction, EventData, ExpectedVersion, Log};

/// The event type of a part of a state's content.
pub const PART_EVENT_TYPE: &str = "$StatePart";
/// The event type of a state's manifest.
pub const MANIFEST_EVENT_TYPE: &str = "$StateManifest";
/// The first bytes of a manifest payload.
pub const MANIFEST_MAGIC: [u8; 4] = *b"TSM1";
/// Bytes of a manifest before its part references.
pub const MANIFEST_FIXED_BYTES: usize = 116;
/// Bytes of one part reference in a manifest.
pub const PART_REF_BYTES: usize = 44;
/// The most parts one manifest can name (it is one payload).
pub const PARTS_MAX: usize = (PAYLOAD_BYTES_MAX - MANIFEST_FIXED_BYTES) / PART_REF_BYTES;
/// The default and largest content bytes per part: one payload.
pub const PART_BYTES_MAX: usize = PAYLOAD_BYTES_MAX;
/// The longest content a manifest carries inline, with no parts (a small state is then one
/// event).
pub const INLINE_BYTES_MAX: usize = 64 * 1024;
/// The longest partition key.
pub const KEY_BYTES_MAX: usize = 1 << 16;
/// The longest chain of deltas a load follows (a writer's own bound is smaller).
pub const DELTA_DEPTH_MAX: u32 = 1024;
/// "None" in a manifest's u64 fields.
const NONE: u64 = u64::MAX;

/// How a manifest's content encodes the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The state's own encoding, whole.
    Whole,
    /// Every partition, as entries in ascending key order.
    Full,
    /// The partitions changed since the base manifest, as entries in ascending key order.
    Delta,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Whole => 0,
            Kind::Full => 1,
            Kind::Delta => 2,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        match c {
            0 => Some(Kind::Whole),
            1 => Some(Kind::Full),
            2 => Some(Kind::Delta),
            _ => None,
        }
    }
}

/// One part named by a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartRef {
    /// The part's version in the state's stream.
    pub version: u64,
    /// Its length in bytes.
    pub len: u32,
    /// BLAKE3 of its payload.
    pub hash: Hash32,
}

/// The manifest a delta builds on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Base {
    /// The base manifest's version in the state's stream.
    pub version: u64,
    /// BLAKE3 of the base manifest's payload.
    pub hash: Hash32,
}

/// A state's manifest (FORMAT.md 18.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Where the state was folded to: a projection's first position not folded, an
    /// aggregate's version.
    pub at: u64,
    /// The projection's or aggregate's state version.
    pub state_version: u32,
    /// How the content encodes the state.
    pub kind: Kind,
    /// Deltas between this manifest and its full checkpoint (0 for whole and full).
    pub depth: u32,
    /// The content's length.
    pub content_bytes: u64,
    /// BLAKE3 of the content (the parts in order).
    pub content_hash: Hash32,
    /// The manifest this delta builds on (deltas only).
    pub base: Option<Base>,
    /// The version of the previous manifest of the stream, where a load falls back to.
    pub previous: Option<u64>,
    /// The parts, in content order.
    pub parts: Vec<PartRef>,
    /// The content itself, when there are no parts (at most [`INLINE_BYTES_MAX`] bytes).
    pub inline: Vec<u8>,
}

/// Why a stored state cannot be written or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] Error),
    /// A manifest's bytes do not decode.
    #[error("manifest does not decode: {0}")]
    Manifest(&'static str),
    /// A part named by the manifest is not in the stream.
    #[error("part {part} (stream version {version}) is missing")]
    PartMissing {
        /// The part's index in the manifest.
        part: usize,
        /// Its stream version.
        version: u64,
    },
    /// The event at a part's version is not a part.
    #[error("part {part} (stream version {version}) is a {event_type:?} event, not a part")]
    NotAPart {
        /// The part's index in the manifest.
        part: usize,
        /// Its stream version.
        version: u64,
        /// What the event is.
        event_type: String,
    },
    /// A part's bytes differ from what the manifest says.
    #[error("part {part} (stream version {version}) differs from the manifest: {what}")]
    PartMismatch {
        /// The part's index in the manifest.
        part: usize,
        /// Its stream version.
        version: u64,
        /// Length or hash.
        what: &'static str,
    },
    /// The content as a whole differs from what the manifest says.
    #[error("the content differs from the manifest: {0}")]
    ContentMismatch(&'static str),
    /// A delta's base manifest is missing or differs from what the delta names.
    #[error("the base manifest at stream version {version}: {reason}")]
    Base {
        /// The base's stream version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// The entries of a partitioned content are malformed.
    #[error("entry at content byte {offset}: {reason}")]
    Entry {
        /// Where the entry starts in the content.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The projection or aggregate refused the stored state.
    #[error("the state does not load: {0}")]
    State(String),
    /// Writing the content failed (the state's own encoder, or the log under it).
    #[error("writing the state: {0}")]
    Io(#[source] io::Error),
    /// Where the state is stored could not be read (a server that did not answer): a
    /// search stops rather than pass over a checkpoint that may be sound.
    #[error("the stored state could not be read: {0}")]
    Unavailable(#[source] io::Error),
    /// A delta chain whose manifests hold more than a load keeps.
    #[error("a chain of manifests of more than {max} bytes")]
    ChainTooLarge {
        /// The most bytes of manifests a load keeps.
        max: usize,
    },
}

/// The most bytes of manifests one load keeps for a delta chain.
pub const CHAIN_BYTES_MAX: usize = 64 << 20;

impl StateError {
    /// A [`StateError`] carried through an [`io::Error`] (by [`PartReader`] or the part
    /// writer), or the I/O error itself.
    #[must_use]
    pub fn from_io(e: io::Error) -> StateError {
        if !e.get_ref().is_some_and(|inner| inner.is::<StateError>()) {
            return StateError::Io(e);
        }
        match e.into_inner().map(|inner| inner.downcast::<StateError>()) {
            Some(Ok(s)) => *s,
            Some(Err(other)) => StateError::Io(io::Error::other(other)),
            None => unreachable_io(),
        }
    }

    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

/// `get_ref` was `Some`, so `into_inner` is too; kept as an error rather than a panic.
fn unreachable_io() -> StateError {
    StateError::Io(io::Error::other("an I/O error lost its cause"))
}

fn hash(bytes: &[u8]) -> Hash32 {
    *blake3::hash(bytes).as_bytes()
}

/// BLAKE3 of a manifest's payload: what a delta's base names.
#[must_use]
pub fn manifest_hash(payload: &[u8]) -> Hash32 {
    hash(payload)
}

fn opt(v: u64) -> Option<u64> {
    (v != NONE).then_some(v)
}

impl Manifest {
    /// The payload of the `$StateManifest` event.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(MANIFEST_FIXED_BYTES + PART_REF_BYTES * self.parts.len());
        p.extend_from_slice(&MANIFEST_MAGIC);
        p.extend_from_slice(&self.at.to_le_bytes());
        p.extend_from_slice(&self.state_version.to_le_bytes());
        p.push(self.kind.code());
        p.extend_from_slice(&[0; 3]);
        p.extend_from_slice(&self.depth.to_le_bytes());
        p.extend_from_slice(&self.content_bytes.to_le_bytes());
        p.extend_from_slice(&self.content_hash);
        let (base_version, base_hash) = self.base.map_or((NONE, [0; 32]), |b| (b.version, b.hash));
        p.extend_from_slice(&base_version.to_le_bytes());
        p.extend_from_slice(&base_hash);
        p.extend_from_slice(&self.previous.unwrap_or(NONE).to_le_bytes());
        let count = u32::try_from(self.parts.len()).unwrap_or(u32::MAX);
        p.extend_from_slice(&count.to_le_bytes());
        debug_assert_eq!(p.len(), MANIFEST_FIXED_BYTES);
        for part in &self.parts {
            p.extend_from_slice(&part.version.to_le_bytes());
            p.extend_from_slice(&part.len.to_le_bytes());
            p.extend_from_slice(&part.hash);
        }
        p.extend_from_slice(&self.inline);
        p
    }

    /// Decodes a manifest payload, checking every field it can on its own.
    ///
    /// # Errors
    /// [`StateError::Manifest`] naming what is wrong.
    pub fn decode(p: &[u8]) -> Result<Manifest, StateError> {
        let bad = StateError::Manifest;
        let u64_at = |o: usize| -> u64 {
            let mut b = [0; 8];
            b.copy_from_slice(&p[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |o: usize| -> u32 {
            let mut b = [0; 4];
            b.copy_from_slice(&p[o..o + 4]);
            u32::from_le_bytes(b)
        };
        let hash_at = |o: usize| -> Hash32 {
            let mut b = [0; 32];
            b.copy_from_slice(&p[o..o + 32]);
            b
        };
        if p.len() < MANIFEST_FIXED_BYTES {
            return Err(bad("shorter than its fixed fields"));
        }
        if p[0..4] != MANIFEST_MAGIC {
            return Err(bad("magic is not TSM1"));
        }
        let kind = Kind::from_code(p[16]).ok_or(bad("unknown kind"))?;
        if p[17..20] != [0; 3] {
            return Err(bad("reserved bytes are not zero"));
        }
        let depth = u32_at(20);
        let base_version = u64_at(64);
        let base = opt(base_version).map(|version| Base {
            version,
            hash: hash_at(72),
        });
        if base.is_none() && p[72..104] != [0; 32] {
            return Err(bad("a base hash without a base"));
        }
        match (kind, base) {
            (Kind::Delta, None) => return Err(bad("a delta without a base")),
            (Kind::Whole | Kind::Full, Some(_)) => {
                return Err(bad("a base on a whole or full state"));
            }
            _ => {}
        }
        match kind {
            Kind::Delta if depth == 0 || depth > DELTA_DEPTH_MAX => {
                return Err(bad("a delta's depth is outside 1..=1024"));
            }
            Kind::Whole | Kind::Full if depth != 0 => {
                return Err(bad("a whole or full state with a depth"));
            }
            _ => {}
        }
        let count = usize::try_from(u32_at(112)).map_err(|_| bad("part count"))?;
        let content_bytes = u64_at(24);
        let inline_len = if count == 0 {
            usize::try_from(content_bytes)
                .ok()
                .filter(|&n| n <= INLINE_BYTES_MAX)
                .ok_or(bad("inline content longer than 65,536 bytes"))?
        } else {
            0
        };
        if count > PARTS_MAX
            || p.len() != MANIFEST_FIXED_BYTES + count * PART_REF_BYTES + inline_len
        {
            return Err(bad("its length does not match its part count and content"));
        }
        let refs_end = MANIFEST_FIXED_BYTES + count * PART_REF_BYTES;
        let inline = p[refs_end..].to_vec();
        let parts: Vec<PartRef> = p[MANIFEST_FIXED_BYTES..refs_end]
            .chunks_exact(PART_REF_BYTES)
            .map(|c| {
                let mut v = [0; 8];
                v.copy_from_slice(&c[0..8]);
                let mut l = [0; 4];
                l.copy_from_slice(&c[8..12]);
                let mut h = [0; 32];
                h.copy_from_slice(&c[12..44]);
                PartRef {
                    version: u64::from_le_bytes(v),
                    len: u32::from_le_bytes(l),
                    hash: h,
                }
            })
            .collect();
        let sum = parts.iter().map(|r| u64::from(r.len)).sum::<u64>() + inline.len() as u64;
        if sum != content_bytes {
            return Err(bad(
                "its parts' lengths do not add up to its content length",
            ));
        }
        if parts
            .iter()
            .any(|r| r.len == 0 || r.len as usize > PART_BYTES_MAX)
        {
            return Err(bad("a part is empty or longer than a payload"));
        }
        let previous = opt(u64_at(104));
        // Parts, the base and the previous manifest all come before the manifest, in
        // stream order: a manifest that names itself or later events cannot be loaded.
        if parts.windows(2).any(|w| w[0].version >= w[1].version) {
            return Err(bad("its parts are not in stream order"));
        }
        Ok(Manifest {
            at: u64_at(4),
            state_version: u32_at(12),
            kind,
            depth,
            content_bytes,
            content_hash: hash_at(32),
            base,
            previous,
            parts,
            inline,
        })
    }

    /// Checks that everything this manifest names comes before it in its stream.
    ///
    /// # Errors
    /// [`StateError::Manifest`].
    pub fn check_placed(&self, own_version: u64) -> Result<(), StateError> {
        let before = |v: u64| v < own_version;
        if !self.parts.iter().all(|r| before(r.version))
            || !self.base.is_none_or(|b| before(b.version))
            || !self.previous.is_none_or(before)
        {
            return Err(StateError::Manifest(
                "it names a part, base or previous manifest at or after itself",
            ));
        }
        Ok(())
    }
}

/// Cuts content into parts as it is written, hashing each and the whole. No I/O: the
/// caller takes the finished parts with [`PartCutter::take_ready`] and stores them.
#[derive(Debug)]
pub struct PartCutter {
    part_bytes: usize,
    current: Vec<u8>,
    ready: Vec<Vec<u8>>,
    refs: Vec<(u32, Hash32)>,
    content: blake3::Hasher,
    content_bytes: u64,
}

impl PartCutter {
    /// A cutter making parts of `part_bytes` (clamped to `1..=PART_BYTES_MAX`).
    #[must_use]
    pub fn new(part_bytes: usize) -> PartCutter {
        PartCutter {
            part_bytes: part_bytes.clamp(1, PART_BYTES_MAX),
            current: Vec::new(),
            ready: Vec::new(),
            refs: Vec::new(),
            content: blake3::Hasher::new(),
            content_bytes: 0,
        }
    }

    fn seal(&mut self) {
        if self.current.is_empty() {
            return;
        }
        let part = std::mem::take(&mut self.current);
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        self.refs.push((len, hash(&part)));
        self.ready.push(part);
    }

    /// Bytes of finished parts not yet taken.
    #[must_use]
    pub fn ready_bytes(&self) -> usize {
        self.ready.iter().map(Vec::len).sum()
    }

    /// The finished parts not yet taken, in order.
    pub fn take_ready(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.ready)
    }

    /// Ends the content: the last part is finished (take it with
    /// [`PartCutter::take_ready`]); returns the content's length, its hash, and each part's
    /// length and hash in order.
    pub fn finish(&mut self) -> (u64, Hash32, Vec<(u32, Hash32)>) {
        self.seal();
        let h = *self.content.finalize().as_bytes();
        (self.content_bytes, h, std::mem::take(&mut self.refs))
    }
}

impl Write for PartCutter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.part_bytes - self.current.len();
        let n = room.min(buf.len());
        self.current.extend_from_slice(&buf[..n]);
        self.content.update(&buf[..n]);
        self.content_bytes += n as u64;
        if self.current.len() == self.part_bytes {
            self.seal();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes partition entries (FORMAT.md 18.4) to content, refusing keys out of order.
#[derive(Debug)]
pub struct EntryWriter<W> {
    out: W,
    last: Option<Vec<u8>>,
    entries: u64,
}

impl<W: Write> EntryWriter<W> {
    /// Entries written to `out`.
    pub fn new(out: W) -> EntryWriter<W> {
        EntryWriter {
            out,
            last: None,
            entries: 0,
        }
    }

    /// Writes partition `key` with `value`, or its removal (`None`). Keys must ascend.
    ///
    /// # Errors
    /// A key that is empty, too long, or not after the previous one (`InvalidInput`), or
    /// the writer's own error.
    pub fn entry(&mut self, key: &[u8], value: Option<&[u8]>) -> io::Result<()> {
        if key.is_empty() || key.len() > KEY_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "partition key of {} bytes outside 1..={KEY_BYTES_MAX}",
                    key.len()
                ),
            ));
        }
        if self.last.as_deref().is_some_and(|last| last >= key) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "partition keys must be written in ascending order, each once",
            ));
        }
        let len = u32::try_from(key.len()).unwrap_or(u32::MAX);
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(key)?;
        match value {
            None => self.out.write_all(&[0])?,
            Some(v) => {
                let vlen = u32::try_from(v.len()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "a partition of 4 GiB or more")
                })?;
                self.out.write_all(&[1])?;
                self.out.write_all(&vlen.to_le_bytes())?;
                self.out.write_all(v)?;
            }
        }
        self.last = Some(key.to_vec());
        self.entries += 1;
        Ok(())
    }

    /// Entries written so far.
    #[must_use]
    pub fn entries(&self) -> u64 {
        self.entries
    }
}

/// Reads partition entries from content, checking their order and lengths; holds one
/// entry at a time.
#[derive(Debug)]
pub struct EntryReader<R> {
    input: R,
    offset: u64,
    last: Option<Vec<u8>>,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl<R: Read> EntryReader<R> {
    /// Entries read from `input`.
    pub fn new(input: R) -> EntryReader<R> {
        EntryReader {
            input,
            offset: 0,
            last: None,
            key: Vec::new(),
            value: Vec::new(),
        }
    }

    /// The next entry: its key and value (`None`: a removal), or `None` at the end.
    ///
    /// # Errors
    /// [`StateError::Entry`] for malformed entries, or what the input failed with.
    #[allow(clippy::type_complexity)]
    pub fn next_entry(&mut self) -> Result<Option<(&[u8], Option<&[u8]>)>, StateError> {
        let start = self.offset;
        let bad = |reason| StateError::Entry {
            offset: start,
            reason,
        };
        let mut len = [0u8; 4];
        match read_exact_or_end(&mut self.input, &mut len).map_err(StateError::from_io)? {
            0 => return Ok(None),
            4 => {}
            _ => return Err(bad("the content ends inside a key length")),
        }
        let key_len = u32::from_le_bytes(len) as usize;
        if key_len == 0 || key_len > KEY_BYTES_MAX {
            return Err(bad("a key length outside 1..=65536"));
        }
        self.key.clear();
        self.key.resize(key_len, 0);
        self.input
            .read_exact(&mut self.key)
            .map_err(|e| eof_as(e, bad("the content ends inside a key")))?;
        if self
            .last
            .as_deref()
            .is_some_and(|l| l >= self.key.as_slice())
        {
            return Err(bad("keys are not in ascending order"));
        }
        let mut op = [0u8; 1];
        self.input
            .read_exact(&mut op)
            .map_err(|e| eof_as(e, bad("the content ends before an entry's operation")))?;
        self.offset += 4 + key_len as u64 + 1;
        let present = match op[0] {
            0 => false,
            1 => true,
            _ => return Err(bad("an operation other than 0 (remove) or 1 (put)")),
        };
        self.value.clear();
        if present {
            self.input
                .read_exact(&mut len)
                .map_err(|e| eof_as(e, bad("the content ends inside a value length")))?;
            let value_len = u64::from(u32::from_le_bytes(len));
            // Grown as bytes arrive, never sized by the length field alone.
            let got = (&mut self.input)
                .take(value_len)
                .read_to_end(&mut self.value)
                .map_err(StateError::from_io)?;
            if got as u64 != value_len {
                return Err(bad("the content ends inside a value"));
            }
            self.offset += 4 + value_len;
        }
        self.last = Some(self.key.clone());
        Ok(Some((&self.key, present.then_some(self.value.as_slice()))))
    }
}

/// Reads into `buf` until it is full or the input ends; returns the bytes read.
fn read_exact_or_end(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn eof_as(e: io::Error, err: StateError) -> StateError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        err
    } else {
        StateError::from_io(e)
    }
}

/// Checks one part's event against its reference.
///
/// # Errors
/// [`StateError::NotAPart`] or [`StateError::PartMismatch`].
pub fn check_part(
    index: usize,
    r: &PartRef,
    event_type: &str,
    payload: &[u8],
) -> Result<(), StateError> {
    if event_type != PART_EVENT_TYPE {
        return Err(StateError::NotAPart {
            part: index,
            version: r.version,
            event_type: event_type.to_owned(),
        });
    }
    let mismatch = |what| StateError::PartMismatch {
        part: index,
        version: r.version,
        what,
    };
    if payload.len() != r.len as usize {
        return Err(mismatch("length"));
    }
    if hash(payload) != r.hash {
        return Err(mismatch("BLAKE3 hash"));
    }
    Ok(())
}

/// A manifest's content, read from its parts one at a time and checked against the
/// manifest as it goes: each part's type, length and hash before any of its bytes are
/// handed out, and the content's length and hash at its end.
pub struct PartReader<'m, F> {
    manifest: &'m Manifest,
    fetch: F,
    next_part: usize,
    current: Vec<u8>,
    at: usize,
    content: blake3::Hasher,
    done: bool,
}

impl<F> std::fmt::Debug for PartReader<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartReader")
            .field("next_part", &self.next_part)
            .finish_non_exhaustive()
    }
}

impl<'m, F> PartReader<'m, F>
where
    F: FnMut(u64) -> Result<Option<(String, Vec<u8>)>, StateError>,
{
    /// Reads `manifest`'s content; `fetch(version)` returns the event type and payload of
    /// the state stream's event at `version`, or `None` when there is none.
    pub fn new(manifest: &'m Manifest, fetch: F) -> PartReader<'m, F> {
        PartReader {
            manifest,
            fetch,
            next_part: 0,
            current: Vec::new(),
            at: 0,
            content: blake3::Hasher::new(),
            done: false,
        }
    }

    fn load_next(&mut self) -> Result<bool, StateError> {
        if self.manifest.parts.is_empty() && self.next_part == 0 && !self.manifest.inline.is_empty()
        {
            // Inline content: part of the manifest, which is checked already.
            self.current = self.manifest.inline.clone();
            self.content.update(&self.current);
            self.at = 0;
            self.next_part = 1;
            return Ok(true);
        }
        let Some(r) = self.manifest.parts.get(self.next_part) else {
            if !self.done {
                self.done = true;
                if *self.content.finalize().as_bytes() != self.manifest.content_hash {
                    return Err(StateError::ContentMismatch("BLAKE3 hash"));
                }
            }
            return Ok(false);
        };
        let index = self.next_part;
        let (event_type, payload) = (self.fetch)(r.version)?.ok_or(StateError::PartMissing {
            part: index,
            version: r.version,
        })?;
        check_part(index, r, &event_type, &payload)?;
        self.content.update(&payload);
        self.current = payload;
        self.at = 0;
        self.next_part += 1;
        Ok(true)
    }
}

impl<F> Read for PartReader<'_, F>
where
    F: FnMut(u64) -> Result<Option<(String, Vec<u8>)>, StateError>,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            if !self.load_next().map_err(StateError::into_io)? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Checks that a decoder read the whole content: the read at its end is what checks the
/// content's hash, so a decoder that stops early must not skip the manifest's checks, and
/// bytes it left unread are an error.
///
/// # Errors
/// As [`PartReader`]'s reads, or [`StateError::State`] when content is left.
pub fn drain<R: Read>(reader: &mut R) -> Result<(), StateError> {
    match reader.read(&mut [0u8; 1]) {
        Ok(0) => Ok(()),
        Ok(_) => Err(StateError::State(
            "its decoder stopped before the end of its content".to_owned(),
        )),
        Err(e) => Err(StateError::from_io(e)),
    }
}

/// Fetches the event at `version` of `stream` in `log`, for a [`PartReader`].
///
/// # Errors
/// [`StateError::Log`].
pub fn fetch_from(
    log: &Log,
    stream: &str,
    version: u64,
) -> Result<Option<(String, Vec<u8>)>, StateError> {
    let page = log.read_stream(stream, version, 1, Direction::Forward)?;
    Ok(page
        .into_iter()
        .find(|e| e.version == version)
        .map(|e| (e.event_type().to_owned(), e.payload().to_vec())))
}

/// What a write of a state stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The manifest's version in the state's stream.
    pub version: u64,
    /// BLAKE3 of the manifest's payload.
    pub hash: Hash32,
    /// The content's length.
    pub content_bytes: u64,
    /// The number of parts.
    pub parts: usize,
}

/// What a manifest about to be written says, besides its parts.
#[derive(Clone, Copy, Debug)]
pub struct ManifestHead {
    /// See [`Manifest::at`].
    pub at: u64,
    /// See [`Manifest::state_version`].
    pub state_version: u32,
    /// See [`Manifest::kind`].
    pub kind: Kind,
    /// See [`Manifest::depth`].
    pub depth: u32,
    /// See [`Manifest::base`].
    pub base: Option<Base>,
    /// See [`Manifest::previous`].
    pub previous: Option<u64>,
}

/// Appends the parts written to it to a stream of the log, a batch of at most
/// `batch_bytes` at a time.
struct LogParts<'a> {
    log: &'a Log,
    stream: &'a str,
    cutter: PartCutter,
    batch_bytes: usize,
    versions: Vec<u64>,
}

impl LogParts<'_> {
    fn flush_ready(&mut self, all: bool) -> Result<(), StateError> {
        if self.cutter.ready_bytes() == 0 || (!all && self.cutter.ready_bytes() < self.batch_bytes)
        {
            return Ok(());
        }
        let events: Vec<EventData> = self
            .cutter
            .take_ready()
            .into_iter()
            .map(|p| EventData::new(PART_EVENT_TYPE, p))
            .collect();
        let r = self
            .log
            .append(self.stream, ExpectedVersion::Any, &events)?;
        self.versions.extend(r.first_version..=r.last_version);
        Ok(())
    }
}

impl Write for LogParts<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.cutter.write(buf)?;
        self.flush_ready(false).map_err(StateError::into_io)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How a state is cut and batched when written.
#[derive(Clone, Copy, Debug)]
pub struct PartOptions {
    /// Content bytes per part (at most one payload).
    pub part_bytes: usize,
    /// Part bytes held before they are appended, in one batch.
    pub batch_bytes: usize,
}

impl Default for PartOptions {
    fn default() -> PartOptions {
        PartOptions {
            part_bytes: PART_BYTES_MAX,
            batch_bytes: 8 * PART_BYTES_MAX,
        }
    }
}

/// Writes a state to `stream`: `content` writes its encoding, which is cut into parts and
/// appended a batch at a time as it is written (so the encoding is never held whole), then
/// the manifest is appended. Only the manifest makes the state loadable.
///
/// # Errors
/// [`StateError`]: what `content` or the log failed with; parts already appended stay
/// unnamed and are never loaded.
pub fn write_parts(
    log: &Log,
    stream: &str,
    head: ManifestHead,
    opts: PartOptions,
    content: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Stored, StateError> {
    let mut sink = LogParts {
        log,
        stream,
        cutter: PartCutter::new(opts.part_bytes),
        batch_bytes: opts.batch_bytes.max(1),
        versions: Vec::new(),
    };
    content(&mut sink).map_err(StateError::from_io)?;
    let (content_bytes, content_hash, refs) = sink.cutter.finish();
    let fits = content_bytes as usize <= INLINE_BYTES_MAX.min(opts.part_bytes);
    let inline = if sink.versions.is_empty() && fits {
        sink.cutter.take_ready().concat()
    } else {
        sink.flush_ready(true)?;
        Vec::new()
    };
    if refs.len() > PARTS_MAX {
        return Err(StateError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a state of {content_bytes} bytes needs {} parts, more than one manifest names ({PARTS_MAX})",
                refs.len()
            ),
        )));
    }
    let parts: Vec<PartRef> = if inline.is_empty() {
        sink.versions
            .iter()
            .zip(&refs)
            .map(|(&version, &(len, hash))| PartRef { version, len, hash })
            .collect()
    } else {
        Vec::new()
    };
    let manifest = Manifest {
        at: head.at,
        state_version: head.state_version,
        kind: head.kind,
        depth: head.depth,
        content_bytes,
        content_hash,
        base: head.base,
        previous: head.previous,
        parts,
        inline,
    };
    let payload = manifest.encode();
    let h = manifest_hash(&payload);
    let r = log.append(
        stream,
        ExpectedVersion::Any,
        &[EventData::new(MANIFEST_EVENT_TYPE, payload)],
    )?;
    Ok(Stored {
        version: r.last_version,
        hash: h,
        content_bytes,
        parts: manifest.parts.len(),
    })
}

/// One manifest found in a state's stream, with where it is and its payload's hash.
#[derive(Clone, Debug)]
pub struct Found {
    /// Its version in the stream.
    pub version: u64,
    /// BLAKE3 of its payload.
    pub hash: Hash32,
    /// The manifest.
    pub manifest: Manifest,
}

impl Found {
    /// The event at `version` of type `event_type` as a manifest, if it is one.
    ///
    /// # Errors
    /// [`StateError::Manifest`] when it is a manifest event that does not decode or names
    /// events at or after itself.
    pub fn from_event(
        version: u64,
        event_type: &str,
        payload: &[u8],
    ) -> Result<Option<Found>, StateError> {
        if event_type != MANIFEST_EVENT_TYPE {
            return Ok(None);
        }
        let manifest = Manifest::decode(payload)?;
        manifest.check_placed(version)?;
        Ok(Some(Found {
            version,
            hash: manifest_hash(payload),
            manifest,
        }))
    }
}

/// One event of a state's stream: its version, type and payload.
pub type StreamEvent = (u64, String, Vec<u8>);

/// Where stored states are read from: a state's stream, in the log or through a server.
pub trait StateSource {
    /// The newest event of the stream at or below `version` (`u64::MAX`: the newest).
    ///
    /// # Errors
    /// [`StateError::Log`], or what the source fails with.
    fn at_or_before(&mut self, version: u64) -> Result<Option<StreamEvent>, StateError>;

    /// The event at `version`: its type and payload.
    ///
    /// # Errors
    /// As [`StateSource::at_or_before`].
    fn at(&mut self, version: u64) -> Result<Option<(String, Vec<u8>)>, StateError>;
}

/// A state's stream in a log.
#[derive(Debug)]
pub struct LogSource<'a> {
    /// The log.
    pub log: &'a Log,
    /// The stream.
    pub stream: &'a str,
}

impl StateSource for LogSource<'_> {
    fn at_or_before(&mut self, version: u64) -> Result<Option<StreamEvent>, StateError> {
        let page = self
            .log
            .read_stream(self.stream, version, 1, Direction::Backward)?;
        Ok(page
            .into_iter()
            .next()
            .map(|e| (e.version, e.event_type().to_owned(), e.payload().to_vec())))
    }

    fn at(&mut self, version: u64) -> Result<Option<(String, Vec<u8>)>, StateError> {
        fetch_from(self.log, self.stream, version)
    }
}

/// The manifests a load of `newest` reads, oldest (the full checkpoint) first: each
/// delta's base is fetched by version and must have the hash, depth and state version the
/// delta names.
///
/// # Errors
/// [`StateError::Base`] naming the base that is missing or differs.
pub fn chain(
    newest: Found,
    mut fetch: impl FnMut(u64) -> Result<Option<(String, Vec<u8>)>, StateError>,
) -> Result<Vec<Found>, StateError> {
    let mut chain = vec![newest];
    let mut held = 0usize;
    loop {
        let top = &chain[chain.len() - 1].manifest;
        let Some(base) = top.base else { break };
        held += MANIFEST_FIXED_BYTES + top.parts.len() * PART_REF_BYTES + top.inline.len();
        if held > CHAIN_BYTES_MAX {
            return Err(StateError::ChainTooLarge {
                max: CHAIN_BYTES_MAX,
            });
        }
        let bad = |reason: String| StateError::Base {
            version: base.version,
            reason,
        };
        let (event_type, payload) =
            fetch(base.version)?.ok_or_else(|| bad("no event at that version".to_owned()))?;
        if event_type != MANIFEST_EVENT_TYPE {
            return Err(bad(format!("it is a {event_type:?} event, not a manifest")));
        }
        if manifest_hash(&payload) != base.hash {
            return Err(bad(
                "its BLAKE3 hash differs from the one the delta names".to_owned()
            ));
        }
        let m = Manifest::decode(&payload).map_err(|e| bad(e.to_string()))?;
        m.check_placed(base.version)
            .map_err(|e| bad(e.to_string()))?;
        if m.depth + 1 != top.depth
            || m.state_version != top.state_version
            || m.kind == Kind::Whole
            || m.at > top.at
        {
            return Err(bad(
                "its depth, state version, kind or position does not precede the delta's"
                    .to_owned(),
            ));
        }
        chain.push(Found {
            version: base.version,
            hash: base.hash,
            manifest: m,
        });
    }
    chain.reverse();
    Ok(chain)
}
