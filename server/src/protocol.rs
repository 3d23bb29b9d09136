//! The wire protocol: frames, requests, responses and error codes (docs/PROTOCOL.md).
//!
//! Pure encoding and decoding, with no I/O, shared by the server and the client. Every
//! length read from the network is checked against the bytes actually received before it
//! is used, and every count is checked against the smallest size its items can take before
//! anything is allocated for it, so hostile bytes produce a [`ProtocolError`], never a
//! panic or a large allocation.
//!
//! All integers are little-endian. Strings are a `u16` byte length followed by UTF-8.

use bytes::Bytes;
use tally_engine::format::blob::BlobRef;
use tally_engine::format::envelope::{EnvelopeRef, PayloadForm};
use tally_engine::{
    AppendResult, ContentType, EventData, EventId, EventView, ExpectedVersion, Position,
    StreamInfo, Timestamp,
};

/// The protocol version this build speaks (the only one so far).
pub const PROTOCOL_VERSION: u16 = 1;
/// The four bytes a HELLO request starts with.
pub const MAGIC: [u8; 4] = *b"TALY";
/// The TCP port `tallyd` listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7878;
/// Bytes of the frame header after the length field: opcode, flags, request id.
pub const FRAME_HEADER_BYTES: usize = 6;
/// Bytes of the length field.
pub const LENGTH_BYTES: usize = 4;
/// The largest HELLO frame (the length field's value): header, magic, two versions and a
/// client name of at most 65,535 bytes. A server reads the first frame of a connection
/// with this limit, so that a client that has not said HELLO cannot make it reserve a
/// frame of `frame_bytes_max`.
pub const HELLO_FRAME_BYTES_MAX: u32 = (FRAME_HEADER_BYTES + MAGIC.len() + 4 + 2 + 65_535) as u32;
/// The default largest frame (the length field's value), either way.
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 4 << 20;
/// The smallest largest frame a server may announce: one event of the largest size fits.
pub const FRAME_BYTES_MAX_FLOOR: u32 = 2 << 20;
/// Events a single append (all parts of a multi-stream append together) may carry.
pub const APPEND_EVENTS_MAX_DEFAULT: u32 = 10_000;
/// Streams one multi-stream append may name.
pub const APPEND_PARTS_MAX: u16 = 1_000;
/// Event types one filter may name.
pub const FILTER_TYPES_MAX: u16 = 64;
/// Bytes a PING may carry.
pub const PING_BYTES_MAX: usize = 1024;
/// Wire value of [`ExpectedVersion::Any`].
pub const EXPECT_ANY: u64 = u64::MAX;
/// Wire value of [`ExpectedVersion::NoStream`].
pub const EXPECT_NO_STREAM: u64 = u64::MAX - 1;
/// Wire value of [`ExpectedVersion::StreamExists`].
pub const EXPECT_STREAM_EXISTS: u64 = u64::MAX - 2;
/// Streams whose name starts with this are the server's own (consumer checkpoints).
pub const SYSTEM_STREAM_PREFIX: &str = "$";
/// The stream a named consumer's checkpoints are stored in is this prefix and the name.
pub const CONSUMER_STREAM_PREFIX: &str = "$consumer-";
/// The event type of a stored consumer checkpoint.
pub const CONSUMER_EVENT_TYPE: &str = "$ConsumerCheckpoint";
/// Bytes of a signed checkpoint entry with a version 1 statement in a LATEST_CHECKPOINT
/// response (FORMAT.md §17); a version 2 statement's entry is
/// [`CHECKPOINT_ENTRY_V2_BYTES`].
pub const CHECKPOINT_ENTRY_BYTES: usize = tally_engine::format::checkpoint::ENTRY_LEN;
/// Bytes of a signed checkpoint entry with a version 2 statement.
pub const CHECKPOINT_ENTRY_V2_BYTES: usize = tally_engine::format::checkpoint::ENTRY_V2_LEN;

/// Operation codes. A response's opcode is its request's with the high bit set; pushes
/// and errors have their own.
pub mod op {
    /// Handshake.
    pub const HELLO: u8 = 0x01;
    /// Liveness check, echoes its payload.
    pub const PING: u8 = 0x02;
    /// Server and log facts.
    pub const SERVER_INFO: u8 = 0x03;
    /// Append to one stream.
    pub const APPEND: u8 = 0x10;
    /// Atomic append to several streams.
    pub const APPEND_MULTI: u8 = 0x11;
    /// [`APPEND_MULTI`] of a batch signed by a producer.
    pub const APPEND_SIGNED: u8 = 0x12;
    /// Upload a blob in pieces (a payload stored in the log's store by its hash).
    pub const BLOB_PUT: u8 = 0x13;
    /// Read one stream.
    pub const READ_STREAM: u8 = 0x20;
    /// Read the whole log, optionally filtered.
    pub const READ_ALL: u8 = 0x21;
    /// One stream's facts.
    pub const STREAM_INFO: u8 = 0x22;
    /// Events found through the attribute indexes.
    pub const FIND: u8 = 0x23;
    /// Read a piece of a blob.
    pub const BLOB_READ: u8 = 0x24;
    /// Start a subscription.
    pub const SUBSCRIBE: u8 = 0x30;
    /// Grant a subscription more events (no response).
    pub const CREDIT: u8 = 0x31;
    /// End a subscription.
    pub const UNSUBSCRIBE: u8 = 0x32;
    /// Store a named consumer's position.
    pub const CHECKPOINT_STORE: u8 = 0x40;
    /// Fetch a named consumer's position.
    pub const CHECKPOINT_FETCH: u8 = 0x41;
    /// Store a projection's checkpoint (position and state).
    pub const PROJECTION_STORE: u8 = 0x42;
    /// Register a schema version of an event type.
    pub const REGISTER_SCHEMA: u8 = 0x43;
    /// Append one part or the manifest of a projection's checkpoint of any size.
    pub const PROJECTION_APPEND: u8 = 0x44;
    /// Retention policies, legal holds and retention runs (JSON in, JSON out).
    pub const GOVERN: u8 = 0x45;
    /// The latest signed checkpoint.
    pub const LATEST_CHECKPOINT: u8 = 0x50;
    /// An inclusion proof for a position.
    pub const INCLUSION_PROOF: u8 = 0x51;
    /// A checkpoint as a signed note, with its cosignatures (for witnesses and auditors).
    pub const CHECKPOINT_NOTE: u8 = 0x52;
    /// A consistency proof between two tree sizes.
    pub const CONSISTENCY_PROOF: u8 = 0x53;
    /// Hand a witness's cosignature of a checkpoint to the log.
    pub const ADD_COSIGNATURE: u8 = 0x54;
    /// Marks a response.
    pub const RESPONSE_BIT: u8 = 0x80;
    /// Push: events of a subscription.
    pub const SUB_EVENTS: u8 = 0xE0;
    /// Push: the subscription has delivered everything that existed and is now live.
    pub const SUB_CAUGHT_UP: u8 = 0xE1;
    /// Push: the server ended the subscription.
    pub const SUB_ENDED: u8 = 0xE2;
    /// An error response (or, with request id 0, a connection-level error).
    pub const ERROR: u8 = 0xFF;
}

/// Stable numeric error codes. Published codes are never reused or renumbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame's length is out of range; the connection is closed.
    BadFrame = 1,
    /// No protocol version in common; the connection is closed.
    UnsupportedVersion = 2,
    /// The first frame was not a HELLO; the connection is closed.
    HandshakeRequired = 3,
    /// The opcode is not a request this server knows.
    UnknownOperation = 4,
    /// The payload does not decode (truncated, trailing bytes, a bad enum value).
    MalformedRequest = 5,
    /// A string is not UTF-8.
    InvalidUtf8 = 6,
    /// A protocol limit was exceeded (events per append, parts, filter size, ping size).
    LimitExceeded = 7,
    /// The server has as many connections as it accepts; the connection is closed.
    TooManyConnections = 8,
    /// The connection has as many subscriptions as the server allows.
    TooManySubscriptions = 9,
    /// No HELLO within the handshake timeout, or idle too long; the connection is closed.
    Timeout = 10,
    /// The server is shutting down; the request was not executed.
    ShuttingDown = 11,
    /// Clients may not append to streams starting with `$`.
    ReservedStream = 12,
    /// The subscription id names no subscription of this connection.
    UnknownSubscription = 13,
    /// The stream's version is not the expected one; nothing was written.
    WrongExpectedVersion = 20,
    /// An event breaks an envelope limit; nothing was written.
    InvalidEvent = 21,
    /// The append is malformed (empty, a stream twice, an event id twice).
    InvalidAppend = 22,
    /// The batch does not fit in one segment.
    BatchTooLarge = 23,
    /// Some but not all of the batch's event ids were written before.
    PartialDuplicate = 24,
    /// An event id was already written to another stream.
    DuplicateEventId = 25,
    /// The log refuses writes after a failed sync.
    Poisoned = 30,
    /// The log is read-only.
    ReadOnly = 31,
    /// Stored data is damaged.
    Corrupt = 32,
    /// A file-system error on the server.
    Io = 33,
    /// The proof asked for is not available (position or size out of range, no checkpoint).
    ProofUnavailable = 34,
    /// A blob is not in the log's store with the bytes its reference names, the log has no
    /// store, or the store failed.
    BlobUnavailable = 35,
    /// An erasure was refused because a legal hold covers an event holding the subject's
    /// data; the message names the hold. Nothing was erased.
    ErasureHeld = 36,
    /// A schema registration was refused (not a schema, not the next version, or a
    /// breaking change); nothing was written.
    SchemaRefused = 26,
    /// An event's payload does not match its registered schema; nothing was written.
    SchemaViolation = 27,
    /// A cosignature was refused: it names no checkpoint of the log, or does not verify
    /// over that checkpoint's note; nothing was stored.
    CosignatureRefused = 28,
    /// A producer signature is missing where the log's policy requires one, is by a key the
    /// log does not accept for the stream, or does not verify; nothing was written.
    SignatureRefused = 29,
    /// Anything else: a bug on the server.
    Internal = 99,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 31] = [
        ErrorCode::BadFrame,
        ErrorCode::UnsupportedVersion,
        ErrorCode::HandshakeRequired,
        ErrorCode::UnknownOperation,
        ErrorCode::MalformedRequest,
        ErrorCode::InvalidUtf8,
        ErrorCode::LimitExceeded,
        ErrorCode::TooManyConnections,
        ErrorCode::TooManySubscriptions,
        ErrorCode::Timeout,
        ErrorCode::ShuttingDown,
        ErrorCode::ReservedStream,
        ErrorCode::UnknownSubscription,
        ErrorCode::WrongExpectedVersion,
        ErrorCode::InvalidEvent,
        ErrorCode::InvalidAppend,
        ErrorCode::BatchTooLarge,
        ErrorCode::PartialDuplicate,
        ErrorCode::DuplicateEventId,
        ErrorCode::Poisoned,
        ErrorCode::ReadOnly,
        ErrorCode::Corrupt,
        ErrorCode::Io,
        ErrorCode::ProofUnavailable,
        ErrorCode::BlobUnavailable,
        ErrorCode::ErasureHeld,
        ErrorCode::SchemaRefused,
        ErrorCode::SchemaViolation,
        ErrorCode::CosignatureRefused,
        ErrorCode::SignatureRefused,
        ErrorCode::Internal,
    ];

    /// The code's number.
    #[must_use]
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code of a number, if it is one this build knows.
    #[must_use]
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_u16() == v)
    }
}

/// Why bytes from the network were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The payload ended inside a field.
    #[error("truncated {what}: needs {need} more bytes, {left} left")]
    Truncated {
        /// The field.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left in the frame.
        left: usize,
    },
    /// Bytes were left after the last field.
    #[error("{left} unexpected bytes after the {what} payload")]
    Trailing {
        /// The operation.
        what: &'static str,
        /// Bytes left over.
        left: usize,
    },
    /// A string field is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        what: &'static str,
    },
    /// A field holds a value outside its range.
    #[error("invalid {what}: {value}")]
    InvalidValue {
        /// The field.
        what: &'static str,
        /// The value received.
        value: u64,
    },
    /// A count or length exceeds a protocol limit.
    #[error("{what} of {value} exceeds the limit of {max}")]
    Limit {
        /// What was counted.
        what: &'static str,
        /// The count received.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// The opcode is unknown.
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    /// The frame's length field is out of range.
    #[error("frame length {len} outside {min}..={max}")]
    FrameLength {
        /// The length received.
        len: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
}

impl ProtocolError {
    /// The error code a server answers this with.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::InvalidUtf8 { .. } => ErrorCode::InvalidUtf8,
            ProtocolError::Limit { .. } => ErrorCode::LimitExceeded,
            ProtocolError::UnknownOpcode(_) => ErrorCode::UnknownOperation,
            ProtocolError::FrameLength { .. } => ErrorCode::BadFrame,
            _ => ErrorCode::MalformedRequest,
        }
    }
}

/// The six bytes after a frame's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame is.
    pub opcode: u8,
    /// Reserved, zero.
    pub flags: u8,
    /// The request this frame is or answers (a subscription's pushes carry the id of its
    /// SUBSCRIBE request).
    pub request_id: u32,
}

/// Checks a frame's length field against the limits: at least the header, at most `max`.
///
/// # Errors
/// [`ProtocolError::FrameLength`].
pub fn check_frame_len(len: u32, max: u32) -> Result<(), ProtocolError> {
    let min = FRAME_HEADER_BYTES as u32;
    if len < min || len > max {
        return Err(ProtocolError::FrameLength { len, min, max });
    }
    Ok(())
}

/// Splits a frame body (the bytes after the length field) into its header and payload.
///
/// # Errors
/// [`ProtocolError::Truncated`] if it is shorter than the header.
pub fn split_frame(body: &[u8]) -> Result<(FrameHeader, &[u8]), ProtocolError> {
    let mut r = Reader::new(body);
    let opcode = r.u8("opcode")?;
    let flags = r.u8("flags")?;
    let request_id = r.u32("request id")?;
    Ok((
        FrameHeader {
            opcode,
            flags,
            request_id,
        },
        r.rest(),
    ))
}

/// Starts a frame in `out`: a length placeholder and the header. Finish it with
/// [`finish_frame`] after writing the payload.
pub fn start_frame(out: &mut Vec<u8>, opcode: u8, request_id: u32) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_BYTES]);
    out.push(opcode);
    out.push(0);
    out.extend_from_slice(&request_id.to_le_bytes());
    start
}

/// Writes the length of the frame that starts at `start` (everything to the end of `out`).
///
/// # Panics
/// If the frame is longer than `u32::MAX` bytes (callers bound frames far below that).
pub fn finish_frame(out: &mut [u8], start: usize) {
    let len = u32::try_from(out.len() - start - LENGTH_BYTES).expect("frame fits in u32");
    out[start..start + LENGTH_BYTES].copy_from_slice(&len.to_le_bytes());
}

/// A cursor over untrusted bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `b`.
    #[must_use]
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }

    /// Bytes left.
    #[must_use]
    pub fn left(&self) -> usize {
        self.b.len()
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    /// The next `n` bytes.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`].
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if n > self.b.len() {
            return Err(ProtocolError::Truncated {
                what,
                need: n,
                left: self.b.len(),
            });
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    /// A byte.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`].
    pub fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A little-endian `u16`.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`].
    pub fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    /// A little-endian `u32`.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`].
    pub fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A little-endian `u64`.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`].
    pub fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A string: `u16` length and UTF-8.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`], [`ProtocolError::InvalidUtf8`].
    pub fn str(&mut self, what: &'static str) -> Result<&'a str, ProtocolError> {
        let n = self.u16(what)? as usize;
        std::str::from_utf8(self.take(n, what)?).map_err(|_| ProtocolError::InvalidUtf8 { what })
    }

    /// Length-prefixed (`u32`) bytes.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`].
    pub fn bytes32(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    /// A count whose items take at least `item_min` bytes each, checked against the bytes
    /// left and against `max` before anyone allocates for it.
    ///
    /// # Errors
    /// [`ProtocolError::Limit`], [`ProtocolError::Truncated`].
    pub fn count(
        &mut self,
        n: u64,
        item_min: usize,
        max: u64,
        what: &'static str,
    ) -> Result<usize, ProtocolError> {
        if n > max {
            return Err(ProtocolError::Limit {
                what,
                value: n,
                max,
            });
        }
        let need = (n as usize).saturating_mul(item_min);
        if need > self.b.len() {
            return Err(ProtocolError::Truncated {
                what,
                need,
                left: self.b.len(),
            });
        }
        Ok(n as usize)
    }

    /// Checks that nothing is left.
    ///
    /// # Errors
    /// [`ProtocolError::Trailing`].
    pub fn end(&self, what: &'static str) -> Result<(), ProtocolError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Trailing {
                what,
                left: self.b.len(),
            })
        }
    }
}

/// Appends a string field.
///
/// # Panics
/// If `s` is longer than `u16::MAX` bytes (every string field's limit is far below).
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    let n = u16::try_from(s.len()).expect("string fields are shorter than 64 KiB");
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends `u32`-length-prefixed bytes.
///
/// # Panics
/// If `b` is 4 GiB or longer.
pub fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    let n = u32::try_from(b.len()).expect("payloads are shorter than 4 GiB");
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(b);
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// The wire value of an expectation.
#[must_use]
pub fn expected_to_wire(e: ExpectedVersion) -> u64 {
    match e {
        ExpectedVersion::Any => EXPECT_ANY,
        ExpectedVersion::NoStream => EXPECT_NO_STREAM,
        ExpectedVersion::StreamExists => EXPECT_STREAM_EXISTS,
        ExpectedVersion::Exact(v) => {
            assert!(v < EXPECT_STREAM_EXISTS, "version {v} is out of range");
            v
        }
    }
}

/// The expectation of a wire value.
#[must_use]
pub fn expected_from_wire(v: u64) -> ExpectedVersion {
    match v {
        EXPECT_ANY => ExpectedVersion::Any,
        EXPECT_NO_STREAM => ExpectedVersion::NoStream,
        EXPECT_STREAM_EXISTS => ExpectedVersion::StreamExists,
        v => ExpectedVersion::Exact(v),
    }
}

/// Which way a read goes.
fn direction_from_wire(v: u8) -> Result<tally_engine::Direction, ProtocolError> {
    match v {
        0 => Ok(tally_engine::Direction::Forward),
        1 => Ok(tally_engine::Direction::Backward),
        v => Err(ProtocolError::InvalidValue {
            what: "direction",
            value: u64::from(v),
        }),
    }
}

fn direction_to_wire(d: tally_engine::Direction) -> u8 {
    match d {
        tally_engine::Direction::Forward => 0,
        tally_engine::Direction::Backward => 1,
    }
}

/// The `content_type` bit that marks a payload field holding a 40-byte blob reference
/// (PROTOCOL.md 4.1a).
pub const CONTENT_BLOB_BIT: u8 = 0x80;

/// A wire `content_type`: the content type and whether the payload field is a blob reference.
fn content_form_from_wire(v: u8) -> Result<(ContentType, PayloadForm), ProtocolError> {
    let form = if v & CONTENT_BLOB_BIT == 0 {
        PayloadForm::Inline
    } else {
        PayloadForm::Blob
    };
    Ok((content_type_from_wire(v & !CONTENT_BLOB_BIT)?, form))
}

fn content_form_to_wire(c: ContentType, form: PayloadForm) -> u8 {
    content_type_to_wire(c)
        | match form {
            // A sealed payload the engine could not open (it opens every other one on read)
            // goes as the opaque bytes it is.
            PayloadForm::Inline | PayloadForm::Sealed => 0,
            PayloadForm::Blob => CONTENT_BLOB_BIT,
        }
}

fn content_type_from_wire(v: u8) -> Result<ContentType, ProtocolError> {
    match v {
        0 => Ok(ContentType::Binary),
        1 => Ok(ContentType::Json),
        v => Err(ProtocolError::InvalidValue {
            what: "content type",
            value: u64::from(v),
        }),
    }
}

fn content_type_to_wire(c: ContentType) -> u8 {
    match c {
        ContentType::Binary => 0,
        ContentType::Json => 1,
    }
}

/// Smallest encoded event of an append: id, four empty strings' lengths, schema version,
/// content type, event time, payload length (and a non-empty type).
const EVENT_DATA_BYTES_MIN: usize = 16 + 2 + 4 + 2 + 1 + 2 + 2 + 2 + 8 + 4;

/// Appends one event of an append request.
pub fn put_event_data(out: &mut Vec<u8>, e: &EventData) {
    out.extend_from_slice(&e.event_id.map_or([0; 16], |id| id.0));
    put_str(out, &e.event_type);
    put_u32(out, e.schema_version);
    put_str(out, &e.aggregate_type);
    let form = if e.blob.is_some() {
        PayloadForm::Blob
    } else {
        PayloadForm::Inline
    };
    out.push(content_form_to_wire(e.content_type, form));
    put_str(out, &e.correlation_id);
    put_str(out, &e.causation_id);
    put_str(out, &e.actor);
    put_u64(out, e.event_time.map_or(0, Timestamp::as_nanos));
    match &e.blob {
        Some(b) => put_bytes32(out, &b.encode()),
        None => put_bytes32(out, &e.payload),
    }
}

fn event_data(r: &mut Reader<'_>) -> Result<EventData, ProtocolError> {
    let id: [u8; 16] = r.array("event id")?;
    let event_type = r.str("event type")?.to_owned();
    let schema_version = r.u32("schema version")?;
    let aggregate_type = r.str("aggregate type")?.to_owned();
    let (content_type, form) = content_form_from_wire(r.u8("content type")?)?;
    let correlation_id = r.str("correlation id")?.to_owned();
    let causation_id = r.str("causation id")?.to_owned();
    let actor = r.str("actor")?.to_owned();
    let event_time = r.u64("event time")?;
    let field = r.bytes32("payload")?;
    let (payload, blob) = match form {
        PayloadForm::Inline | PayloadForm::Sealed => (field.to_vec(), None),
        PayloadForm::Blob => (
            Vec::new(),
            Some(
                BlobRef::decode(field).map_err(|_| ProtocolError::InvalidValue {
                    what: "blob reference length or size",
                    value: field.len() as u64,
                })?,
            ),
        ),
    };
    Ok(EventData {
        event_id: (id != [0; 16]).then_some(EventId(id)),
        event_type,
        schema_version,
        aggregate_type,
        content_type,
        payload,
        blob,
        correlation_id,
        causation_id,
        actor,
        event_time: (event_time != 0).then_some(Timestamp(event_time)),
        personal: None,
    })
}

/// A filter of a read of the whole log or a subscription to it: both parts must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only streams starting with this (empty: all).
    pub stream_prefix: String,
    /// Only these event types (empty: all).
    pub event_types: Vec<String>,
}

impl Filter {
    /// Whether the filter lets everything through.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.stream_prefix.is_empty() && self.event_types.is_empty()
    }

    /// Whether an event of `stream` and `event_type` passes.
    #[must_use]
    pub fn matches(&self, stream: &str, event_type: &str) -> bool {
        stream.starts_with(self.stream_prefix.as_str())
            && (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type))
    }

    fn put(&self, out: &mut Vec<u8>) {
        put_str(out, &self.stream_prefix);
        put_u16(out, self.event_types.len() as u16);
        for t in &self.event_types {
            put_str(out, t);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Filter, ProtocolError> {
        let stream_prefix = r.str("stream prefix")?.to_owned();
        let n = r.u16("event type count")?;
        let n = r.count(u64::from(n), 2, u64::from(FILTER_TYPES_MAX), "event types")?;
        let mut event_types = Vec::with_capacity(n);
        for _ in 0..n {
            event_types.push(r.str("event type")?.to_owned());
        }
        Ok(Filter {
            stream_prefix,
            event_types,
        })
    }
}

/// One stream's part of an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendPart {
    /// The stream.
    pub stream: String,
    /// Its expected version.
    pub expected: ExpectedVersion,
    /// The events.
    pub events: Vec<EventData>,
}

/// What a subscription follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscribeTarget {
    /// The whole log, filtered.
    All(Filter),
    /// One stream.
    Stream(String),
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscribeFrom {
    /// At this position (all) or version (stream), inclusive.
    At(u64),
    /// After everything that exists when the server receives the request.
    Now,
}

/// What a FIND looks for (docs/PROTOCOL.md, FIND): every condition given must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FindQuery {
    /// An indexed field and its exact value (not empty; an event id in UUID text form).
    pub field: Option<(tally_engine::Field, String)>,
    /// Record times in `start..end`.
    pub record_time: Option<(u64, u64)>,
    /// Event times in `start..end`.
    pub event_time: Option<(u64, u64)>,
    /// The first position to examine.
    pub from: u64,
    /// Most events to return.
    pub max: u32,
}

/// The wire code of an indexed field (0 is "no field").
#[must_use]
pub fn field_to_wire(f: tally_engine::Field) -> u8 {
    use tally_engine::Field;
    match f {
        Field::EventType => 1,
        Field::Correlation => 2,
        Field::Causation => 3,
        Field::Actor => 4,
        Field::EventId => 5,
    }
}

fn field_from_wire(v: u8) -> Result<Option<tally_engine::Field>, ProtocolError> {
    use tally_engine::Field;
    Ok(Some(match v {
        0 => return Ok(None),
        1 => Field::EventType,
        2 => Field::Correlation,
        3 => Field::Causation,
        4 => Field::Actor,
        5 => Field::EventId,
        _ => {
            return Err(ProtocolError::InvalidValue {
                what: "find field",
                value: u64::from(v),
            });
        }
    }))
}

/// FIND window flag: a record-time window follows.
pub const FIND_RECORD_TIME: u8 = 1;
/// FIND window flag: an event-time window follows.
pub const FIND_EVENT_TIME: u8 = 2;

impl FindQuery {
    fn put(&self, out: &mut Vec<u8>) {
        match &self.field {
            Some((f, v)) => {
                out.push(field_to_wire(*f));
                put_str(out, v);
            }
            None => {
                out.push(0);
                put_str(out, "");
            }
        }
        let flags = if self.record_time.is_some() {
            FIND_RECORD_TIME
        } else {
            0
        } | if self.event_time.is_some() {
            FIND_EVENT_TIME
        } else {
            0
        };
        out.push(flags);
        for (a, b) in [self.record_time, self.event_time].into_iter().flatten() {
            put_u64(out, a);
            put_u64(out, b);
        }
        put_u64(out, self.from);
        put_u32(out, self.max);
    }

    fn read(r: &mut Reader<'_>) -> Result<FindQuery, ProtocolError> {
        let field = field_from_wire(r.u8("find field")?)?;
        let value = r.str("find value")?;
        let field = match (field, value.len()) {
            (None, 0) => None,
            (Some(f), n) if n > 0 => Some((f, value.to_owned())),
            (_, n) => {
                return Err(ProtocolError::InvalidValue {
                    what: "find value length (empty exactly when the field is 0)",
                    value: n as u64,
                });
            }
        };
        let flags = r.u8("find windows")?;
        if flags & !(FIND_RECORD_TIME | FIND_EVENT_TIME) != 0 {
            return Err(ProtocolError::InvalidValue {
                what: "find windows",
                value: u64::from(flags),
            });
        }
        let mut window =
            |bit: u8, what: &'static str| -> Result<Option<(u64, u64)>, ProtocolError> {
                if flags & bit == 0 {
                    return Ok(None);
                }
                Ok(Some((r.u64(what)?, r.u64(what)?)))
            };
        let record_time = window(FIND_RECORD_TIME, "record-time window")?;
        let event_time = window(FIND_EVENT_TIME, "event-time window")?;
        Ok(FindQuery {
            field,
            record_time,
            event_time,
            from: r.u64("from position")?,
            max: read_max(r)?,
        })
    }
}

/// A request, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Handshake: the range of versions the client speaks.
    Hello {
        /// Oldest version.
        min_version: u16,
        /// Newest version.
        max_version: u16,
        /// Free text naming the client, for the server's logs.
        client: String,
    },
    /// Liveness check.
    Ping(Vec<u8>),
    /// Server and log facts.
    ServerInfo,
    /// Append to one stream.
    Append(AppendPart),
    /// Atomic append to several streams.
    AppendMulti(Vec<AppendPart>),
    /// A piece of a blob upload: `offset` 0 starts one (replacing the connection's
    /// unfinished upload, if any); the piece that reaches `total` stores the blob.
    BlobPut {
        /// Where the piece starts in the blob: the bytes received so far.
        offset: u64,
        /// The blob's length.
        total: u64,
        /// The piece.
        chunk: Vec<u8>,
    },
    /// A piece of a blob.
    BlobRead {
        /// The blob.
        blob: BlobRef,
        /// First byte.
        offset: u64,
        /// Most bytes to return (fewer to fit the frame or the blob's end).
        max: u32,
    },
    /// Read one stream.
    ReadStream {
        /// The stream.
        stream: String,
        /// First version (`u64::MAX` backward: the newest).
        from_version: u64,
        /// Most events to return.
        max: u32,
        /// Direction.
        direction: tally_engine::Direction,
    },
    /// Read the whole log.
    ReadAll {
        /// First position (`u64::MAX` backward: the newest).
        from: u64,
        /// Most events to return.
        max: u32,
        /// Direction.
        direction: tally_engine::Direction,
        /// Filter.
        filter: Filter,
    },
    /// One stream's facts.
    StreamInfo {
        /// The stream.
        stream: String,
    },
    /// Events found through the attribute indexes.
    Find(FindQuery),
    /// Start a subscription; its id is this request's id.
    Subscribe {
        /// What to follow.
        target: SubscribeTarget,
        /// Where to start.
        from: SubscribeFrom,
        /// Events the server may push before it receives a CREDIT.
        credit: u32,
    },
    /// Grant a subscription more events.
    Credit {
        /// The subscription (its SUBSCRIBE's request id).
        subscription: u32,
        /// Events to add.
        credit: u32,
    },
    /// End a subscription.
    Unsubscribe {
        /// The subscription.
        subscription: u32,
    },
    /// Store a named consumer's position.
    CheckpointStore {
        /// The consumer's name.
        name: String,
        /// The position to store.
        position: u64,
    },
    /// Fetch a named consumer's position.
    CheckpointFetch {
        /// The consumer's name.
        name: String,
    },
    /// Register a schema version (JSON, docs/FORMAT.md 18.5): appended to `$schemas` when
    /// it is the next version of its type and compatible with the previous one.
    RegisterSchema {
        /// The schema, as JSON text.
        schema: String,
    },
    /// A governance operation (PROTOCOL.md 4.11d): a JSON request naming `op` (`list`,
    /// `policy_set`, `policy_remove`, `hold_place`, `hold_release`, `retention_plan`,
    /// `retention_apply`) and its fields.
    Govern {
        /// The request, as JSON text.
        request: String,
    },
    /// An atomic append of a batch signed by a producer (PROTOCOL.md 4.6a).
    AppendSigned {
        /// The batch's parts, as in [`Request::AppendMulti`].
        parts: Vec<AppendPart>,
        /// The producer's signature of the batch.
        signature: tally_engine::format::producer::ProducerSignature,
    },
    /// Store a projection's checkpoint: appended to `$projection-NAME` as the engine's
    /// projections store theirs, so either can resume from the other's.
    ProjectionStore {
        /// The projection's name.
        name: String,
        /// The first position not yet folded.
        next: u64,
        /// The projection's state version.
        state_version: u32,
        /// The encoded state.
        state: Vec<u8>,
    },
    /// Append one event of a projection's checkpoint of any size (FORMAT.md 18.4) to
    /// `$projection-NAME`: a part of its content, or, last, its manifest.
    ProjectionAppend {
        /// The projection's name.
        name: String,
        /// The manifest (`true`) or a part.
        manifest: bool,
        /// The part's bytes or the manifest's payload.
        payload: Vec<u8>,
    },
    /// The latest signed checkpoint.
    LatestCheckpoint,
    /// An inclusion proof.
    InclusionProof {
        /// The record's position.
        position: u64,
        /// The tree size (0: the latest checkpoint's).
        tree_size: u64,
    },
    /// A checkpoint as a signed note with its cosignatures.
    CheckpointNote {
        /// The checkpoint's id (0: the latest).
        id: u64,
    },
    /// A consistency proof from the tree of `old_size` records to that of `new_size`.
    ConsistencyProof {
        /// The smaller tree.
        old_size: u64,
        /// The larger tree.
        new_size: u64,
    },
    /// A witness's cosignature of checkpoint `checkpoint_id`.
    AddCosignature {
        /// The checkpoint cosigned.
        checkpoint_id: u64,
        /// The cosignature.
        cosignature: tally_engine::format::note::Cosignature,
    },
}

impl Request {
    /// The request's opcode.
    #[must_use]
    pub fn opcode(&self) -> u8 {
        match self {
            Request::Hello { .. } => op::HELLO,
            Request::Ping(_) => op::PING,
            Request::ServerInfo => op::SERVER_INFO,
            Request::Append(_) => op::APPEND,
            Request::AppendMulti(_) => op::APPEND_MULTI,
            Request::AppendSigned { .. } => op::APPEND_SIGNED,
            Request::BlobPut { .. } => op::BLOB_PUT,
            Request::BlobRead { .. } => op::BLOB_READ,
            Request::ReadStream { .. } => op::READ_STREAM,
            Request::ReadAll { .. } => op::READ_ALL,
            Request::Find(_) => op::FIND,
            Request::StreamInfo { .. } => op::STREAM_INFO,
            Request::Subscribe { .. } => op::SUBSCRIBE,
            Request::Credit { .. } => op::CREDIT,
            Request::Unsubscribe { .. } => op::UNSUBSCRIBE,
            Request::CheckpointStore { .. } => op::CHECKPOINT_STORE,
            Request::CheckpointFetch { .. } => op::CHECKPOINT_FETCH,
            Request::ProjectionStore { .. } => op::PROJECTION_STORE,
            Request::ProjectionAppend { .. } => op::PROJECTION_APPEND,
            Request::RegisterSchema { .. } => op::REGISTER_SCHEMA,
            Request::Govern { .. } => op::GOVERN,
            Request::LatestCheckpoint => op::LATEST_CHECKPOINT,
            Request::InclusionProof { .. } => op::INCLUSION_PROOF,
            Request::CheckpointNote { .. } => op::CHECKPOINT_NOTE,
            Request::ConsistencyProof { .. } => op::CONSISTENCY_PROOF,
            Request::AddCosignature { .. } => op::ADD_COSIGNATURE,
        }
    }

    /// Appends the request as one frame.
    /// Checks that every field fits its wire encoding, which [`Request::encode`] assumes:
    /// strings under 64 KiB, counts within their fields, expected versions in range. A
    /// client calls it on what its caller built before encoding.
    ///
    /// # Errors
    /// [`ProtocolError::Limit`] naming the first field that does not fit.
    pub fn check_encodable(&self) -> Result<(), ProtocolError> {
        fn fits(what: &'static str, len: usize, max: u64) -> Result<(), ProtocolError> {
            if len as u64 > max {
                return Err(ProtocolError::Limit {
                    what,
                    value: len as u64,
                    max,
                });
            }
            Ok(())
        }
        let text = |what, s: &str| fits(what, s.len(), u64::from(u16::MAX));
        let bytes = |what, b: &[u8]| fits(what, b.len(), u64::from(u32::MAX));
        let check_filter = |f: &Filter| {
            text("stream prefix", &f.stream_prefix)?;
            fits("event types", f.event_types.len(), u64::from(u16::MAX))?;
            f.event_types.iter().try_for_each(|t| text("event type", t))
        };
        let part = |p: &AppendPart| {
            text("stream", &p.stream)?;
            if let ExpectedVersion::Exact(v) = p.expected
                && v >= EXPECT_STREAM_EXISTS
            {
                return Err(ProtocolError::InvalidValue {
                    what: "expected version",
                    value: v,
                });
            }
            fits("events", p.events.len(), u64::from(u32::MAX))?;
            p.events.iter().try_for_each(|e| {
                text("event type", &e.event_type)?;
                text("aggregate type", &e.aggregate_type)?;
                text("correlation id", &e.correlation_id)?;
                text("causation id", &e.causation_id)?;
                text("actor", &e.actor)?;
                bytes("payload", &e.payload)
            })
        };
        match self {
            Request::Hello { client, .. } => text("client name", client),
            Request::Ping(_)
            | Request::ServerInfo
            | Request::LatestCheckpoint
            | Request::Credit { .. }
            | Request::Unsubscribe { .. }
            | Request::InclusionProof { .. }
            | Request::CheckpointNote { .. }
            | Request::ConsistencyProof { .. } => Ok(()),
            Request::AddCosignature { cosignature, .. } => text("witness name", &cosignature.name),
            Request::BlobPut { chunk, .. } => bytes("blob piece", chunk),
            Request::BlobRead { .. } => Ok(()),
            Request::Append(p) => part(p),
            Request::AppendMulti(parts) | Request::AppendSigned { parts, .. } => {
                fits("parts", parts.len(), u64::from(u16::MAX))?;
                parts.iter().try_for_each(part)
            }
            Request::ReadStream { stream, .. } | Request::StreamInfo { stream } => {
                text("stream", stream)
            }
            Request::ReadAll { filter, .. } => check_filter(filter),
            Request::Find(q) => q
                .field
                .as_ref()
                .map_or(Ok(()), |(_, v)| text("find value", v)),
            Request::Subscribe { target, .. } => match target {
                SubscribeTarget::All(f) => check_filter(f),
                SubscribeTarget::Stream(s) => text("stream", s),
            },
            Request::CheckpointStore { name, .. } | Request::CheckpointFetch { name } => {
                text("consumer name", name)
            }
            Request::ProjectionStore { name, state, .. } => {
                text("projection name", name)?;
                bytes("state", state)
            }
            Request::ProjectionAppend { name, payload, .. } => {
                text("projection name", name)?;
                bytes("payload", payload)
            }
            Request::RegisterSchema { schema } => bytes("schema", schema.as_bytes()),
            Request::Govern { request } => bytes("governance request", request.as_bytes()),
        }
    }

    /// Encodes the request as a frame. Every field must fit its encoding
    /// ([`Request::check_encodable`]).
    ///
    /// # Panics
    /// If a field does not fit.
    pub fn encode(&self, request_id: u32, out: &mut Vec<u8>) {
        let start = start_frame(out, self.opcode(), request_id);
        match self {
            Request::Hello {
                min_version,
                max_version,
                client,
            } => {
                out.extend_from_slice(&MAGIC);
                put_u16(out, *min_version);
                put_u16(out, *max_version);
                put_str(out, client);
            }
            Request::Ping(b) => out.extend_from_slice(b),
            Request::ServerInfo | Request::LatestCheckpoint => {}
            Request::Append(p) => put_part(out, &p.stream, p.expected, &p.events),
            Request::AppendMulti(parts) => {
                put_u16(out, parts.len() as u16);
                for p in parts {
                    put_part(out, &p.stream, p.expected, &p.events);
                }
            }
            Request::AppendSigned { parts, signature } => {
                put_u16(out, parts.len() as u16);
                for p in parts {
                    put_part(out, &p.stream, p.expected, &p.events);
                }
                out.extend_from_slice(&signature.public_key);
                out.extend_from_slice(&signature.signature);
            }
            Request::ReadStream {
                stream,
                from_version,
                max,
                direction,
            } => {
                put_str(out, stream);
                put_u64(out, *from_version);
                put_u32(out, *max);
                out.push(direction_to_wire(*direction));
            }
            Request::ReadAll {
                from,
                max,
                direction,
                filter,
            } => {
                put_u64(out, *from);
                put_u32(out, *max);
                out.push(direction_to_wire(*direction));
                filter.put(out);
            }
            Request::StreamInfo { stream } => put_str(out, stream),
            Request::Find(q) => q.put(out),
            Request::BlobPut {
                offset,
                total,
                chunk,
            } => {
                put_u64(out, *offset);
                put_u64(out, *total);
                put_bytes32(out, chunk);
            }
            Request::BlobRead { blob, offset, max } => {
                out.extend_from_slice(&blob.encode());
                put_u64(out, *offset);
                put_u32(out, *max);
            }
            Request::Subscribe {
                target,
                from,
                credit,
            } => {
                match target {
                    SubscribeTarget::All(f) => {
                        out.push(0);
                        f.put(out);
                    }
                    SubscribeTarget::Stream(s) => {
                        out.push(1);
                        put_str(out, s);
                    }
                }
                match from {
                    SubscribeFrom::At(p) => {
                        out.push(0);
                        put_u64(out, *p);
                    }
                    SubscribeFrom::Now => {
                        out.push(1);
                        put_u64(out, 0);
                    }
                }
                put_u32(out, *credit);
            }
            Request::Credit {
                subscription,
                credit,
            } => {
                put_u32(out, *subscription);
                put_u32(out, *credit);
            }
            Request::Unsubscribe { subscription } => put_u32(out, *subscription),
            Request::CheckpointStore { name, position } => {
                put_str(out, name);
                put_u64(out, *position);
            }
            Request::CheckpointFetch { name } => put_str(out, name),
            Request::ProjectionStore {
                name,
                next,
                state_version,
                state,
            } => {
                put_str(out, name);
                put_u64(out, *next);
                put_u32(out, *state_version);
                put_bytes32(out, state);
            }
            Request::ProjectionAppend {
                name,
                manifest,
                payload,
            } => {
                put_str(out, name);
                out.push(if *manifest { 2 } else { 1 });
                put_bytes32(out, payload);
            }
            Request::RegisterSchema { schema } => put_bytes32(out, schema.as_bytes()),
            Request::Govern { request } => put_bytes32(out, request.as_bytes()),
            Request::InclusionProof {
                position,
                tree_size,
            } => {
                put_u64(out, *position);
                put_u64(out, *tree_size);
            }
            Request::CheckpointNote { id } => put_u64(out, *id),
            Request::ConsistencyProof { old_size, new_size } => {
                put_u64(out, *old_size);
                put_u64(out, *new_size);
            }
            Request::AddCosignature {
                checkpoint_id,
                cosignature,
            } => {
                put_u64(out, *checkpoint_id);
                put_str(out, &cosignature.name);
                out.extend_from_slice(&cosignature.public_key);
                put_u64(out, cosignature.timestamp);
                out.extend_from_slice(&cosignature.signature);
            }
        }
        finish_frame(out, start);
    }

    /// Decodes a request's payload, given its opcode.
    ///
    /// # Errors
    /// [`ProtocolError`] naming the first thing wrong.
    pub fn decode(
        opcode: u8,
        payload: &[u8],
        append_events_max: u32,
    ) -> Result<Request, ProtocolError> {
        let mut r = Reader::new(payload);
        let req = match opcode {
            op::HELLO => {
                let magic: [u8; 4] = r.array("magic")?;
                if magic != MAGIC {
                    return Err(ProtocolError::InvalidValue {
                        what: "magic",
                        value: u64::from(u32::from_le_bytes(magic)),
                    });
                }
                Request::Hello {
                    min_version: r.u16("min version")?,
                    max_version: r.u16("max version")?,
                    client: r.str("client name")?.to_owned(),
                }
            }
            op::PING => {
                let b = r.rest();
                if b.len() > PING_BYTES_MAX {
                    return Err(ProtocolError::Limit {
                        what: "ping payload",
                        value: b.len() as u64,
                        max: PING_BYTES_MAX as u64,
                    });
                }
                Request::Ping(b.to_vec())
            }
            op::SERVER_INFO => Request::ServerInfo,
            op::APPEND => {
                let mut budget = append_events_max;
                Request::Append(read_part(&mut r, &mut budget)?)
            }
            op::APPEND_MULTI => Request::AppendMulti(read_parts(&mut r, append_events_max)?),
            op::APPEND_SIGNED => {
                let parts = read_parts(&mut r, append_events_max)?;
                Request::AppendSigned {
                    parts,
                    signature: tally_engine::format::producer::ProducerSignature {
                        public_key: r.array("producer key")?,
                        signature: r.array("producer signature")?,
                    },
                }
            }
            op::READ_STREAM => Request::ReadStream {
                stream: r.str("stream")?.to_owned(),
                from_version: r.u64("from version")?,
                max: read_max(&mut r)?,
                direction: direction_from_wire(r.u8("direction")?)?,
            },
            op::READ_ALL => Request::ReadAll {
                from: r.u64("from position")?,
                max: read_max(&mut r)?,
                direction: direction_from_wire(r.u8("direction")?)?,
                filter: Filter::read(&mut r)?,
            },
            op::STREAM_INFO => Request::StreamInfo {
                stream: r.str("stream")?.to_owned(),
            },
            op::BLOB_PUT => Request::BlobPut {
                offset: r.u64("offset")?,
                total: r.u64("total")?,
                chunk: r.bytes32("blob piece")?.to_vec(),
            },
            op::BLOB_READ => {
                let b: [u8; 40] = r.array("blob reference")?;
                Request::BlobRead {
                    blob: BlobRef::decode(&b).map_err(|_| ProtocolError::InvalidValue {
                        what: "blob size",
                        value: u64::from_le_bytes(b[32..].try_into().unwrap_or([0; 8])),
                    })?,
                    offset: r.u64("offset")?,
                    max: read_max(&mut r)?,
                }
            }
            op::FIND => Request::Find(FindQuery::read(&mut r)?),
            op::SUBSCRIBE => {
                let target = match r.u8("target")? {
                    0 => SubscribeTarget::All(Filter::read(&mut r)?),
                    1 => SubscribeTarget::Stream(r.str("stream")?.to_owned()),
                    v => {
                        return Err(ProtocolError::InvalidValue {
                            what: "subscription target",
                            value: u64::from(v),
                        });
                    }
                };
                let kind = r.u8("from kind")?;
                let at = r.u64("from")?;
                let from = match kind {
                    0 => SubscribeFrom::At(at),
                    // The position field is zero with "now": one meaning, one encoding.
                    1 if at == 0 => SubscribeFrom::Now,
                    1 => {
                        return Err(ProtocolError::InvalidValue {
                            what: "from (must be 0 with kind now)",
                            value: at,
                        });
                    }
                    v => {
                        return Err(ProtocolError::InvalidValue {
                            what: "from kind",
                            value: u64::from(v),
                        });
                    }
                };
                Request::Subscribe {
                    target,
                    from,
                    credit: r.u32("credit")?,
                }
            }
            op::CREDIT => Request::Credit {
                subscription: r.u32("subscription")?,
                credit: r.u32("credit")?,
            },
            op::UNSUBSCRIBE => Request::Unsubscribe {
                subscription: r.u32("subscription")?,
            },
            op::CHECKPOINT_STORE => Request::CheckpointStore {
                name: r.str("consumer name")?.to_owned(),
                position: r.u64("position")?,
            },
            op::CHECKPOINT_FETCH => Request::CheckpointFetch {
                name: r.str("consumer name")?.to_owned(),
            },
            op::PROJECTION_STORE => Request::ProjectionStore {
                name: r.str("projection name")?.to_owned(),
                next: r.u64("next position")?,
                state_version: r.u32("state version")?,
                state: r.bytes32("state")?.to_vec(),
            },
            op::PROJECTION_APPEND => Request::ProjectionAppend {
                name: r.str("projection name")?.to_owned(),
                manifest: match r.u8("kind")? {
                    1 => false,
                    2 => true,
                    k => {
                        return Err(ProtocolError::InvalidValue {
                            what: "projection append kind (1: part, 2: manifest)",
                            value: u64::from(k),
                        });
                    }
                },
                payload: r.bytes32("payload")?.to_vec(),
            },
            op::REGISTER_SCHEMA => Request::RegisterSchema {
                schema: std::str::from_utf8(r.bytes32("schema")?)
                    .map_err(|_| ProtocolError::InvalidUtf8 { what: "schema" })?
                    .to_owned(),
            },
            op::GOVERN => Request::Govern {
                request: std::str::from_utf8(r.bytes32("governance request")?)
                    .map_err(|_| ProtocolError::InvalidUtf8 {
                        what: "governance request",
                    })?
                    .to_owned(),
            },
            op::LATEST_CHECKPOINT => Request::LatestCheckpoint,
            op::INCLUSION_PROOF => Request::InclusionProof {
                position: r.u64("position")?,
                tree_size: r.u64("tree size")?,
            },
            op::CHECKPOINT_NOTE => Request::CheckpointNote {
                id: r.u64("checkpoint id")?,
            },
            op::CONSISTENCY_PROOF => Request::ConsistencyProof {
                old_size: r.u64("old size")?,
                new_size: r.u64("new size")?,
            },
            op::ADD_COSIGNATURE => Request::AddCosignature {
                checkpoint_id: r.u64("checkpoint id")?,
                cosignature: tally_engine::format::note::Cosignature {
                    name: r.str("witness name")?.to_owned(),
                    public_key: r.array("witness key")?,
                    timestamp: r.u64("timestamp")?,
                    signature: r.array("signature")?,
                },
            },
            other => return Err(ProtocolError::UnknownOpcode(other)),
        };
        r.end("request")?;
        Ok(req)
    }
}

/// A read's `max`: at least 1.
fn read_max(r: &mut Reader<'_>) -> Result<u32, ProtocolError> {
    match r.u32("max")? {
        0 => Err(ProtocolError::InvalidValue {
            what: "max (must be at least 1)",
            value: 0,
        }),
        n => Ok(n),
    }
}

fn put_part(out: &mut Vec<u8>, stream: &str, expected: ExpectedVersion, events: &[EventData]) {
    put_str(out, stream);
    put_u64(out, expected_to_wire(expected));
    put_u32(out, events.len() as u32);
    for e in events {
        put_event_data(out, e);
    }
}

/// The parts of an APPEND_MULTI or APPEND_SIGNED: a `u16` count, then each part, with one
/// event budget for the whole request.
fn read_parts(
    r: &mut Reader<'_>,
    append_events_max: u32,
) -> Result<Vec<AppendPart>, ProtocolError> {
    let n = r.u16("part count")?;
    let n = r.count(
        u64::from(n),
        2 + 8 + 4,
        u64::from(APPEND_PARTS_MAX),
        "parts",
    )?;
    let mut budget = append_events_max;
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        parts.push(read_part(r, &mut budget)?);
    }
    Ok(parts)
}

fn read_part(r: &mut Reader<'_>, budget: &mut u32) -> Result<AppendPart, ProtocolError> {
    let stream = r.str("stream")?.to_owned();
    let expected = expected_from_wire(r.u64("expected version")?);
    let n = r.u32("event count")?;
    let n = r.count(
        u64::from(n),
        EVENT_DATA_BYTES_MIN,
        u64::from(*budget),
        "events per append",
    )?;
    *budget -= n as u32;
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(event_data(r)?);
    }
    Ok(AppendPart {
        stream,
        expected,
        events,
    })
}

/// Bytes of an event's fixed fields on the wire (before its strings and payload).
pub const EVENT_FIXED_BYTES: usize = 8 + 8 + 16 + 4 + 1 + 8 + 8;
/// Smallest encoded event: fixed fields, six string lengths, the payload length.
pub const EVENT_BYTES_MIN: usize = EVENT_FIXED_BYTES + 6 * 2 + 4;

/// Bytes an event takes on the wire.
#[must_use]
pub fn event_wire_len(env: &EnvelopeRef<'_>) -> usize {
    EVENT_BYTES_MIN
        + env.stream.len()
        + env.aggregate_type.len()
        + env.event_type.len()
        + env.correlation_id.len()
        + env.causation_id.len()
        + env.actor.len()
        + env.payload.len()
}

/// Appends a stored event, from its decoded envelope.
pub fn put_event(
    out: &mut Vec<u8>,
    position: Position,
    version: u64,
    record_time: Timestamp,
    env: &EnvelopeRef<'_>,
) {
    put_u64(out, position.0);
    put_u64(out, version);
    out.extend_from_slice(&env.event_id.0);
    put_u32(out, env.schema_version);
    out.push(content_form_to_wire(env.content_type, env.payload_form));
    put_u64(out, env.event_time.as_nanos());
    put_u64(out, record_time.as_nanos());
    put_str(out, env.stream);
    put_str(out, env.aggregate_type);
    put_str(out, env.event_type);
    put_str(out, env.correlation_id);
    put_str(out, env.causation_id);
    put_str(out, env.actor);
    put_bytes32(out, env.payload);
}

/// Appends a stored event, read by the engine or received from a server.
pub fn put_recorded(out: &mut Vec<u8>, e: &dyn EventView) {
    put_event(
        out,
        e.position(),
        e.version(),
        e.record_time(),
        &e.envelope(),
    );
}

/// A stored event as received: its fixed fields decoded, its strings and payload kept in
/// the frame's buffer (one reference count, no copy) and checked as UTF-8 once.
#[derive(Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the log.
    pub position: Position,
    /// Version in its stream.
    pub version: u64,
    /// Event id.
    pub event_id: EventId,
    /// Schema version.
    pub schema_version: u32,
    /// Content type of the payload.
    pub content_type: ContentType,
    /// Whether the payload field is the payload or a blob reference ([`EventView::blob`]).
    pub payload_form: PayloadForm,
    /// Business time.
    pub event_time: Timestamp,
    /// When the server's log wrote it.
    pub record_time: Timestamp,
    buf: Bytes,
    /// Start and end of each of the six strings and the payload in `buf`.
    spans: [[u32; 2]; 7],
}

impl Event {
    fn field(&self, i: usize) -> &[u8] {
        &self.buf[self.spans[i][0] as usize..self.spans[i][1] as usize]
    }

    fn text(&self, i: usize) -> &str {
        // Checked as UTF-8 when decoded.
        std::str::from_utf8(self.field(i)).unwrap_or_default()
    }

    /// The stream.
    #[must_use]
    pub fn stream(&self) -> &str {
        self.text(0)
    }

    /// The aggregate type.
    #[must_use]
    pub fn aggregate_type(&self) -> &str {
        self.text(1)
    }

    /// The event type.
    #[must_use]
    pub fn event_type(&self) -> &str {
        self.text(2)
    }

    /// Correlation id.
    #[must_use]
    pub fn correlation_id(&self) -> &str {
        self.text(3)
    }

    /// Causation id.
    #[must_use]
    pub fn causation_id(&self) -> &str {
        self.text(4)
    }

    /// Actor.
    #[must_use]
    pub fn actor(&self) -> &str {
        self.text(5)
    }

    /// The payload field: the payload, or the 40-byte reference of a blob
    /// ([`Event::blob`]).
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        self.field(6)
    }

    /// The blob holding the payload, when the event refers to one: read it with the client's
    /// `read_blob`.
    #[must_use]
    pub fn blob(&self) -> Option<BlobRef> {
        EventView::blob(self)
    }

    /// Decodes one event at the reader's position; the reader reads from inside `frame`.
    fn read(r: &mut Reader<'_>, frame: &Bytes) -> Result<Event, ProtocolError> {
        let position = Position(r.u64("position")?);
        let version = r.u64("version")?;
        let event_id = EventId(r.array("event id")?);
        let schema_version = r.u32("schema version")?;
        let (content_type, payload_form) = content_form_from_wire(r.u8("content type")?)?;
        let event_time = Timestamp(r.u64("event time")?);
        let record_time = Timestamp(r.u64("record time")?);
        let mut spans = [[0u32; 2]; 7];
        let names = [
            "stream",
            "aggregate type",
            "event type",
            "correlation id",
            "causation id",
            "actor",
        ];
        let frame_start = frame.as_ptr() as usize;
        for (i, what) in names.iter().enumerate() {
            let s = r.str(what)?;
            let at = (s.as_ptr() as usize - frame_start) as u32;
            spans[i] = [at, at + s.len() as u32];
        }
        let p = r.bytes32("payload")?;
        if payload_form == PayloadForm::Blob && BlobRef::decode(p).is_err() {
            return Err(ProtocolError::InvalidValue {
                what: "blob reference length or size",
                value: p.len() as u64,
            });
        }
        let at = (p.as_ptr() as usize - frame_start) as u32;
        spans[6] = [at, at + p.len() as u32];
        Ok(Event {
            position,
            version,
            event_id,
            schema_version,
            content_type,
            payload_form,
            event_time,
            record_time,
            buf: frame.clone(),
            spans,
        })
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("position", &self.position)
            .field("stream", &self.stream())
            .field("version", &self.version)
            .field("event_type", &self.event_type())
            .field("payload_len", &self.payload().len())
            .finish_non_exhaustive()
    }
}

impl EventView for Event {
    fn position(&self) -> Position {
        self.position
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn event_id(&self) -> EventId {
        self.event_id
    }
    fn stream(&self) -> &str {
        Event::stream(self)
    }
    fn event_type(&self) -> &str {
        Event::event_type(self)
    }
    fn aggregate_type(&self) -> &str {
        Event::aggregate_type(self)
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
    fn content_type(&self) -> ContentType {
        self.content_type
    }
    fn payload_form(&self) -> PayloadForm {
        self.payload_form
    }
    fn correlation_id(&self) -> &str {
        Event::correlation_id(self)
    }
    fn causation_id(&self) -> &str {
        Event::causation_id(self)
    }
    fn actor(&self) -> &str {
        Event::actor(self)
    }
    fn payload(&self) -> &[u8] {
        Event::payload(self)
    }
    fn event_time(&self) -> Timestamp {
        self.event_time
    }
    fn record_time(&self) -> Timestamp {
        self.record_time
    }
    /// A removal marker as reads send it (PROTOCOL.md, "Removed events"): the type
    /// `$Removed`, a nil id and the payload `{"removed_by": P}`.
    fn removed_by(&self) -> Option<Position> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Marker {
            removed_by: u64,
        }
        if self.event_type() != tally_engine::REMOVED_EVENT_TYPE || self.event_id.0 != [0; 16] {
            return None;
        }
        serde_json::from_slice::<Marker>(self.payload())
            .ok()
            .map(|m| Position(m.removed_by))
    }
}

/// Limits a server announces in its HELLO response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, either way (the length field's value).
    pub frame_bytes_max: u32,
    /// Events per append.
    pub append_events_max: u32,
    /// Requests one connection may have unanswered; more are not read until some are
    /// answered.
    pub inflight_max: u32,
    /// Subscriptions per connection.
    pub subscriptions_max: u32,
}

/// The server's answer to HELLO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloOk {
    /// The version chosen.
    pub version: u16,
    /// The server's name and version.
    pub server: String,
    /// The log's id.
    pub log_id: [u8; 16],
    /// The log's next position.
    pub next_position: u64,
    /// Limits.
    pub limits: Limits,
}

/// Server and log facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// The server's name and version.
    pub server: String,
    /// Protocol version of this connection.
    pub protocol_version: u16,
    /// The log's id.
    pub log_id: [u8; 16],
    /// The log's next position.
    pub next_position: u64,
    /// Segment files.
    pub segments: u64,
    /// Open connections.
    pub connections: u32,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// 0 fsync, 1 batched, 2 none.
    pub durability: u8,
    /// Signed checkpoints in the log.
    pub checkpoints: u64,
}

/// An error response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError {
    /// The code's number (kept raw: a newer server may send codes this build does not know).
    pub code: u16,
    /// What went wrong, in words.
    pub message: String,
    /// For [`ErrorCode::WrongExpectedVersion`]: the stream, the expectation (wire value)
    /// and the stream's actual last version (`None`: no stream).
    pub wrong_version: Option<(String, u64, Option<u64>)>,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code() {
            Some(c) => write!(f, "{c:?} ({}): {}", self.code, self.message),
            None => write!(f, "error {}: {}", self.code, self.message),
        }
    }
}

impl WireError {
    /// An error without details.
    #[must_use]
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code: code.as_u16(),
            message: message.into(),
            wrong_version: None,
        }
    }

    /// The code, if this build knows it.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }

    /// Appends the error as one frame.
    pub fn encode(&self, opcode: u8, request_id: u32, out: &mut Vec<u8>) {
        let start = start_frame(out, opcode, request_id);
        put_u16(out, self.code);
        // Messages are cut to fit a string field (at a character boundary).
        let mut m = self.message.as_str();
        while m.len() > 4096 {
            let mut cut = 4096;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m = &m[..cut];
        }
        put_str(out, m);
        match &self.wrong_version {
            Some((stream, expected, actual)) => {
                out.push(1);
                put_str(out, stream);
                put_u64(out, *expected);
                out.push(u8::from(actual.is_some()));
                put_u64(out, actual.unwrap_or(0));
            }
            None => out.push(0),
        }
        finish_frame(out, start);
    }

    fn read(r: &mut Reader<'_>) -> Result<WireError, ProtocolError> {
        let code = r.u16("error code")?;
        let message = r.str("error message")?.to_owned();
        let wrong_version = match r.u8("detail kind")? {
            0 => None,
            1 => {
                let stream = r.str("stream")?.to_owned();
                let expected = r.u64("expected")?;
                let has = r.u8("has actual")?;
                let actual = r.u64("actual")?;
                Some((stream, expected, (has != 0).then_some(actual)))
            }
            v => {
                return Err(ProtocolError::InvalidValue {
                    what: "error detail kind",
                    value: u64::from(v),
                });
            }
        };
        Ok(WireError {
            code,
            message,
            wrong_version,
        })
    }
}

/// The answer to INCLUSION_PROOF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProofResponse {
    /// The record's position (its leaf index).
    pub position: u64,
    /// The tree size the proof is for.
    pub tree_size: u64,
    /// The record's chain hash (the leaf's input).
    pub record_hash: [u8; 32],
    /// The Merkle root of the tree of `tree_size` records.
    pub root: [u8; 32],
    /// Sibling hashes from the leaf up.
    pub path: Vec<[u8; 32]>,
}

/// The answer to CONSISTENCY_PROOF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistencyResponse {
    /// The smaller tree.
    pub old_size: u64,
    /// The larger tree.
    pub new_size: u64,
    /// The root of the smaller tree, as the server computed it.
    pub old_root: [u8; 32],
    /// The root of the larger tree, as the server computed it.
    pub new_root: [u8; 32],
    /// The proof's hashes, in RFC 9162 order.
    pub path: Vec<[u8; 32]>,
}

/// A frame from the server, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    /// Handshake accepted.
    Hello(HelloOk),
    /// Ping's echo.
    Pong(Vec<u8>),
    /// Server facts.
    ServerInfo(ServerInfo),
    /// An append's result.
    Appended(AppendResult),
    /// A multi-stream append's results, one per part.
    AppendedMulti(Vec<AppendResult>),
    /// Events of a read. `next` is where to continue (a version for READ_STREAM, a
    /// position for READ_ALL); `end` says nothing is left in that direction now.
    Events {
        /// Where the next read should start.
        next: u64,
        /// Whether the read reached the end.
        end: bool,
        /// The events.
        events: Vec<Event>,
    },
    /// A stream's facts (`None`: no such stream).
    StreamInfo(Option<StreamInfo>),
    /// A blob upload's progress: the bytes received, and once they are all there, the
    /// stored blob's reference.
    BlobPut {
        /// Bytes of the blob received so far.
        received: u64,
        /// The blob, stored: set by the answer to the last piece.
        blob: Option<BlobRef>,
    },
    /// A piece of a blob.
    BlobPiece(Vec<u8>),
    /// A subscription started; the first event it will deliver has this position (all)
    /// or version (stream).
    Subscribed {
        /// Start.
        start: u64,
    },
    /// A subscription ended at the client's request.
    Unsubscribed,
    /// A consumer position was stored.
    CheckpointStored,
    /// A consumer's stored position (`None`: never stored).
    Checkpoint(Option<u64>),
    /// The latest signed checkpoint, as the 224-byte entry of FORMAT.md §17.
    LatestCheckpoint(Option<Vec<u8>>),
    /// An inclusion proof.
    InclusionProof(ProofResponse),
    /// A checkpoint as a signed note (`None`: no such checkpoint).
    CheckpointNote(Option<String>),
    /// GOVERN's answer: JSON text (PROTOCOL.md 4.11d).
    Governed(String),
    /// A consistency proof with the two roots it was checked against on the server.
    ConsistencyProof(ConsistencyResponse),
    /// A cosignature was stored (`true`), or the same witness had cosigned that checkpoint
    /// already (`false`).
    CosignatureAdded(bool),
    /// Push: subscription events.
    SubEvents(Vec<Event>),
    /// Push: the subscription is live from this position (all) or version (stream).
    SubCaughtUp(u64),
    /// Push: the subscription ended.
    SubEnded(WireError),
    /// An error.
    Error(WireError),
}

/// Appends an APPEND response's fields.
pub fn put_append_result(out: &mut Vec<u8>, r: &AppendResult) {
    put_u64(out, r.first_position.0);
    put_u64(out, r.last_position.0);
    put_u64(out, r.first_version);
    put_u64(out, r.last_version);
}

fn read_append_result(r: &mut Reader<'_>) -> Result<AppendResult, ProtocolError> {
    Ok(AppendResult {
        first_position: Position(r.u64("first position")?),
        last_position: Position(r.u64("last position")?),
        first_version: r.u64("first version")?,
        last_version: r.u64("last version")?,
    })
}

impl Response {
    /// Appends the response as one frame (for events, see also the server's direct
    /// encoders, which write the same bytes without building [`Event`]s).
    pub fn encode(&self, request_opcode: u8, request_id: u32, out: &mut Vec<u8>) {
        let code = request_opcode | op::RESPONSE_BIT;
        let opcode = match self {
            Response::SubEvents(_) => op::SUB_EVENTS,
            Response::SubCaughtUp(_) => op::SUB_CAUGHT_UP,
            Response::SubEnded(e) => return e.encode(op::SUB_ENDED, request_id, out),
            Response::Error(e) => return e.encode(op::ERROR, request_id, out),
            _ => code,
        };
        let start = start_frame(out, opcode, request_id);
        match self {
            Response::Hello(h) => {
                put_u16(out, h.version);
                put_str(out, &h.server);
                out.extend_from_slice(&h.log_id);
                put_u64(out, h.next_position);
                put_u32(out, h.limits.frame_bytes_max);
                put_u32(out, h.limits.append_events_max);
                put_u32(out, h.limits.inflight_max);
                put_u32(out, h.limits.subscriptions_max);
            }
            Response::Pong(b) => out.extend_from_slice(b),
            Response::ServerInfo(i) => {
                put_str(out, &i.server);
                put_u16(out, i.protocol_version);
                out.extend_from_slice(&i.log_id);
                put_u64(out, i.next_position);
                put_u64(out, i.segments);
                put_u32(out, i.connections);
                put_u64(out, i.uptime_ms);
                out.push(i.durability);
                put_u64(out, i.checkpoints);
            }
            Response::Appended(r) => put_append_result(out, r),
            Response::AppendedMulti(rs) => {
                put_u16(out, rs.len() as u16);
                for r in rs {
                    put_append_result(out, r);
                }
            }
            Response::Events { next, end, events } => {
                put_u64(out, *next);
                out.push(u8::from(*end));
                put_u32(out, events.len() as u32);
                for e in events {
                    put_recorded(out, e);
                }
            }
            Response::StreamInfo(info) => put_stream_info(out, info.as_ref()),
            Response::BlobPut { received, blob } => {
                put_u64(out, *received);
                match blob {
                    Some(b) => {
                        out.push(1);
                        out.extend_from_slice(&b.hash);
                    }
                    None => {
                        out.push(0);
                        out.extend_from_slice(&[0; 32]);
                    }
                }
            }
            Response::BlobPiece(b) => put_bytes32(out, b),
            Response::Subscribed { start } => put_u64(out, *start),
            Response::Unsubscribed | Response::CheckpointStored => {}
            Response::Checkpoint(p) => {
                out.push(u8::from(p.is_some()));
                put_u64(out, p.unwrap_or(0));
            }
            Response::LatestCheckpoint(c) => match c {
                Some(entry) => {
                    out.push(1);
                    out.extend_from_slice(&entry[..]);
                }
                None => out.push(0),
            },
            Response::InclusionProof(p) => {
                put_u64(out, p.position);
                put_u64(out, p.tree_size);
                out.extend_from_slice(&p.record_hash);
                out.extend_from_slice(&p.root);
                put_u16(out, p.path.len() as u16);
                for h in &p.path {
                    out.extend_from_slice(h);
                }
            }
            Response::CheckpointNote(note) => match note {
                Some(text) => {
                    out.push(1);
                    put_bytes32(out, text.as_bytes());
                }
                None => out.push(0),
            },
            Response::Governed(text) => put_bytes32(out, text.as_bytes()),
            Response::ConsistencyProof(p) => {
                put_u64(out, p.old_size);
                put_u64(out, p.new_size);
                out.extend_from_slice(&p.old_root);
                out.extend_from_slice(&p.new_root);
                put_u16(out, p.path.len() as u16);
                for h in &p.path {
                    out.extend_from_slice(h);
                }
            }
            Response::CosignatureAdded(added) => out.push(u8::from(*added)),
            Response::SubEvents(events) => {
                put_u32(out, events.len() as u32);
                for e in events {
                    put_recorded(out, e);
                }
            }
            Response::SubCaughtUp(p) => put_u64(out, *p),
            Response::SubEnded(_) | Response::Error(_) => unreachable!("encoded above"),
        }
        finish_frame(out, start);
    }

    /// Decodes a frame from the server. `frame` holds the whole frame body (header and
    /// payload), so that events can keep a reference to it instead of copying.
    ///
    /// # Errors
    /// [`ProtocolError`] naming the first thing wrong.
    pub fn decode(frame: &Bytes) -> Result<(FrameHeader, Response), ProtocolError> {
        let (h, payload) = split_frame(frame)?;
        let mut r = Reader::new(payload);
        let resp = match h.opcode {
            op::ERROR => Response::Error(WireError::read(&mut r)?),
            op::SUB_ENDED => Response::SubEnded(WireError::read(&mut r)?),
            op::SUB_EVENTS => Response::SubEvents(read_events(&mut r, frame)?),
            op::SUB_CAUGHT_UP => Response::SubCaughtUp(r.u64("position")?),
            c if c == op::HELLO | op::RESPONSE_BIT => {
                let version = r.u16("version")?;
                let server = r.str("server")?.to_owned();
                let log_id = r.array("log id")?;
                let next_position = r.u64("next position")?;
                let limits = Limits {
                    frame_bytes_max: r.u32("frame bytes max")?,
                    append_events_max: r.u32("append events max")?,
                    inflight_max: r.u32("inflight max")?,
                    subscriptions_max: r.u32("subscriptions max")?,
                };
                Response::Hello(HelloOk {
                    version,
                    server,
                    log_id,
                    next_position,
                    limits,
                })
            }
            c if c == op::PING | op::RESPONSE_BIT => Response::Pong(r.rest().to_vec()),
            c if c == op::SERVER_INFO | op::RESPONSE_BIT => Response::ServerInfo(ServerInfo {
                server: r.str("server")?.to_owned(),
                protocol_version: r.u16("protocol version")?,
                log_id: r.array("log id")?,
                next_position: r.u64("next position")?,
                segments: r.u64("segments")?,
                connections: r.u32("connections")?,
                uptime_ms: r.u64("uptime")?,
                durability: r.u8("durability")?,
                checkpoints: r.u64("checkpoints")?,
            }),
            c if c == op::BLOB_PUT | op::RESPONSE_BIT => {
                let received = r.u64("received")?;
                let done = r.u8("done")?;
                let hash: [u8; 32] = r.array("blob hash")?;
                let blob = match done {
                    0 if hash == [0; 32] => None,
                    1 => Some(BlobRef {
                        hash,
                        size: received,
                    }),
                    v => {
                        return Err(ProtocolError::InvalidValue {
                            what: "blob upload done flag (0 with a zero hash, or 1)",
                            value: u64::from(v),
                        });
                    }
                };
                Response::BlobPut { received, blob }
            }
            c if c == op::BLOB_READ | op::RESPONSE_BIT => {
                Response::BlobPiece(r.bytes32("blob piece")?.to_vec())
            }
            c if c == op::APPEND | op::RESPONSE_BIT
                || c == op::PROJECTION_APPEND | op::RESPONSE_BIT =>
            {
                Response::Appended(read_append_result(&mut r)?)
            }
            c if c == op::APPEND_MULTI | op::RESPONSE_BIT
                || c == op::APPEND_SIGNED | op::RESPONSE_BIT =>
            {
                let n = r.u16("result count")?;
                let n = r.count(u64::from(n), 32, u64::from(APPEND_PARTS_MAX), "results")?;
                let mut rs = Vec::with_capacity(n);
                for _ in 0..n {
                    rs.push(read_append_result(&mut r)?);
                }
                Response::AppendedMulti(rs)
            }
            c if c == op::READ_STREAM | op::RESPONSE_BIT
                || c == op::READ_ALL | op::RESPONSE_BIT
                || c == op::FIND | op::RESPONSE_BIT =>
            {
                let next = r.u64("next")?;
                let end = r.u8("end")? != 0;
                Response::Events {
                    next,
                    end,
                    events: read_events(&mut r, frame)?,
                }
            }
            c if c == op::STREAM_INFO | op::RESPONSE_BIT => {
                let found = r.u8("found")?;
                let last_version = r.u64("last version")?;
                let first_position = Position(r.u64("first position")?);
                let last_position = Position(r.u64("last position")?);
                let created = Timestamp(r.u64("created")?);
                let stream = r.str("stream")?.to_owned();
                Response::StreamInfo((found != 0).then_some(StreamInfo {
                    stream,
                    last_version,
                    first_position,
                    last_position,
                    created,
                }))
            }
            c if c == op::SUBSCRIBE | op::RESPONSE_BIT => Response::Subscribed {
                start: r.u64("start")?,
            },
            c if c == op::UNSUBSCRIBE | op::RESPONSE_BIT => Response::Unsubscribed,
            c if c == op::CHECKPOINT_STORE | op::RESPONSE_BIT
                || c == op::PROJECTION_STORE | op::RESPONSE_BIT
                || c == op::REGISTER_SCHEMA | op::RESPONSE_BIT =>
            {
                Response::CheckpointStored
            }
            c if c == op::CHECKPOINT_FETCH | op::RESPONSE_BIT => {
                let found = r.u8("found")?;
                let p = r.u64("position")?;
                Response::Checkpoint((found != 0).then_some(p))
            }
            c if c == op::LATEST_CHECKPOINT | op::RESPONSE_BIT => match r.u8("found")? {
                0 => Response::LatestCheckpoint(None),
                _ => {
                    // The statement's version (entry bytes 8..10) says the entry's length.
                    let rest = r.rest();
                    let version = rest
                        .get(8..10)
                        .map(|v| u16::from_le_bytes([v[0], v[1]]))
                        .ok_or(ProtocolError::Truncated {
                            what: "checkpoint",
                            need: 10,
                            left: rest.len(),
                        })?;
                    let len = tally_engine::format::checkpoint::entry_len(version);
                    if rest.len() != len {
                        return Err(ProtocolError::Truncated {
                            what: "checkpoint",
                            need: len,
                            left: rest.len(),
                        });
                    }
                    Response::LatestCheckpoint(Some(rest.to_vec()))
                }
            },
            c if c == op::INCLUSION_PROOF | op::RESPONSE_BIT => {
                let position = r.u64("position")?;
                let tree_size = r.u64("tree size")?;
                let record_hash = r.array("record hash")?;
                let root = r.array("root")?;
                let n = r.u16("path length")?;
                let n = r.count(u64::from(n), 32, 64, "proof path")?;
                let mut path = Vec::with_capacity(n);
                for _ in 0..n {
                    path.push(r.array("path hash")?);
                }
                Response::InclusionProof(ProofResponse {
                    position,
                    tree_size,
                    record_hash,
                    root,
                    path,
                })
            }
            c if c == op::GOVERN | op::RESPONSE_BIT => Response::Governed(
                std::str::from_utf8(r.bytes32("governance answer")?)
                    .map_err(|_| ProtocolError::InvalidUtf8 {
                        what: "governance answer",
                    })?
                    .to_owned(),
            ),
            c if c == op::CHECKPOINT_NOTE | op::RESPONSE_BIT => match r.u8("found")? {
                0 => Response::CheckpointNote(None),
                _ => {
                    let b = r.bytes32("note")?;
                    if b.len() > tally_engine::format::note::NOTE_BYTES_MAX {
                        return Err(ProtocolError::Limit {
                            what: "checkpoint note",
                            value: b.len() as u64,
                            max: tally_engine::format::note::NOTE_BYTES_MAX as u64,
                        });
                    }
                    let text = std::str::from_utf8(b)
                        .map_err(|_| ProtocolError::InvalidUtf8 { what: "note" })?;
                    Response::CheckpointNote(Some(text.to_owned()))
                }
            },
            c if c == op::CONSISTENCY_PROOF | op::RESPONSE_BIT => {
                let old_size = r.u64("old size")?;
                let new_size = r.u64("new size")?;
                let old_root = r.array("old root")?;
                let new_root = r.array("new root")?;
                let n = r.u16("path length")?;
                let n = r.count(u64::from(n), 32, 128, "proof path")?;
                let mut path = Vec::with_capacity(n);
                for _ in 0..n {
                    path.push(r.array("path hash")?);
                }
                Response::ConsistencyProof(ConsistencyResponse {
                    old_size,
                    new_size,
                    old_root,
                    new_root,
                    path,
                })
            }
            c if c == op::ADD_COSIGNATURE | op::RESPONSE_BIT => {
                Response::CosignatureAdded(r.u8("added")? != 0)
            }
            other => return Err(ProtocolError::UnknownOpcode(other)),
        };
        r.end("response")?;
        Ok((h, resp))
    }
}

/// Appends a stream-info response's fields.
pub fn put_stream_info(out: &mut Vec<u8>, info: Option<&StreamInfo>) {
    match info {
        Some(i) => {
            out.push(1);
            put_u64(out, i.last_version);
            put_u64(out, i.first_position.0);
            put_u64(out, i.last_position.0);
            put_u64(out, i.created.as_nanos());
            put_str(out, &i.stream);
        }
        None => {
            out.push(0);
            out.extend_from_slice(&[0; 32]);
            put_str(out, "");
        }
    }
}

fn read_events(r: &mut Reader<'_>, frame: &Bytes) -> Result<Vec<Event>, ProtocolError> {
    let n = r.u32("event count")?;
    let n = r.count(u64::from(n), EVENT_BYTES_MIN, u64::from(u32::MAX), "events")?;
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(Event::read(r, frame)?);
    }
    Ok(events)
}

/// Runs `data` through everything that decodes bytes from the network, as the fuzz
/// target `decode_frame` and the tests do: a frame's length check and header, a request of
/// the frame's opcode (which, when it decodes, must re-encode to the same payload: the
/// encoding is canonical), and the response decoder. Panics only on a bug.
pub fn check_decoders(data: &[u8]) {
    if data.len() >= LENGTH_BYTES {
        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let _ = check_frame_len(len, FRAME_BYTES_MAX_DEFAULT);
    }
    let Ok((h, payload)) = split_frame(data) else {
        return;
    };
    if let Ok(req) = Request::decode(h.opcode, payload, APPEND_EVENTS_MAX_DEFAULT) {
        let mut again = Vec::new();
        req.encode(h.request_id, &mut again);
        assert_eq!(
            &again[LENGTH_BYTES + FRAME_HEADER_BYTES..],
            payload,
            "{req:?} re-encodes differently"
        );
    }
    if let Ok((_, resp)) = Response::decode(&Bytes::copy_from_slice(data)) {
        // Decoded responses re-encode (events through the same field order).
        let mut again = Vec::new();
        let opcode = h.opcode & !op::RESPONSE_BIT;
        resp.encode(opcode, h.request_id, &mut again);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> Bytes {
        let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(
            len,
            frame.len() - 4,
            "length field counts the rest of the frame"
        );
        Bytes::copy_from_slice(&frame[4..])
    }

    fn sample_event() -> EventData {
        EventData::json("TradeNew", r#"{"qty":"100"}"#)
            .aggregate_type("Trade")
            .actor("alice")
            .correlation_id("c-1")
            .causation_id("k-1")
            .schema_version(3)
            .with_id(EventId([7; 16]))
            .event_time(Timestamp(1_700_000_000_000_000_000))
    }

    #[test]
    fn every_request_round_trips() {
        let filter = Filter {
            stream_prefix: "trade-".into(),
            event_types: vec!["TradeNew".into(), "TradeAmended".into()],
        };
        let part = AppendPart {
            stream: "trade-1".into(),
            expected: ExpectedVersion::Exact(4),
            events: vec![sample_event(), EventData::new("X", vec![1, 2, 3])],
        };
        let reqs = vec![
            Request::Hello {
                min_version: 1,
                max_version: 3,
                client: "test".into(),
            },
            Request::Ping(b"hi".to_vec()),
            Request::ServerInfo,
            Request::Append(part.clone()),
            Request::AppendMulti(vec![
                part.clone(),
                AppendPart {
                    stream: "trade-2".into(),
                    expected: ExpectedVersion::NoStream,
                    ..part.clone()
                },
            ]),
            Request::ReadStream {
                stream: "s".into(),
                from_version: u64::MAX,
                max: 10,
                direction: tally_engine::Direction::Backward,
            },
            Request::ReadAll {
                from: 5,
                max: 100,
                direction: tally_engine::Direction::Forward,
                filter: filter.clone(),
            },
            Request::StreamInfo { stream: "s".into() },
            Request::Find(FindQuery {
                field: Some((tally_engine::Field::Correlation, "corr-7".into())),
                record_time: None,
                event_time: Some((10, 20)),
                from: 3,
                max: 50,
            }),
            Request::Find(FindQuery {
                field: None,
                record_time: Some((1, 2)),
                event_time: Some((3, 4)),
                from: 0,
                max: 1,
            }),
            Request::RegisterSchema {
                schema: r#"{"event_type":"T","version":1,"fields":[]}"#.into(),
            },
            Request::Subscribe {
                target: SubscribeTarget::All(filter),
                from: SubscribeFrom::At(9),
                credit: 100,
            },
            Request::Subscribe {
                target: SubscribeTarget::Stream("s".into()),
                from: SubscribeFrom::Now,
                credit: 1,
            },
            Request::Credit {
                subscription: 3,
                credit: 50,
            },
            Request::Unsubscribe { subscription: 3 },
            Request::CheckpointStore {
                name: "proj".into(),
                position: 77,
            },
            Request::CheckpointFetch {
                name: "proj".into(),
            },
            Request::LatestCheckpoint,
            Request::InclusionProof {
                position: 1,
                tree_size: 0,
            },
            Request::CheckpointNote { id: 4 },
            Request::ConsistencyProof {
                old_size: 3,
                new_size: 9,
            },
            Request::AddCosignature {
                checkpoint_id: 4,
                cosignature: tally_engine::format::note::Cosignature {
                    name: "w.example/1".into(),
                    public_key: [7; 32],
                    timestamp: 1_700_000_000,
                    signature: [8; 64],
                },
            },
            Request::ProjectionStore {
                name: "pnl".into(),
                next: 9,
                state_version: 2,
                state: b"state".to_vec(),
            },
            Request::ProjectionAppend {
                name: "pnl".into(),
                manifest: true,
                payload: b"manifest".to_vec(),
            },
            Request::ProjectionAppend {
                name: "pnl".into(),
                manifest: false,
                payload: b"part".to_vec(),
            },
        ];
        for (i, req) in reqs.iter().enumerate() {
            let mut out = Vec::new();
            req.encode(i as u32 + 1, &mut out);
            let b = body(&out);
            let (h, payload) = split_frame(&b).expect("header");
            assert_eq!(h.request_id, i as u32 + 1);
            assert_eq!(h.opcode, req.opcode());
            let back = Request::decode(h.opcode, payload, APPEND_EVENTS_MAX_DEFAULT)
                .unwrap_or_else(|e| panic!("{req:?}: {e}"));
            assert_eq!(&back, req);
        }
    }

    #[test]
    fn responses_round_trip() {
        let env_json = br#"{"qty":"100"}"#;
        let env = EnvelopeRef {
            event_id: EventId([1; 16]),
            event_time: Timestamp(5),
            schema_version: 2,
            content_type: ContentType::Json,
            stream: "trade-1",
            aggregate_type: "Trade",
            event_type: "TradeNew",
            correlation_id: "c",
            causation_id: "",
            actor: "bob",
            payload: env_json,
            payload_form: tally_engine::format::envelope::PayloadForm::Inline,
        };
        // An EVENTS frame written by the server's direct encoder decodes into the same
        // fields.
        let mut out = Vec::new();
        let start = start_frame(&mut out, op::READ_ALL | op::RESPONSE_BIT, 9);
        out.extend_from_slice(&8u64.to_le_bytes());
        out.push(0);
        out.extend_from_slice(&1u32.to_le_bytes());
        put_event(&mut out, Position(7), 3, Timestamp(6), &env);
        finish_frame(&mut out, start);
        let (h, resp) = Response::decode(&body(&out)).expect("decodes");
        assert_eq!(h.request_id, 9);
        let Response::Events { next, end, events } = &resp else {
            panic!("{resp:?}")
        };
        assert_eq!((*next, *end, events.len()), (8, false, 1));
        let e = &events[0];
        assert_eq!(e.position, Position(7));
        assert_eq!(e.version, 3);
        assert_eq!(e.stream(), "trade-1");
        assert_eq!(e.aggregate_type(), "Trade");
        assert_eq!(e.event_type(), "TradeNew");
        assert_eq!(e.correlation_id(), "c");
        assert_eq!(e.causation_id(), "");
        assert_eq!(e.actor(), "bob");
        assert_eq!(e.payload(), env_json);
        assert_eq!(e.record_time, Timestamp(6));
        // And re-encoding the decoded response gives the same bytes.
        let mut again = Vec::new();
        resp.encode(op::READ_ALL, 9, &mut again);
        assert_eq!(again, out);

        let err = WireError {
            code: ErrorCode::WrongExpectedVersion.as_u16(),
            message: "nope".into(),
            wrong_version: Some(("s".into(), 3, Some(5))),
        };
        let result = AppendResult {
            first_position: Position(1),
            last_position: Position(2),
            first_version: 0,
            last_version: 1,
        };
        let info = StreamInfo {
            stream: "s".into(),
            last_version: 4,
            first_position: Position(1),
            last_position: Position(9),
            created: Timestamp(77),
        };
        for (opcode, resp) in [
            (op::APPEND, Response::Error(err)),
            (
                op::SUBSCRIBE,
                Response::SubEnded(WireError::new(ErrorCode::ShuttingDown, "bye")),
            ),
            (op::CHECKPOINT_FETCH, Response::Checkpoint(Some(4))),
            (op::CHECKPOINT_FETCH, Response::Checkpoint(None)),
            (op::STREAM_INFO, Response::StreamInfo(None)),
            (op::STREAM_INFO, Response::StreamInfo(Some(info))),
            (op::SUBSCRIBE, Response::SubCaughtUp(12)),
            (op::SUBSCRIBE, Response::Subscribed { start: 3 }),
            (op::APPEND, Response::Appended(result)),
            (
                op::APPEND_MULTI,
                Response::AppendedMulti(vec![result, result]),
            ),
            (op::PING, Response::Pong(b"x".to_vec())),
            (op::UNSUBSCRIBE, Response::Unsubscribed),
            (op::CHECKPOINT_STORE, Response::CheckpointStored),
            (op::LATEST_CHECKPOINT, Response::LatestCheckpoint(None)),
            (
                op::LATEST_CHECKPOINT,
                Response::LatestCheckpoint(Some({
                    let mut e = vec![9; CHECKPOINT_ENTRY_BYTES];
                    e[8..10].copy_from_slice(&1u16.to_le_bytes());
                    e
                })),
            ),
            (
                op::LATEST_CHECKPOINT,
                Response::LatestCheckpoint(Some({
                    let mut e = vec![9; CHECKPOINT_ENTRY_V2_BYTES];
                    e[8..10].copy_from_slice(&2u16.to_le_bytes());
                    e
                })),
            ),
            (
                op::INCLUSION_PROOF,
                Response::InclusionProof(ProofResponse {
                    position: 3,
                    tree_size: 10,
                    record_hash: [1; 32],
                    root: [2; 32],
                    path: vec![[3; 32], [4; 32]],
                }),
            ),
            (op::CHECKPOINT_NOTE, Response::CheckpointNote(None)),
            (
                op::CHECKPOINT_NOTE,
                Response::CheckpointNote(Some("tally/00\n0\n\n— x AAAA\n".into())),
            ),
            (
                op::CONSISTENCY_PROOF,
                Response::ConsistencyProof(ConsistencyResponse {
                    old_size: 3,
                    new_size: 10,
                    old_root: [1; 32],
                    new_root: [2; 32],
                    path: vec![[3; 32]],
                }),
            ),
            (op::ADD_COSIGNATURE, Response::CosignatureAdded(true)),
            (
                op::HELLO,
                Response::Hello(HelloOk {
                    version: 1,
                    server: "tallyd".into(),
                    log_id: [5; 16],
                    next_position: 8,
                    limits: Limits {
                        frame_bytes_max: 1,
                        append_events_max: 2,
                        inflight_max: 3,
                        subscriptions_max: 4,
                    },
                }),
            ),
        ] {
            let mut out = Vec::new();
            resp.encode(opcode, 4, &mut out);
            let (h, back) =
                Response::decode(&body(&out)).unwrap_or_else(|e| panic!("{resp:?}: {e}"));
            assert_eq!(h.request_id, 4);
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn hostile_counts_are_refused_before_allocating() {
        // An append claiming 4 billion events in a 20-byte payload.
        let mut p = Vec::new();
        put_str(&mut p, "s");
        p.extend_from_slice(&EXPECT_ANY.to_le_bytes());
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = Request::decode(op::APPEND, &p, u32::MAX).expect_err("refused");
        assert!(matches!(e, ProtocolError::Truncated { .. }), "{e}");
        let e = Request::decode(op::APPEND, &p, 10).expect_err("refused");
        assert_eq!(e.code(), ErrorCode::LimitExceeded, "{e}");
        // A string longer than the frame.
        let e = Request::decode(op::STREAM_INFO, &[0xff, 0xff, b'a'], 10).expect_err("refused");
        assert!(matches!(e, ProtocolError::Truncated { .. }), "{e}");
        // Invalid UTF-8.
        let e = Request::decode(op::STREAM_INFO, &[2, 0, 0xc3, 0x28], 10).expect_err("refused");
        assert_eq!(e.code(), ErrorCode::InvalidUtf8);
        // Trailing bytes.
        let e = Request::decode(op::SERVER_INFO, &[0], 10).expect_err("refused");
        assert!(matches!(e, ProtocolError::Trailing { .. }), "{e}");
        // Unknown opcode.
        let e = Request::decode(0x7f, &[], 10).expect_err("refused");
        assert_eq!(e.code(), ErrorCode::UnknownOperation);
        // A response claiming many events.
        let mut out = Vec::new();
        let start = start_frame(&mut out, op::SUB_EVENTS, 1);
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        finish_frame(&mut out, start);
        assert!(Response::decode(&body(&out)).is_err());
    }

    #[test]
    fn error_codes_are_distinct_and_stable() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_u16()), "{c:?} reuses a number");
            assert_eq!(ErrorCode::from_u16(c.as_u16()), Some(c));
        }
        // Published numbers (docs/PROTOCOL.md): changing one breaks every client.
        assert_eq!(ErrorCode::WrongExpectedVersion.as_u16(), 20);
        assert_eq!(ErrorCode::ShuttingDown.as_u16(), 11);
        assert_eq!(ErrorCode::Internal.as_u16(), 99);
    }

    proptest::proptest! {
        #[test]
        fn random_payloads_never_panic(opcode: u8, payload: Vec<u8>) {
            let mut frame = vec![opcode, 0, 1, 0, 0, 0];
            frame.extend_from_slice(&payload);
            check_decoders(&frame);
        }

        #[test]
        fn mutated_valid_requests_never_panic(
            which in 0usize..5,
            flips in proptest::collection::vec((0usize..400, proptest::num::u8::ANY), 0..6),
            cut in 0usize..400,
        ) {
            let reqs = [
                Request::Append(AppendPart {
                    stream: "trade-1".into(),
                    expected: ExpectedVersion::Exact(3),
                    events: vec![sample_event(), EventData::new("X", vec![1, 2])],
                }),
                Request::ReadAll {
                    from: 1,
                    max: 2,
                    direction: tally_engine::Direction::Forward,
                    filter: Filter { stream_prefix: "t".into(), event_types: vec!["A".into()] },
                },
                Request::Subscribe {
                    target: SubscribeTarget::Stream("s".into()),
                    from: SubscribeFrom::Now,
                    credit: 5,
                },
                Request::Hello { min_version: 1, max_version: 1, client: "c".into() },
                Request::Find(FindQuery {
                    field: Some((tally_engine::Field::EventType, "Amend".into())),
                    record_time: Some((5, 9)),
                    event_time: None,
                    from: 0,
                    max: 7,
                }),
            ];
            let mut out = Vec::new();
            reqs[which].encode(9, &mut out);
            let mut body = out[LENGTH_BYTES..].to_vec();
            for (at, b) in flips {
                if !body.is_empty() {
                    let i = at % body.len();
                    body[i] ^= b;
                }
            }
            body.truncate(cut.max(1));
            check_decoders(&body);
        }
    }
}
