//! Pruned bodies (docs/FORMAT.md 5.5): what retention leaves of a record whose event it
//! removed. The record keeps its header (so its position, stream version, record time,
//! flags and chain hash), its length and its place in the segment; the body becomes the
//! original body's BLAKE3 hash, the position of the `$RetentionApplied` event that removed
//! it, and the stream's name, followed by zeros. The chain links the stored hash in place of
//! hashing the body, so every chain hash, Merkle root, checkpoint and proof stays valid.

use super::envelope::{ContentType, EnvelopeRef, PayloadForm};
use super::record::{BodyForm, RecordHeader};
use super::{DecodeError, EventId, Hash32, Position, Timestamp, check_zero, le};

/// The event type of the marker read in place of an event retention removed.
pub const REMOVED_EVENT_TYPE: &str = "$Removed";

/// The prefix of the system stream that holds a stream's snapshots (`$snapshot-<stream>`):
/// state derived from the stream, so a retention run that removes every event of a stream
/// removes its snapshots too. Every other system stream is never pruned.
pub const SNAPSHOT_STREAM_PREFIX: &str = "$snapshot-";

/// The stream whose snapshots `stream` holds, for a snapshot stream.
#[must_use]
pub fn snapshot_base(stream: &str) -> Option<&str> {
    stream.strip_prefix(SNAPSHOT_STREAM_PREFIX)
}

/// Whether retention may prune an event of `stream`: one of an application stream, or of
/// a snapshot stream (FORMAT.md 5.5); never one of another system stream (a policy, a hold,
/// a producer key, an erasure, a checkpoint).
#[must_use]
pub fn prunable_stream(stream: &str) -> bool {
    !stream.starts_with('$') || snapshot_base(stream).is_some()
}

/// Bytes of a pruned body's fixed part.
pub const PRUNED_FIXED_LEN: usize = 48;
/// `body_hash`: BLAKE3 of the original body (32 bytes).
pub const PR_BODY_HASH: usize = 0;
/// `removed_by`: `u64` the position of the `$RetentionApplied` event that removed it.
pub const PR_REMOVED_BY: usize = 32;
/// `stream_len`: `u16` bytes of the stream's name that follow the fixed part.
pub const PR_STREAM_LEN: usize = 40;
/// `reserved`: zero.
pub const PR_RESERVED: usize = 42;

/// A decoded pruned body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrunedRef<'a> {
    /// BLAKE3 of the body the record held (what the chain links).
    pub body_hash: Hash32,
    /// Where the `$RetentionApplied` event that removed it is.
    pub removed_by: Position,
    /// The event's stream.
    pub stream: &'a str,
}

/// Encodes a pruned body of `body_len` bytes (the original's length).
///
/// # Errors
/// [`DecodeError::TooLong`] when the stream's name does not fit (an envelope always holds
/// its stream and at least 49 bytes more, so a body the engine wrote always has room).
pub fn encode(
    body_hash: &Hash32,
    removed_by: Position,
    stream: &str,
    body_len: usize,
) -> Result<Vec<u8>, DecodeError> {
    let need = PRUNED_FIXED_LEN + stream.len();
    if need > body_len || stream.len() > usize::from(u16::MAX) {
        return Err(DecodeError::TooLong {
            what: "pruned body",
            len: need as u64,
            max: body_len as u64,
        });
    }
    let mut out = vec![0u8; body_len];
    out[PR_BODY_HASH..PR_BODY_HASH + 32].copy_from_slice(body_hash);
    le::put_u64(&mut out, PR_REMOVED_BY, removed_by.0);
    le::put_u16(&mut out, PR_STREAM_LEN, stream.len() as u16);
    out[PRUNED_FIXED_LEN..need].copy_from_slice(stream.as_bytes());
    Ok(out)
}

/// Decodes and checks a pruned body: its stream is UTF-8 without control characters, not
/// empty, within the envelope's limit, and every byte after it and every reserved byte is
/// zero.
///
/// # Errors
/// [`DecodeError`] naming what is wrong.
pub fn decode(body: &[u8]) -> Result<PrunedRef<'_>, DecodeError> {
    super::need(body, PRUNED_FIXED_LEN)?;
    check_zero(body, PR_RESERVED..PRUNED_FIXED_LEN, "pruned body")?;
    let stream_len = usize::from(le::u16_at(body, PR_STREAM_LEN));
    if stream_len == 0 || stream_len > super::envelope::STREAM_BYTES_MAX {
        return Err(DecodeError::Invalid {
            what: "pruned body",
            detail: format!("a stream name of {stream_len} bytes"),
        });
    }
    let end = PRUNED_FIXED_LEN + stream_len;
    super::need(body, end)?;
    let stream =
        std::str::from_utf8(&body[PRUNED_FIXED_LEN..end]).map_err(|_| DecodeError::Invalid {
            what: "pruned body",
            detail: "the stream name is not UTF-8".into(),
        })?;
    if stream.chars().any(char::is_control) {
        return Err(DecodeError::Invalid {
            what: "pruned body",
            detail: "a control character in the stream name".into(),
        });
    }
    check_zero(body, end..body.len(), "pruned body")?;
    Ok(PrunedRef {
        body_hash: le::array_at(body, PR_BODY_HASH),
        removed_by: Position(le::u64_at(body, PR_REMOVED_BY)),
        stream,
    })
}

/// The payload of a removed event's marker as reads return it: `{"removed_by":P}`.
#[must_use]
pub fn marker_payload(removed_by: Position) -> String {
    format!("{{\"removed_by\":{}}}", removed_by.0)
}

/// The marker's envelope for a removed event: its stream, the type [`REMOVED_EVENT_TYPE`],
/// a nil id, the record time as event time, content type JSON and no payload (what an
/// attribute index or an extract holds; reads add [`marker_payload`] with
/// [`marker_with_payload`]).
#[must_use]
pub fn marker<'a>(pruned: &PrunedRef<'a>, record_time: Timestamp) -> EnvelopeRef<'a> {
    marker_with_payload(pruned, record_time, &[])
}

/// [`marker`] with a payload (the reads' [`marker_payload`]).
#[must_use]
pub fn marker_with_payload<'a>(
    pruned: &PrunedRef<'a>,
    record_time: Timestamp,
    payload: &'a [u8],
) -> EnvelopeRef<'a> {
    EnvelopeRef {
        event_id: EventId([0; 16]),
        event_time: record_time,
        schema_version: 0,
        content_type: ContentType::Json,
        payload_form: PayloadForm::Inline,
        stream: pruned.stream,
        aggregate_type: "",
        event_type: REMOVED_EVENT_TYPE,
        correlation_id: "",
        causation_id: "",
        actor: "",
        payload,
    }
}

/// The hash a record's chain link takes for its body (FORMAT.md 7): BLAKE3 of the body, or
/// for a pruned record the hash its pruned body keeps. `body` is the checked body.
///
/// # Errors
/// A pruned body that does not decode.
pub fn linked_body_hash(header: &RecordHeader, body: &[u8]) -> Result<Hash32, DecodeError> {
    match header.body_form {
        BodyForm::Envelope => Ok(super::chain::body_hash(body)),
        BodyForm::Pruned => decode(body).map(|p| p.body_hash),
    }
}

/// What a record's checked body says: its envelope, or for a pruned record the marker's
/// envelope ([`marker`]) and the position of the run that removed it.
///
/// # Errors
/// The envelope or the pruned body does not decode.
pub fn content<'a>(
    header: &RecordHeader,
    body: &'a [u8],
) -> Result<(EnvelopeRef<'a>, Option<Position>), DecodeError> {
    match header.body_form {
        BodyForm::Envelope => {
            EnvelopeRef::decode_in(header.envelope_of(body), header.layout).map(|e| (e, None))
        }
        BodyForm::Pruned => {
            let p = decode(body)?;
            Ok((marker(&p, header.record_time), Some(p.removed_by)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let b = encode(&[7; 32], Position(99), "trade-1", 120).unwrap();
        assert_eq!(b.len(), 120);
        let p = decode(&b).unwrap();
        assert_eq!(p.body_hash, [7; 32]);
        assert_eq!(p.removed_by, Position(99));
        assert_eq!(p.stream, "trade-1");
        for at in [42, 47, 60, 119] {
            let mut d = b.clone();
            d[at] = 1;
            assert!(decode(&d).is_err(), "byte {at}");
        }
        let mut d = b.clone();
        le::put_u16(&mut d, PR_STREAM_LEN, 0);
        assert!(decode(&d).is_err());
        let mut d = b.clone();
        le::put_u16(&mut d, PR_STREAM_LEN, 200);
        assert!(decode(&d).is_err(), "longer than the body");
        assert!(encode(&[0; 32], Position(1), "trade-1", 54).is_err());
        assert!(decode(&b[..40]).is_err());
    }
}
