//! Blob references: an event whose payload is stored outside the log, as a content-addressed
//! object in the cold tier's store (docs/FORMAT.md, 6.5).
//!
//! The envelope of such an event has `payload_form` 1 and a 40-byte payload: the BLAKE3
//! hash of the blob's bytes and their count. The chain covers the envelope, so it covers the
//! hash: a blob changed in the store no longer matches the reference the log signed.

use super::{DecodeError, Hash32, le};

/// Bytes of an encoded blob reference (the payload of an envelope with `payload_form` 1).
pub const BLOB_REF_LEN: usize = 40;

/// Largest blob: 256 MiB. A blob is held whole in memory once while it is written or read.
pub const BLOB_BYTES_MAX: u64 = 256 << 20;

/// Payloads longer than this are stored as blobs by default (when the log has a store).
pub const BLOB_THRESHOLD_DEFAULT: usize = 64 << 10;

/// A reference to a blob: what an event holds instead of a large payload.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobRef {
    /// BLAKE3 (unkeyed, 32 bytes) of the blob's bytes.
    pub hash: Hash32,
    /// The blob's length in bytes: 1 to [`BLOB_BYTES_MAX`].
    pub size: u64,
}

impl std::fmt::Debug for BlobRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobRef({}, {} bytes)", self.hex(), self.size)
    }
}

fn check_size(size: u64) -> Result<(), DecodeError> {
    if size == 0 {
        return Err(DecodeError::Invalid {
            what: "blob reference",
            detail: "a blob of 0 bytes".into(),
        });
    }
    if size > BLOB_BYTES_MAX {
        return Err(DecodeError::TooLong {
            what: "blob",
            len: size,
            max: BLOB_BYTES_MAX,
        });
    }
    Ok(())
}

impl BlobRef {
    /// The reference of `bytes`.
    ///
    /// # Errors
    /// [`DecodeError`] when `bytes` is empty or longer than [`BLOB_BYTES_MAX`].
    pub fn of(bytes: &[u8]) -> Result<BlobRef, DecodeError> {
        check_size(bytes.len() as u64)?;
        Ok(BlobRef {
            hash: *blake3::hash(bytes).as_bytes(),
            size: bytes.len() as u64,
        })
    }

    /// The 40 bytes an envelope holds: `hash`, then `size` (`u64`).
    #[must_use]
    pub fn encode(&self) -> [u8; BLOB_REF_LEN] {
        let mut out = [0u8; BLOB_REF_LEN];
        out[..32].copy_from_slice(&self.hash);
        le::put_u64(&mut out, 32, self.size);
        out
    }

    /// Decodes an envelope's blob reference.
    ///
    /// # Errors
    /// [`DecodeError`] when `b` is not exactly [`BLOB_REF_LEN`] bytes or the size is 0 or
    /// above [`BLOB_BYTES_MAX`].
    pub fn decode(b: &[u8]) -> Result<BlobRef, DecodeError> {
        if b.len() != BLOB_REF_LEN {
            return Err(DecodeError::LengthMismatch {
                what: "blob reference",
                declared: BLOB_REF_LEN as u64,
                actual: b.len() as u64,
            });
        }
        let size = le::u64_at(b, 32);
        check_size(size)?;
        Ok(BlobRef {
            hash: le::array_at(b, 0),
            size,
        })
    }

    /// The hash in lowercase hexadecimal.
    #[must_use]
    pub fn hex(&self) -> String {
        super::proof::hex(&self.hash)
    }

    /// Whether `bytes` are this blob: the same length and hash.
    #[must_use]
    pub fn matches(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.size && *blake3::hash(bytes).as_bytes() == self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_round_trips_and_refuses_bad_sizes_and_lengths() {
        let r = BlobRef::of(b"term sheet").unwrap();
        assert_eq!(BlobRef::decode(&r.encode()), Ok(r));
        assert!(r.matches(b"term sheet"));
        assert!(!r.matches(b"term shee7"));
        assert!(BlobRef::of(b"").is_err());
        assert!(BlobRef::decode(&r.encode()[..39]).is_err());
        let mut zero = r.encode();
        le::put_u64(&mut zero, 32, 0);
        assert!(BlobRef::decode(&zero).is_err());
        let mut huge = r.encode();
        le::put_u64(&mut huge, 32, BLOB_BYTES_MAX + 1);
        assert!(BlobRef::decode(&huge).is_err());
    }
}
