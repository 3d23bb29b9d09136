//! Producer-signed batches (docs/FORMAT.md, "Producer-signed batches"): a producer (an OMS,
//! a booking service) signs each batch it sends with its own Ed25519 key, and the log keeps
//! the signature in the batch's first record, where the chain covers it. An event written
//! into the log by anyone else (an injection at the tail, a replayed or altered batch) then
//! lacks a valid signature by a producer the verifier trusts.
//!
//! What is signed is a 72-byte batch statement: the log's id, the number of events, and a
//! digest over the BLAKE3 hash of each event's envelope (FORMAT.md section 6) in batch
//! order. Committing to each envelope through its hash, rather than to the envelope bytes,
//! keeps the signature checkable after an erasure that keeps each envelope's hash.
//!
//! In a record with the `PRODUCER_SIGNED` flag (the first record of a signed batch, format
//! version 2), the body is the 104-byte producer block followed by the envelope: `body_len`,
//! `body_crc` and the chain's body hash cover both.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::checkpoint::{SignatureError, fingerprint};
use super::{DecodeError, Hash32, check_zero, le, need};

/// Bytes of the producer block at the start of a signed batch's first body.
pub const PRODUCER_BLOCK_LEN: usize = 104;
/// The producer's Ed25519 public key (32 bytes).
pub const PB_PUBLIC_KEY: usize = 0;
/// The Ed25519 signature over the batch statement (64 bytes).
pub const PB_SIGNATURE: usize = 32;
/// `event_count` (u32): events in the signed batch.
pub const PB_EVENT_COUNT: usize = 96;
/// 4 reserved bytes.
pub const PB_RESERVED: usize = 100;
const _: () = assert!(PB_RESERVED + 4 == PRODUCER_BLOCK_LEN);
const _: () = assert!(PRODUCER_BLOCK_LEN.is_multiple_of(8));

/// Magic of a batch statement.
pub const BATCH_STATEMENT_MAGIC: &[u8; 8] = b"TALLYPSB";
/// Layout version of a batch statement.
pub const BATCH_STATEMENT_VERSION: u16 = 1;
/// Bytes of a batch statement: what a producer signs.
pub const BATCH_STATEMENT_LEN: usize = 72;
/// `version` (u16).
pub const BS_VERSION: usize = 8;
/// 6 reserved bytes.
pub const BS_RESERVED_A: usize = 10;
/// `log_id` (16 bytes).
pub const BS_LOG_ID: usize = 16;
/// `event_count` (u32).
pub const BS_EVENT_COUNT: usize = 32;
/// 4 reserved bytes.
pub const BS_RESERVED_B: usize = 36;
/// `batch_digest` (32 bytes).
pub const BS_DIGEST: usize = 40;
const _: () = assert!(BS_DIGEST + 32 == BATCH_STATEMENT_LEN);

/// A producer's signature of a batch, with the key that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerSignature {
    /// The producer's Ed25519 public key.
    pub public_key: [u8; 32],
    /// The signature over the batch statement.
    pub signature: [u8; 64],
}

/// The block at the start of a signed batch's first body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerBlock {
    /// The signature and key.
    pub signature: ProducerSignature,
    /// Events in the signed batch: the batch must hold exactly these.
    pub event_count: u32,
}

impl ProducerBlock {
    /// Encodes the block.
    #[must_use]
    pub fn encode(&self) -> [u8; PRODUCER_BLOCK_LEN] {
        let mut b = [0u8; PRODUCER_BLOCK_LEN];
        b[PB_PUBLIC_KEY..PB_PUBLIC_KEY + 32].copy_from_slice(&self.signature.public_key);
        b[PB_SIGNATURE..PB_SIGNATURE + 64].copy_from_slice(&self.signature.signature);
        le::put_u32(&mut b, PB_EVENT_COUNT, self.event_count);
        b
    }

    /// Decodes the block at the start of `body`.
    ///
    /// # Errors
    /// [`DecodeError`] when `body` is shorter than the block, or a reserved byte is set.
    pub fn decode(body: &[u8]) -> Result<ProducerBlock, DecodeError> {
        need(body, PRODUCER_BLOCK_LEN)?;
        check_zero(body, PB_RESERVED..PRODUCER_BLOCK_LEN, "producer block")?;
        Ok(ProducerBlock {
            signature: ProducerSignature {
                public_key: le::array_at(body, PB_PUBLIC_KEY),
                signature: le::array_at(body, PB_SIGNATURE),
            },
            event_count: le::u32_at(body, PB_EVENT_COUNT),
        })
    }
}

/// The digest of a batch: BLAKE3 over the BLAKE3 hash of each event's envelope, in order.
#[must_use]
pub fn batch_digest<'a>(envelope_hashes: impl IntoIterator<Item = &'a Hash32>) -> Hash32 {
    let mut h = blake3::Hasher::new();
    for e in envelope_hashes {
        h.update(e);
    }
    *h.finalize().as_bytes()
}

/// The batch statement a producer signs.
#[must_use]
pub fn batch_statement(
    log_id: &[u8; 16],
    event_count: u32,
    digest: &Hash32,
) -> [u8; BATCH_STATEMENT_LEN] {
    let mut b = [0u8; BATCH_STATEMENT_LEN];
    b[..8].copy_from_slice(BATCH_STATEMENT_MAGIC);
    le::put_u16(&mut b, BS_VERSION, BATCH_STATEMENT_VERSION);
    b[BS_LOG_ID..BS_LOG_ID + 16].copy_from_slice(log_id);
    le::put_u32(&mut b, BS_EVENT_COUNT, event_count);
    b[BS_DIGEST..BS_DIGEST + 32].copy_from_slice(digest);
    b
}

impl ProducerSignature {
    /// Signs a batch of events whose envelopes hash to `envelope_hashes`, for the log
    /// `log_id`.
    #[must_use]
    pub fn sign(
        key: &SigningKey,
        log_id: &[u8; 16],
        envelope_hashes: &[Hash32],
    ) -> ProducerSignature {
        let count = u32::try_from(envelope_hashes.len()).unwrap_or(u32::MAX);
        let statement = batch_statement(log_id, count, &batch_digest(envelope_hashes));
        ProducerSignature {
            public_key: key.verifying_key().to_bytes(),
            signature: key.sign(&statement).to_bytes(),
        }
    }

    /// Checks the signature over a batch.
    ///
    /// # Errors
    /// [`SignatureError`] when the key is not a curve point or the signature does not
    /// verify.
    pub fn verify(
        &self,
        log_id: &[u8; 16],
        envelope_hashes: &[Hash32],
    ) -> Result<(), SignatureError> {
        let count = u32::try_from(envelope_hashes.len()).unwrap_or(u32::MAX);
        let statement = batch_statement(log_id, count, &batch_digest(envelope_hashes));
        let key = VerifyingKey::from_bytes(&self.public_key).map_err(|_| SignatureError::BadKey)?;
        key.verify_strict(&statement, &Signature::from_bytes(&self.signature))
            .map_err(|_| SignatureError::BadSignature {
                fingerprint: fingerprint(&self.public_key),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_covers_the_log_the_count_the_order_and_every_envelope() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let hashes = [[1u8; 32], [2; 32], [3; 32]];
        let sig = ProducerSignature::sign(&key, &[9; 16], &hashes);
        sig.verify(&[9; 16], &hashes).unwrap();
        assert!(sig.verify(&[8; 16], &hashes).is_err(), "another log");
        assert!(
            sig.verify(&[9; 16], &hashes[..2]).is_err(),
            "a batch cut short"
        );
        assert!(
            sig.verify(&[9; 16], &[[1; 32], [3; 32], [2; 32]]).is_err(),
            "reordered"
        );
        assert!(
            sig.verify(&[9; 16], &[[1; 32], [2; 32], [4; 32]]).is_err(),
            "an event changed"
        );
        let block = ProducerBlock {
            signature: sig,
            event_count: 3,
        };
        assert_eq!(ProducerBlock::decode(&block.encode()), Ok(block));
        let mut bad = block.encode();
        bad[PB_RESERVED] = 1;
        assert!(ProducerBlock::decode(&bad).is_err());
    }
}
