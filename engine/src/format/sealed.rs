//! Sealed payloads (docs/FORMAT.md 6.6, format version 5): personal data encrypted at append
//! with a key of its data subject, so that destroying the key erases it without rewriting a
//! byte of any segment.
//!
//! An envelope whose `payload_form` is [`super::envelope::PayloadForm::Sealed`] holds, in its
//! payload field, a 72-byte fixed part, then the clear part and the sealed field names, then
//! the ciphertext (XChaCha20-Poly1305, its 16-byte tag last). The whole payload may be
//! sealed (scope 0), or some top-level fields of a JSON object (scope 1): the clear part is
//! then the object without them, and the ciphertext is a JSON object of the sealed fields.
//! The record's body hash, and so the chain, covers the ciphertext: erasure never changes a
//! hash, and every proof stays valid.
//!
//! This module is the byte layout only; keys and the cipher are in [`crate::keys`].

use super::{DecodeError, EventId, check_zero, le};

/// Bytes of a sealed payload's fixed part.
pub const SEALED_FIXED_LEN: usize = 72;
/// `seal_version`: `u8`, 1.
pub const SL_VERSION: usize = 0;
/// `scope`: `u8`, see [`SealScope`].
pub const SL_SCOPE: usize = 1;
/// `reserved`: two zero bytes.
pub const SL_RESERVED: usize = 2;
/// `key_generation`: `u32`, which key of the subject (1 for the first; a subject forgotten
/// and seen again gets a new one).
pub const SL_GENERATION: usize = 4;
/// `subject`: the subject's 32-byte id hash ([`subject_hash`]).
pub const SL_SUBJECT: usize = 8;
/// `nonce`: 24 bytes never used twice with a key ([`crate::keys::nonce`]).
pub const SL_NONCE: usize = 40;
/// `clear_len`: `u32` bytes of the clear part.
pub const SL_CLEAR_LEN: usize = 64;
/// `names_len`: `u32` bytes of the sealed field names.
pub const SL_NAMES_LEN: usize = 68;
/// The version this build writes and reads.
pub const SEAL_VERSION: u8 = 1;
/// Bytes of the AEAD tag at the end of the ciphertext.
pub const TAG_LEN: usize = 16;
/// The BLAKE3 key-derivation context of a subject's id hash.
pub const SUBJECT_CONTEXT: &str = "tally 2026-12 data subject id";
/// The associated data's prefix.
pub const AAD_PREFIX: &[u8; 16] = b"tally sealed v1\0";

/// What a sealed payload seals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SealScope {
    /// The whole payload; the clear part and the names are empty.
    Payload = 0,
    /// Top-level fields of a JSON object: the clear part is the object without them, the
    /// names are a JSON array of their names, and the plaintext a JSON object of them.
    Fields = 1,
}

/// A data subject's id hash: what segments, erasure events and the key store name a subject
/// by (BLAKE3 in key-derivation mode with [`SUBJECT_CONTEXT`] over the id's UTF-8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectHash(pub [u8; 32]);

impl SubjectHash {
    /// Lower-case hex.
    #[must_use]
    pub fn to_hex(&self) -> String {
        super::proof::hex(&self.0)
    }

    /// Parses 64 hex digits.
    ///
    /// # Errors
    /// [`DecodeError::Invalid`] for anything else.
    pub fn from_hex(s: &str) -> Result<SubjectHash, DecodeError> {
        super::proof::parse_hex::<32>(s)
            .map(SubjectHash)
            .ok_or_else(|| DecodeError::Invalid {
                what: "subject hash",
                detail: format!("{s:?} is not 64 hex digits"),
            })
    }
}

impl std::fmt::Display for SubjectHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The id hash of the subject `id`.
#[must_use]
pub fn subject_hash(id: &str) -> SubjectHash {
    // `blake3::derive_key`, with the context's key derived once per process.
    static CONTEXT: std::sync::LazyLock<blake3::Hasher> =
        std::sync::LazyLock::new(|| blake3::Hasher::new_derive_key(SUBJECT_CONTEXT));
    let mut h = CONTEXT.clone();
    h.update(id.as_bytes());
    SubjectHash(*h.finalize().as_bytes())
}

/// A decoded sealed payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedRef<'a> {
    /// What is sealed.
    pub scope: SealScope,
    /// Which key of the subject.
    pub generation: u32,
    /// The subject.
    pub subject: SubjectHash,
    /// The nonce.
    pub nonce: [u8; 24],
    /// The clear part (scope [`SealScope::Fields`]): a JSON object.
    pub clear: &'a [u8],
    /// The sealed field names (scope [`SealScope::Fields`]): a JSON array of strings.
    pub names: &'a [u8],
    /// The ciphertext, tag last.
    pub ciphertext: &'a [u8],
    /// Everything before the ciphertext (the associated data covers it).
    pub head: &'a [u8],
}

impl SealedRef<'_> {
    /// The sealed field names (scope [`SealScope::Fields`]; empty for the whole payload).
    ///
    /// # Errors
    /// [`DecodeError::Invalid`] when the names are not a JSON array of strings.
    pub fn field_names(&self) -> Result<Vec<String>, DecodeError> {
        if self.scope == SealScope::Payload {
            return Ok(Vec::new());
        }
        serde_json::from_slice(self.names).map_err(|e| DecodeError::Invalid {
            what: "sealed field names",
            detail: e.to_string(),
        })
    }

    /// The associated data the cipher authenticates: [`AAD_PREFIX`], the event's id, and
    /// every byte of the sealed payload before the ciphertext. A ciphertext moved to another
    /// event, or a clear part changed, does not decrypt.
    #[must_use]
    pub fn aad(&self, event_id: EventId) -> Vec<u8> {
        aad(event_id, self.head)
    }
}

/// A sealed payload's fixed part.
#[must_use]
pub fn fixed_part(
    scope: SealScope,
    generation: u32,
    subject: &SubjectHash,
    nonce: &[u8; 24],
    clear_len: u32,
    names_len: u32,
) -> [u8; SEALED_FIXED_LEN] {
    let mut out = [0u8; SEALED_FIXED_LEN];
    out[SL_VERSION] = SEAL_VERSION;
    out[SL_SCOPE] = scope as u8;
    le::put_u32(&mut out, SL_GENERATION, generation);
    out[SL_SUBJECT..SL_SUBJECT + 32].copy_from_slice(&subject.0);
    out[SL_NONCE..SL_NONCE + 24].copy_from_slice(nonce);
    le::put_u32(&mut out, SL_CLEAR_LEN, clear_len);
    le::put_u32(&mut out, SL_NAMES_LEN, names_len);
    out
}

/// Bytes before the head in the buffer a sealer builds: the associated data is
/// [`AAD_PREFIX`], the event id and the head, so the head is written after those and the
/// whole prefix-plus-head is the associated data, with no copy ([`aad_prefix`]).
pub const AAD_HEAD_OFFSET: usize = AAD_PREFIX.len() + 16;

/// The bytes that come before the head in the associated data.
#[must_use]
pub fn aad_prefix(event_id: EventId) -> [u8; AAD_HEAD_OFFSET] {
    let mut a = [0u8; AAD_HEAD_OFFSET];
    a[..AAD_PREFIX.len()].copy_from_slice(AAD_PREFIX);
    a[AAD_PREFIX.len()..].copy_from_slice(&event_id.0);
    a
}

/// Whether a sealed payload with a clear part and names of these lengths and `plaintext_len`
/// bytes of plaintext fits an envelope's payload.
///
/// # Errors
/// [`DecodeError::TooLong`] when it does not.
pub fn check_len(
    clear_len: usize,
    names_len: usize,
    plaintext_len: usize,
) -> Result<(), DecodeError> {
    let max = super::envelope::PAYLOAD_BYTES_MAX;
    let len = SEALED_FIXED_LEN + clear_len + names_len + plaintext_len + TAG_LEN;
    if len > max {
        return Err(DecodeError::TooLong {
            what: "sealed payload",
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(())
}

fn aad(event_id: EventId, head: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_PREFIX.len() + 16 + head.len());
    a.extend_from_slice(AAD_PREFIX);
    a.extend_from_slice(&event_id.0);
    a.extend_from_slice(head);
    a
}

/// The part of a sealed payload before its ciphertext, and the associated data to seal it
/// with: the first step of sealing ([`crate::keys`] encrypts, then [`finish`] appends the
/// ciphertext).
///
/// # Errors
/// [`DecodeError::TooLong`] when the clear part or the names exceed a payload.
#[allow(clippy::too_many_arguments)]
pub fn head(
    scope: SealScope,
    generation: u32,
    subject: &SubjectHash,
    nonce: &[u8; 24],
    clear: &[u8],
    names: &[u8],
    event_id: EventId,
) -> Result<(Vec<u8>, Vec<u8>), DecodeError> {
    let max = super::envelope::PAYLOAD_BYTES_MAX;
    if clear.len() + names.len() + SEALED_FIXED_LEN + TAG_LEN > max {
        return Err(DecodeError::TooLong {
            what: "sealed payload",
            len: (clear.len() + names.len() + SEALED_FIXED_LEN + TAG_LEN) as u64,
            max: max as u64,
        });
    }
    let mut out = fixed_part(
        scope,
        generation,
        subject,
        nonce,
        clear.len() as u32,
        names.len() as u32,
    )
    .to_vec();
    out.extend_from_slice(clear);
    out.extend_from_slice(names);
    let a = aad(event_id, &out);
    Ok((out, a))
}

/// Appends the ciphertext to a head from [`head`]: the sealed payload.
#[must_use]
pub fn finish(mut head: Vec<u8>, ciphertext: &[u8]) -> Vec<u8> {
    head.extend_from_slice(ciphertext);
    head
}

/// Decodes and checks a sealed payload: version 1, a known scope, zero reserved bytes, a
/// generation of at least 1, lengths within the payload, empty clear part and names for a
/// sealed whole payload, and at least a tag of ciphertext.
///
/// # Errors
/// [`DecodeError`] naming what is wrong.
pub fn decode(payload: &[u8]) -> Result<SealedRef<'_>, DecodeError> {
    super::need(payload, SEALED_FIXED_LEN)?;
    let invalid = |detail: String| DecodeError::Invalid {
        what: "sealed payload",
        detail,
    };
    if payload[SL_VERSION] != SEAL_VERSION {
        return Err(invalid(format!(
            "seal version {} (this build reads {SEAL_VERSION})",
            payload[SL_VERSION]
        )));
    }
    let scope = match payload[SL_SCOPE] {
        0 => SealScope::Payload,
        1 => SealScope::Fields,
        other => return Err(invalid(format!("unknown scope {other}"))),
    };
    check_zero(payload, SL_RESERVED..SL_GENERATION, "sealed payload")?;
    let generation = le::u32_at(payload, SL_GENERATION);
    if generation == 0 {
        return Err(invalid("key generation 0".into()));
    }
    let mut subject = [0u8; 32];
    subject.copy_from_slice(&payload[SL_SUBJECT..SL_SUBJECT + 32]);
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&payload[SL_NONCE..SL_NONCE + 24]);
    let clear_len = le::u32_at(payload, SL_CLEAR_LEN) as usize;
    let names_len = le::u32_at(payload, SL_NAMES_LEN) as usize;
    if scope == SealScope::Payload && (clear_len != 0 || names_len != 0) {
        return Err(invalid(
            "a sealed whole payload with a clear part or names".into(),
        ));
    }
    let rest = payload.len() - SEALED_FIXED_LEN;
    // The lengths come from the bytes: compare them with what is there before slicing.
    if clear_len > rest || names_len > rest - clear_len || rest - clear_len - names_len < TAG_LEN {
        return Err(invalid(format!(
            "a clear part of {clear_len} and names of {names_len} bytes leave less than a tag in {rest} bytes"
        )));
    }
    let clear_end = SEALED_FIXED_LEN + clear_len;
    let names_end = clear_end + names_len;
    Ok(SealedRef {
        scope,
        generation,
        subject: SubjectHash(subject),
        nonce,
        clear: &payload[SEALED_FIXED_LEN..clear_end],
        names: &payload[clear_end..names_end],
        ciphertext: &payload[names_end..],
        head: &payload[..names_end],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(scope: SealScope) -> Vec<u8> {
        let (clear, names): (&[u8], &[u8]) = match scope {
            SealScope::Payload => (b"", b""),
            SealScope::Fields => (br#"{"book":"B1"}"#, br#"["client"]"#),
        };
        let (h, _) = head(
            scope,
            3,
            &subject_hash("client-42"),
            &[9; 24],
            clear,
            names,
            EventId([7; 16]),
        )
        .unwrap();
        finish(h, &[0xAB; 20])
    }

    #[test]
    fn round_trips_both_scopes() {
        for scope in [SealScope::Payload, SealScope::Fields] {
            let p = sample(scope);
            let s = decode(&p).unwrap();
            assert_eq!(s.scope, scope);
            assert_eq!(s.generation, 3);
            assert_eq!(s.subject, subject_hash("client-42"));
            assert_eq!(s.nonce, [9; 24]);
            assert_eq!(s.ciphertext, &[0xAB; 20]);
            if scope == SealScope::Fields {
                assert_eq!(s.field_names().unwrap(), vec!["client".to_owned()]);
                assert_eq!(s.clear, br#"{"book":"B1"}"#);
            }
        }
    }

    #[test]
    fn hostile_lengths_and_bytes_are_errors() {
        let good = sample(SealScope::Fields);
        // Every truncation.
        for n in 0..good.len() {
            let _ = decode(&good[..n]);
        }
        let mut p = good.clone();
        le::put_u32(&mut p, SL_CLEAR_LEN, u32::MAX);
        assert!(decode(&p).is_err());
        let mut p = good.clone();
        le::put_u32(&mut p, SL_NAMES_LEN, u32::MAX - 3);
        assert!(decode(&p).is_err());
        let mut p = good.clone();
        p[SL_RESERVED] = 1;
        assert!(decode(&p).is_err());
        let mut p = good.clone();
        le::put_u32(&mut p, SL_GENERATION, 0);
        assert!(decode(&p).is_err());
        let mut p = good.clone();
        p[SL_SCOPE] = 2;
        assert!(decode(&p).is_err());
        let mut p = good;
        p[SL_VERSION] = 2;
        assert!(decode(&p).is_err());
        // A whole payload may not carry a clear part.
        let mut p = sample(SealScope::Payload);
        le::put_u32(&mut p, SL_CLEAR_LEN, 1);
        assert!(decode(&p).is_err());
    }

    #[test]
    fn subject_hash_hex_round_trips() {
        let h = subject_hash("x");
        assert_eq!(SubjectHash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(SubjectHash::from_hex("zz").is_err());
        assert!(SubjectHash::from_hex(&"é".repeat(32)).is_err());
    }
}
