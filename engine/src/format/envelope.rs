//! The event envelope: the body of every event record (docs/FORMAT.md, "Event envelope").
//!
//! A 48-byte fixed part (ids, times, lengths) followed by the variable fields in a fixed
//! order. Every length is bounded by a documented limit, checked both when encoding (the
//! caller's input) and when decoding (bytes from disk), and the lengths must add up to the
//! body length exactly.

use super::blob::BlobRef;
use super::record::Layout;
use super::{DecodeError, EventId, Timestamp, check_zero, le, need};

/// Bytes in the fixed part of the envelope.
pub const ENVELOPE_FIXED_LEN: usize = 48;

/// `event_id`: 16 raw bytes.
pub const EVENT_ID_OFFSET: usize = 0;
/// `event_time`: business time, nanoseconds since the Unix epoch.
pub const EVENT_TIME_OFFSET: usize = EVENT_ID_OFFSET + 16;
/// `schema_version`: version of the payload's schema.
pub const SCHEMA_VERSION_OFFSET: usize = EVENT_TIME_OFFSET + 8;
/// `content_type`: see [`ContentType`].
pub const CONTENT_TYPE_OFFSET: usize = SCHEMA_VERSION_OFFSET + 4;
/// `payload_form`: see [`PayloadForm`] (a reserved zero byte before format version 3).
pub const PAYLOAD_FORM_OFFSET: usize = CONTENT_TYPE_OFFSET + 1;
/// The byte that versions 1 and 2 reserve (zero): `payload_form` from version 3 on.
pub const RESERVED_A_OFFSET: usize = PAYLOAD_FORM_OFFSET;
/// `stream_len`, then the other u16 lengths in field order.
pub const STREAM_LEN_OFFSET: usize = PAYLOAD_FORM_OFFSET + 1;
/// `aggregate_type_len`.
pub const AGGREGATE_TYPE_LEN_OFFSET: usize = STREAM_LEN_OFFSET + 2;
/// `event_type_len`.
pub const EVENT_TYPE_LEN_OFFSET: usize = AGGREGATE_TYPE_LEN_OFFSET + 2;
/// `correlation_id_len`.
pub const CORRELATION_ID_LEN_OFFSET: usize = EVENT_TYPE_LEN_OFFSET + 2;
/// `causation_id_len`.
pub const CAUSATION_ID_LEN_OFFSET: usize = CORRELATION_ID_LEN_OFFSET + 2;
/// `actor_len`.
pub const ACTOR_LEN_OFFSET: usize = CAUSATION_ID_LEN_OFFSET + 2;
/// Two reserved bytes, zero.
pub const RESERVED_B_OFFSET: usize = ACTOR_LEN_OFFSET + 2;
/// `payload_len`: u32.
pub const PAYLOAD_LEN_OFFSET: usize = RESERVED_B_OFFSET + 2;

const _: () = assert!(PAYLOAD_LEN_OFFSET + 4 == ENVELOPE_FIXED_LEN);

/// Longest stream id, in bytes of UTF-8.
pub const STREAM_BYTES_MAX: usize = 256;
/// Longest aggregate type.
pub const AGGREGATE_TYPE_BYTES_MAX: usize = 128;
/// Longest event type.
pub const EVENT_TYPE_BYTES_MAX: usize = 128;
/// Longest correlation id.
pub const CORRELATION_ID_BYTES_MAX: usize = 128;
/// Longest causation id.
pub const CAUSATION_ID_BYTES_MAX: usize = 128;
/// Longest actor.
pub const ACTOR_BYTES_MAX: usize = 128;
/// Largest payload: 1 MiB.
pub const PAYLOAD_BYTES_MAX: usize = 1 << 20;

/// Largest envelope, and so the largest record body.
pub const BODY_BYTES_MAX: u32 = (ENVELOPE_FIXED_LEN
    + STREAM_BYTES_MAX
    + AGGREGATE_TYPE_BYTES_MAX
    + EVENT_TYPE_BYTES_MAX
    + CORRELATION_ID_BYTES_MAX
    + CAUSATION_ID_BYTES_MAX
    + ACTOR_BYTES_MAX
    + PAYLOAD_BYTES_MAX) as u32;

/// How to read the payload bytes. Tally never parses payloads; this tells tools how to show
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ContentType {
    /// Opaque bytes.
    #[default]
    Binary = 0,
    /// UTF-8 JSON, as declared by the writer (not validated by the engine).
    Json = 1,
}

impl ContentType {
    fn from_u8(v: u8) -> Result<ContentType, DecodeError> {
        match v {
            0 => Ok(ContentType::Binary),
            1 => Ok(ContentType::Json),
            other => Err(DecodeError::Invalid {
                what: "content_type",
                detail: format!("unknown value {other}"),
            }),
        }
    }
}

/// Where an event's payload is: in the envelope, or in the store as a blob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadForm {
    /// The payload field holds the payload.
    #[default]
    Inline = 0,
    /// The payload field holds a 40-byte [`BlobRef`]; the bytes are a blob in the store
    /// (format version 3 on). `content_type` says how to read the blob.
    Blob = 1,
    /// The payload field holds a sealed payload ([`super::sealed`], format version 5 on):
    /// personal data encrypted with a key of its data subject. Reads open it, or show
    /// markers where the subject was erased.
    Sealed = 2,
}

impl PayloadForm {
    fn from_u8(v: u8) -> Result<PayloadForm, DecodeError> {
        match v {
            0 => Ok(PayloadForm::Inline),
            1 => Ok(PayloadForm::Blob),
            2 => Ok(PayloadForm::Sealed),
            other => Err(DecodeError::Invalid {
                what: "payload_form",
                detail: format!("unknown value {other}"),
            }),
        }
    }
}

/// A borrowed view of an envelope: what is encoded, or what a decode returns without
/// copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvelopeRef<'a> {
    /// The event's id.
    pub event_id: EventId,
    /// Business time of the event (may be earlier than the record time).
    pub event_time: Timestamp,
    /// Version of the payload schema.
    pub schema_version: u32,
    /// How to read the payload.
    pub content_type: ContentType,
    /// Whether `payload` is the payload or a reference to a blob holding it.
    pub payload_form: PayloadForm,
    /// The stream (aggregate id), for example `trade-42`.
    pub stream: &'a str,
    /// The aggregate type, for example `Trade`; may be empty.
    pub aggregate_type: &'a str,
    /// The event type, for example `TradeAmended`.
    pub event_type: &'a str,
    /// Correlation id; empty when none.
    pub correlation_id: &'a str,
    /// Causation id; empty when none.
    pub causation_id: &'a str,
    /// Who caused it (a user or a system); empty when unknown.
    pub actor: &'a str,
    /// The payload bytes; with [`PayloadForm::Blob`], the encoded [`BlobRef`].
    pub payload: &'a [u8],
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        return Err(DecodeError::TooLong {
            what,
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(())
}

/// Checks a stream id: non-empty, at most [`STREAM_BYTES_MAX`] bytes, no control characters.
///
/// # Errors
/// [`DecodeError`] naming what is wrong.
pub fn check_stream_id(stream: &str) -> Result<(), DecodeError> {
    if stream.is_empty() {
        return Err(DecodeError::Empty { what: "stream" });
    }
    check_len("stream", stream.len(), STREAM_BYTES_MAX)?;
    if let Some(c) = stream.chars().find(|c| c.is_control()) {
        return Err(DecodeError::Invalid {
            what: "stream",
            detail: format!("contains control character {c:?}"),
        });
    }
    Ok(())
}

/// Checks an event type: non-empty and at most [`EVENT_TYPE_BYTES_MAX`] bytes, as an
/// envelope requires.
///
/// # Errors
/// [`DecodeError`] naming what is wrong.
pub fn check_event_type(event_type: &str) -> Result<(), DecodeError> {
    if event_type.is_empty() {
        return Err(DecodeError::Empty { what: "event_type" });
    }
    check_len("event_type", event_type.len(), EVENT_TYPE_BYTES_MAX)
}

impl<'a> EnvelopeRef<'a> {
    /// Checks every field against its limit.
    ///
    /// # Errors
    /// [`DecodeError::TooLong`] or [`DecodeError::Empty`] naming the field.
    pub fn check_limits(&self) -> Result<(), DecodeError> {
        check_stream_id(self.stream)?;
        check_event_type(self.event_type)?;
        check_len(
            "aggregate_type",
            self.aggregate_type.len(),
            AGGREGATE_TYPE_BYTES_MAX,
        )?;
        check_len(
            "correlation_id",
            self.correlation_id.len(),
            CORRELATION_ID_BYTES_MAX,
        )?;
        check_len(
            "causation_id",
            self.causation_id.len(),
            CAUSATION_ID_BYTES_MAX,
        )?;
        check_len("actor", self.actor.len(), ACTOR_BYTES_MAX)?;
        check_len("payload", self.payload.len(), PAYLOAD_BYTES_MAX)?;
        match self.payload_form {
            PayloadForm::Inline => {}
            PayloadForm::Blob => {
                BlobRef::decode(self.payload)?;
            }
            PayloadForm::Sealed => {
                super::sealed::decode(self.payload)?;
            }
        }
        Ok(())
    }

    /// The blob this envelope refers to, for [`PayloadForm::Blob`].
    #[must_use]
    pub fn blob(&self) -> Option<BlobRef> {
        match self.payload_form {
            PayloadForm::Inline | PayloadForm::Sealed => None,
            PayloadForm::Blob => BlobRef::decode(self.payload).ok(),
        }
    }

    /// Bytes the encoded envelope takes.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        ENVELOPE_FIXED_LEN
            + self.stream.len()
            + self.aggregate_type.len()
            + self.event_type.len()
            + self.correlation_id.len()
            + self.causation_id.len()
            + self.actor.len()
            + self.payload.len()
    }

    /// Appends the encoded envelope to `out`.
    ///
    /// # Errors
    /// Whatever [`EnvelopeRef::check_limits`] finds; nothing is written then.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        self.check_limits()?;
        let start = out.len();
        out.resize(start + ENVELOPE_FIXED_LEN, 0);
        let fixed = &mut out[start..];
        fixed[EVENT_ID_OFFSET..EVENT_ID_OFFSET + 16].copy_from_slice(&self.event_id.0);
        le::put_u64(fixed, EVENT_TIME_OFFSET, self.event_time.0);
        le::put_u32(fixed, SCHEMA_VERSION_OFFSET, self.schema_version);
        fixed[CONTENT_TYPE_OFFSET] = self.content_type as u8;
        fixed[PAYLOAD_FORM_OFFSET] = self.payload_form as u8;
        // Lengths fit: check_limits bounded each by a maximum below u16::MAX / u32::MAX.
        le::put_u16(fixed, STREAM_LEN_OFFSET, self.stream.len() as u16);
        le::put_u16(
            fixed,
            AGGREGATE_TYPE_LEN_OFFSET,
            self.aggregate_type.len() as u16,
        );
        le::put_u16(fixed, EVENT_TYPE_LEN_OFFSET, self.event_type.len() as u16);
        le::put_u16(
            fixed,
            CORRELATION_ID_LEN_OFFSET,
            self.correlation_id.len() as u16,
        );
        le::put_u16(
            fixed,
            CAUSATION_ID_LEN_OFFSET,
            self.causation_id.len() as u16,
        );
        le::put_u16(fixed, ACTOR_LEN_OFFSET, self.actor.len() as u16);
        le::put_u32(fixed, PAYLOAD_LEN_OFFSET, self.payload.len() as u32);
        out.extend_from_slice(self.stream.as_bytes());
        out.extend_from_slice(self.aggregate_type.as_bytes());
        out.extend_from_slice(self.event_type.as_bytes());
        out.extend_from_slice(self.correlation_id.as_bytes());
        out.extend_from_slice(self.causation_id.as_bytes());
        out.extend_from_slice(self.actor.as_bytes());
        out.extend_from_slice(self.payload);
        debug_assert_eq!(out.len() - start, self.encoded_len());
        Ok(())
    }

    /// The stream id's bytes, read from the fixed part without decoding the rest: for
    /// callers that have checked the body (its CRC) and need only the stream. `None` when the
    /// body is too short to hold it.
    #[must_use]
    pub fn stream_bytes(body: &'a [u8]) -> Option<&'a [u8]> {
        let len = usize::from(u16::from_le_bytes([
            *body.get(STREAM_LEN_OFFSET)?,
            *body.get(STREAM_LEN_OFFSET + 1)?,
        ]));
        body.get(ENVELOPE_FIXED_LEN..ENVELOPE_FIXED_LEN + len)
    }

    /// Decodes an envelope of a record of `layout`: as [`EnvelopeRef::decode`], and a blob
    /// reference only where the format version allows one (3 on).
    ///
    /// # Errors
    /// As [`EnvelopeRef::decode`]; for a blob reference in a version 1 or 2 record, the
    /// reserved byte that holds it.
    pub fn decode_in(body: &'a [u8], layout: Layout) -> Result<EnvelopeRef<'a>, DecodeError> {
        if !layout.allows_blobs() {
            need(body, ENVELOPE_FIXED_LEN)?;
            check_zero(
                body,
                PAYLOAD_FORM_OFFSET..PAYLOAD_FORM_OFFSET + 1,
                "envelope",
            )?;
        }
        need(body, ENVELOPE_FIXED_LEN)?;
        if body[PAYLOAD_FORM_OFFSET] == PayloadForm::Sealed as u8 && !layout.allows_sealing() {
            return Err(DecodeError::Invalid {
                what: "payload_form",
                detail: format!(
                    "a sealed payload in a record of format version {}",
                    layout.version()
                ),
            });
        }
        EnvelopeRef::decode(body)
    }

    /// Decodes an envelope that fills `body` exactly, in the current format (a blob
    /// reference allowed; records of older versions are decoded by
    /// [`EnvelopeRef::decode_in`]).
    ///
    /// # Errors
    /// [`DecodeError`] when the body is short, a length exceeds its limit, the lengths do
    /// not add up to the body, a string is not UTF-8, a reserved byte is set, or a blob
    /// reference is not 40 bytes of a valid reference.
    pub fn decode(body: &'a [u8]) -> Result<EnvelopeRef<'a>, DecodeError> {
        need(body, ENVELOPE_FIXED_LEN)?;
        let payload_form = PayloadForm::from_u8(body[PAYLOAD_FORM_OFFSET])?;
        check_zero(body, RESERVED_B_OFFSET..RESERVED_B_OFFSET + 2, "envelope")?;
        let lens = [
            (
                "stream",
                le::u16_at(body, STREAM_LEN_OFFSET) as usize,
                STREAM_BYTES_MAX,
            ),
            (
                "aggregate_type",
                le::u16_at(body, AGGREGATE_TYPE_LEN_OFFSET) as usize,
                AGGREGATE_TYPE_BYTES_MAX,
            ),
            (
                "event_type",
                le::u16_at(body, EVENT_TYPE_LEN_OFFSET) as usize,
                EVENT_TYPE_BYTES_MAX,
            ),
            (
                "correlation_id",
                le::u16_at(body, CORRELATION_ID_LEN_OFFSET) as usize,
                CORRELATION_ID_BYTES_MAX,
            ),
            (
                "causation_id",
                le::u16_at(body, CAUSATION_ID_LEN_OFFSET) as usize,
                CAUSATION_ID_BYTES_MAX,
            ),
            (
                "actor",
                le::u16_at(body, ACTOR_LEN_OFFSET) as usize,
                ACTOR_BYTES_MAX,
            ),
            (
                "payload",
                le::u32_at(body, PAYLOAD_LEN_OFFSET) as usize,
                PAYLOAD_BYTES_MAX,
            ),
        ];
        let mut declared = ENVELOPE_FIXED_LEN as u64;
        for &(what, len, max) in &lens {
            check_len(what, len, max)?;
            declared += len as u64;
        }
        if declared != body.len() as u64 {
            return Err(DecodeError::LengthMismatch {
                what: "envelope",
                declared,
                actual: body.len() as u64,
            });
        }
        let mut at = ENVELOPE_FIXED_LEN;
        let mut take = |i: usize| {
            let field = &body[at..at + lens[i].1];
            at += lens[i].1;
            field
        };
        let text = |what: &'static str, bytes: &'a [u8]| {
            std::str::from_utf8(bytes).map_err(|_utf8| DecodeError::NotUtf8 { what })
        };
        let stream = text("stream", take(0))?;
        let aggregate_type = text("aggregate_type", take(1))?;
        let event_type = text("event_type", take(2))?;
        let correlation_id = text("correlation_id", take(3))?;
        let causation_id = text("causation_id", take(4))?;
        let actor = text("actor", take(5))?;
        let payload = take(6);
        let env = EnvelopeRef {
            event_id: EventId(le::array_at(body, EVENT_ID_OFFSET)),
            event_time: Timestamp(le::u64_at(body, EVENT_TIME_OFFSET)),
            schema_version: le::u32_at(body, SCHEMA_VERSION_OFFSET),
            content_type: ContentType::from_u8(body[CONTENT_TYPE_OFFSET])?,
            payload_form,
            stream,
            aggregate_type,
            event_type,
            correlation_id,
            causation_id,
            actor,
            payload,
        };
        env.check_limits()?;
        Ok(env)
    }
}

/// Reads only the stream id of an encoded envelope, without checking the rest: the index
/// uses it to confirm that a record belongs to the stream it was looked up for. Callers
/// have verified the body checksum first.
///
/// # Errors
/// [`DecodeError`] when the body is too short for the stream id or it is not UTF-8.
pub fn stream_of(body: &[u8]) -> Result<&str, DecodeError> {
    need(body, ENVELOPE_FIXED_LEN)?;
    let len = le::u16_at(body, STREAM_LEN_OFFSET) as usize;
    check_len("stream", len, STREAM_BYTES_MAX)?;
    need(body, ENVELOPE_FIXED_LEN + len)?;
    std::str::from_utf8(&body[ENVELOPE_FIXED_LEN..ENVELOPE_FIXED_LEN + len])
        .map_err(|_utf8| DecodeError::NotUtf8 { what: "stream" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EnvelopeRef<'static> {
        EnvelopeRef {
            event_id: EventId([7; 16]),
            event_time: Timestamp(1_699_999_999_000_000_000),
            schema_version: 3,
            content_type: ContentType::Json,
            stream: "trade-42",
            aggregate_type: "Trade",
            event_type: "TradeAmended",
            correlation_id: "corr-1",
            causation_id: "cause-9",
            actor: "alice@desk",
            payload: br#"{"qty":"100"}"#,
            payload_form: crate::format::envelope::PayloadForm::Inline,
        }
    }

    fn encode(e: &EnvelopeRef<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        e.encode_into(&mut out).unwrap();
        out
    }

    #[test]
    fn round_trips_every_field() {
        let e = sample();
        let bytes = encode(&e);
        assert_eq!(bytes.len(), e.encoded_len());
        assert_eq!(EnvelopeRef::decode(&bytes), Ok(e));
        assert_eq!(stream_of(&bytes), Ok("trade-42"));
    }

    #[test]
    fn fields_land_at_documented_offsets() {
        let b = encode(&sample());
        assert_eq!(&b[0..16], &[7; 16]);
        assert_eq!(le::u64_at(&b, 16), 1_699_999_999_000_000_000);
        assert_eq!(le::u32_at(&b, 24), 3);
        assert_eq!(b[28], 1);
        assert_eq!(b[29], 0);
        assert_eq!(le::u16_at(&b, 30), 8);
        assert_eq!(le::u16_at(&b, 32), 5);
        assert_eq!(le::u16_at(&b, 34), 12);
        assert_eq!(le::u16_at(&b, 36), 6);
        assert_eq!(le::u16_at(&b, 38), 7);
        assert_eq!(le::u16_at(&b, 40), 10);
        assert_eq!(le::u16_at(&b, 42), 0);
        assert_eq!(le::u32_at(&b, 44), 13);
        assert_eq!(&b[48..56], b"trade-42");
    }

    #[test]
    fn empty_optional_fields_round_trip() {
        let e = EnvelopeRef {
            aggregate_type: "",
            correlation_id: "",
            causation_id: "",
            actor: "",
            payload: b"",
            content_type: ContentType::Binary,
            ..sample()
        };
        assert_eq!(EnvelopeRef::decode(&encode(&e)), Ok(e));
    }

    #[test]
    fn encode_enforces_limits() {
        let long = "x".repeat(STREAM_BYTES_MAX + 1);
        let e = EnvelopeRef {
            stream: &long,
            ..sample()
        };
        assert!(matches!(
            e.encode_into(&mut Vec::new()),
            Err(DecodeError::TooLong { what: "stream", .. })
        ));
        let e = EnvelopeRef {
            stream: "",
            ..sample()
        };
        assert_eq!(
            e.encode_into(&mut Vec::new()),
            Err(DecodeError::Empty { what: "stream" })
        );
        let e = EnvelopeRef {
            event_type: "",
            ..sample()
        };
        assert_eq!(
            e.encode_into(&mut Vec::new()),
            Err(DecodeError::Empty { what: "event_type" })
        );
        let e = EnvelopeRef {
            stream: "a\nb",
            ..sample()
        };
        assert!(matches!(
            e.encode_into(&mut Vec::new()),
            Err(DecodeError::Invalid { .. })
        ));
        let big = vec![0u8; PAYLOAD_BYTES_MAX + 1];
        let e = EnvelopeRef {
            payload: &big,
            ..sample()
        };
        assert!(matches!(
            e.encode_into(&mut Vec::new()),
            Err(DecodeError::TooLong {
                what: "payload",
                ..
            })
        ));
        let actor = "a".repeat(ACTOR_BYTES_MAX + 1);
        let e = EnvelopeRef {
            actor: &actor,
            ..sample()
        };
        assert!(matches!(
            e.encode_into(&mut Vec::new()),
            Err(DecodeError::TooLong { what: "actor", .. })
        ));
    }

    #[test]
    fn decode_rejects_lengths_that_do_not_add_up() {
        let b = encode(&sample());
        assert!(matches!(
            EnvelopeRef::decode(&b[..b.len() - 1]),
            Err(DecodeError::LengthMismatch { .. })
        ));
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            EnvelopeRef::decode(&longer),
            Err(DecodeError::LengthMismatch { .. })
        ));
        assert!(matches!(
            EnvelopeRef::decode(&b[..20]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn decode_rejects_oversized_length_fields() {
        let mut b = encode(&sample());
        le::put_u16(&mut b, STREAM_LEN_OFFSET, (STREAM_BYTES_MAX + 1) as u16);
        assert!(matches!(
            EnvelopeRef::decode(&b),
            Err(DecodeError::TooLong { what: "stream", .. })
        ));
        let mut b = encode(&sample());
        le::put_u32(&mut b, PAYLOAD_LEN_OFFSET, u32::MAX);
        assert!(matches!(
            EnvelopeRef::decode(&b),
            Err(DecodeError::TooLong {
                what: "payload",
                ..
            })
        ));
    }

    #[test]
    fn a_blob_reference_round_trips_in_version_3_only() {
        let blob = BlobRef::of(b"a confirmation pdf").unwrap();
        let bytes = blob.encode();
        let e = EnvelopeRef {
            payload_form: PayloadForm::Blob,
            payload: &bytes,
            ..sample()
        };
        let b = encode(&e);
        assert_eq!(b[PAYLOAD_FORM_OFFSET], 1);
        let d = EnvelopeRef::decode_in(&b, Layout::V3).unwrap();
        assert_eq!(d, e);
        assert_eq!(d.blob(), Some(blob));
        assert!(EnvelopeRef::decode_in(&b, Layout::V2).is_err());
        // A reference of the wrong length, or of size 0, is refused when encoding too.
        let short = EnvelopeRef {
            payload: &bytes[..39],
            ..e
        };
        assert!(short.encode_into(&mut Vec::new()).is_err());
        let mut zero = bytes;
        zero[32..].fill(0);
        let z = EnvelopeRef {
            payload: &zero,
            ..e
        };
        assert!(z.encode_into(&mut Vec::new()).is_err());
    }

    #[test]
    fn decode_rejects_reserved_bytes_bad_utf8_and_content_type() {
        // The byte versions 1 and 2 reserve is `payload_form` in version 3: a blob form
        // is refused in older records, and any value other than 0 and 1 everywhere.
        let mut b = encode(&sample());
        b[RESERVED_A_OFFSET] = 1;
        assert!(matches!(
            EnvelopeRef::decode_in(&b, Layout::V2),
            Err(DecodeError::NonZeroReserved { .. })
        ));
        assert!(matches!(
            EnvelopeRef::decode_in(&b, Layout::V1),
            Err(DecodeError::NonZeroReserved { .. })
        ));
        // In version 3 the form says blob, and the payload is not a 40-byte reference.
        assert!(EnvelopeRef::decode_in(&b, Layout::V3).is_err());
        // A sealed payload only from version 5 on; no version knows form 3.
        for (form, layout) in [(2, Layout::V3), (2, Layout::V4), (3, Layout::V5)] {
            b[PAYLOAD_FORM_OFFSET] = form;
            assert!(matches!(
                EnvelopeRef::decode_in(&b, layout),
                Err(DecodeError::Invalid {
                    what: "payload_form",
                    ..
                })
            ));
        }
        // In version 5 form 2 says sealed, and the payload is not a sealed payload.
        b[PAYLOAD_FORM_OFFSET] = 2;
        assert!(matches!(
            EnvelopeRef::decode_in(&b, Layout::V5),
            Err(DecodeError::Truncated { .. }
                | DecodeError::Invalid {
                    what: "sealed payload",
                    ..
                })
        ));
        let mut b = encode(&sample());
        b[RESERVED_B_OFFSET + 1] = 1;
        assert!(matches!(
            EnvelopeRef::decode(&b),
            Err(DecodeError::NonZeroReserved { .. })
        ));
        let mut b = encode(&sample());
        b[ENVELOPE_FIXED_LEN] = 0xff;
        assert_eq!(
            EnvelopeRef::decode(&b),
            Err(DecodeError::NotUtf8 { what: "stream" })
        );
        let mut b = encode(&sample());
        b[CONTENT_TYPE_OFFSET] = 9;
        assert!(matches!(
            EnvelopeRef::decode(&b),
            Err(DecodeError::Invalid { .. })
        ));
    }
}
