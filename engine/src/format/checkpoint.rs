//! Signed checkpoints (docs/FORMAT.md, "Checkpoints") and the signing key files.
//!
//! A checkpoint statement says "the log `log_id` had `tree_size` records, whose Merkle root
//! was `root` and whose last record hash was `chain_head`, at `time`". It is 120 bytes in a
//! fixed layout, signed with Ed25519 (RFC 8032) over exactly those bytes. A signed
//! checkpoint carries the public key that signed it, so that checkpoints signed before a key
//! rotation stay verifiable; a verifier decides which keys it trusts.

/// The Ed25519 secret key type the key file functions use.
pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, VerifyingKey};

use super::{DecodeError, Hash32, Timestamp, check_crc, check_magic, check_zero, le, need};

/// Magic of a checkpoint statement.
pub const STATEMENT_MAGIC: &[u8; 8] = b"TALLYCKP";
/// Statement layout version 1 (format version 1 logs): signed as its 120 bytes.
pub const STATEMENT_VERSION: u16 = 1;
/// Statement layout version 2 (format version 2 logs): adds the stream heads map, and is
/// signed as its checkpoint note body ([`super::note::checkpoint_body`]).
pub const STATEMENT_V2: u16 = 2;
/// Bytes in a version 1 statement.
pub const STATEMENT_LEN: usize = 120;
/// Bytes in a version 2 statement.
pub const STATEMENT_V2_LEN: usize = 160;
/// `version` (u16).
pub const ST_VERSION: usize = 8;
/// 6 reserved bytes.
pub const ST_RESERVED: usize = 10;
/// `log_id` (16 bytes).
pub const ST_LOG_ID: usize = 16;
/// `checkpoint_id` (u64, counting from 1).
pub const ST_ID: usize = 32;
/// `tree_size` (u64).
pub const ST_TREE_SIZE: usize = 40;
/// `time` (u64, nanoseconds since the Unix epoch).
pub const ST_TIME: usize = 48;
/// `root` (32 bytes).
pub const ST_ROOT: usize = 56;
/// `chain_head` (32 bytes).
pub const ST_CHAIN_HEAD: usize = 88;
const _: () = assert!(ST_CHAIN_HEAD + 32 == STATEMENT_LEN);
/// Version 2: `stream_count` (u64), streams with at least one event in the tree.
pub const ST_STREAM_COUNT: usize = 120;
/// Version 2: `streams_root` (32 bytes), the root of the stream heads map.
pub const ST_STREAMS_ROOT: usize = 128;
const _: () = assert!(ST_STREAMS_ROOT + 32 == STATEMENT_V2_LEN);

/// Bytes of an entry in the checkpoints file: statement, public key, signature, CRC, and 4
/// reserved bytes.
pub const ENTRY_LEN: usize = 224;
/// Offset of the public key in an entry.
pub const ENTRY_PUBKEY: usize = STATEMENT_LEN;
/// Offset of the signature in an entry.
pub const ENTRY_SIGNATURE: usize = ENTRY_PUBKEY + 32;
/// Offset of the CRC-32 of bytes `0..ENTRY_CRC`.
pub const ENTRY_CRC: usize = ENTRY_SIGNATURE + 64;
/// Offset of the 4 reserved bytes.
pub const ENTRY_RESERVED: usize = ENTRY_CRC + 4;
const _: () = assert!(ENTRY_RESERVED + 4 == ENTRY_LEN);
/// Bytes of an entry with a version 2 statement: the same tail after 160 statement bytes.
pub const ENTRY_V2_LEN: usize = STATEMENT_V2_LEN + (ENTRY_LEN - STATEMENT_LEN);

/// Bytes of an entry whose statement has layout `version`.
#[must_use]
pub fn entry_len(version: u16) -> usize {
    if version >= STATEMENT_V2 {
        ENTRY_V2_LEN
    } else {
        ENTRY_LEN
    }
}

/// A checkpoint statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The log.
    pub log_id: [u8; 16],
    /// The checkpoint's number in its log, from 1.
    pub id: u64,
    /// Records covered: positions `0..tree_size`.
    pub tree_size: u64,
    /// When it was signed.
    pub time: Timestamp,
    /// The Merkle root over the first `tree_size` record hashes.
    pub root: Hash32,
    /// The record hash of position `tree_size - 1` (the chain seed when `tree_size` is 0).
    pub chain_head: Hash32,
    /// Version 2 only: how many streams the first `tree_size` records hold, and the root of
    /// their stream heads map. `None` in a version 1 statement.
    pub streams: Option<(u64, Hash32)>,
}

impl Statement {
    /// The statement's layout version: 2 when it carries the stream heads map.
    #[must_use]
    pub fn version(&self) -> u16 {
        if self.streams.is_some() {
            STATEMENT_V2
        } else {
            STATEMENT_VERSION
        }
    }

    /// The bytes the log's key signs: the 120 encoded bytes of a version 1 statement, the
    /// checkpoint note body of a version 2 one.
    #[must_use]
    pub fn signed_message(&self) -> Vec<u8> {
        match self.streams {
            None => self.encode(),
            Some(_) => super::note::checkpoint_body(self).into_bytes(),
        }
    }

    /// Encodes the statement (120 bytes for version 1, 160 for version 2).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let len = if self.streams.is_some() {
            STATEMENT_V2_LEN
        } else {
            STATEMENT_LEN
        };
        let mut b = vec![0u8; len];
        b[..8].copy_from_slice(STATEMENT_MAGIC);
        le::put_u16(&mut b, ST_VERSION, self.version());
        b[ST_LOG_ID..ST_LOG_ID + 16].copy_from_slice(&self.log_id);
        le::put_u64(&mut b, ST_ID, self.id);
        le::put_u64(&mut b, ST_TREE_SIZE, self.tree_size);
        le::put_u64(&mut b, ST_TIME, self.time.0);
        b[ST_ROOT..ST_ROOT + 32].copy_from_slice(&self.root);
        b[ST_CHAIN_HEAD..ST_CHAIN_HEAD + 32].copy_from_slice(&self.chain_head);
        if let Some((count, root)) = &self.streams {
            le::put_u64(&mut b, ST_STREAM_COUNT, *count);
            b[ST_STREAMS_ROOT..ST_STREAMS_ROOT + 32].copy_from_slice(root);
        }
        b
    }

    /// Decodes a statement.
    ///
    /// # Errors
    /// [`DecodeError`] on a wrong length, magic or version, or non-zero reserved bytes.
    pub fn decode(b: &[u8]) -> Result<Statement, DecodeError> {
        need(b, ST_LOG_ID)?;
        check_magic(b, STATEMENT_MAGIC, "checkpoint statement")?;
        let version = le::u16_at(b, ST_VERSION);
        if version != STATEMENT_VERSION && version != STATEMENT_V2 {
            return Err(DecodeError::UnsupportedVersion {
                what: "checkpoint statement",
                found: version,
                supported: STATEMENT_V2,
            });
        }
        let len = if version == STATEMENT_V2 {
            STATEMENT_V2_LEN
        } else {
            STATEMENT_LEN
        };
        if b.len() != len {
            return Err(DecodeError::LengthMismatch {
                what: "checkpoint statement",
                declared: len as u64,
                actual: b.len() as u64,
            });
        }
        check_zero(b, ST_RESERVED..ST_LOG_ID, "checkpoint statement")?;
        Ok(Statement {
            log_id: le::array_at(b, ST_LOG_ID),
            id: le::u64_at(b, ST_ID),
            tree_size: le::u64_at(b, ST_TREE_SIZE),
            time: Timestamp(le::u64_at(b, ST_TIME)),
            root: le::array_at(b, ST_ROOT),
            chain_head: le::array_at(b, ST_CHAIN_HEAD),
            streams: (version == STATEMENT_V2).then(|| {
                (
                    le::u64_at(b, ST_STREAM_COUNT),
                    le::array_at(b, ST_STREAMS_ROOT),
                )
            }),
        })
    }
}

/// A statement with its signature and the key that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// What is signed.
    pub statement: Statement,
    /// The Ed25519 public key of the signer.
    pub public_key: [u8; 32],
    /// The Ed25519 signature over [`Statement::signed_message`].
    pub signature: [u8; 64],
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The stored public key is not a valid Ed25519 point.
    #[error("the checkpoint's public key is not a valid Ed25519 key")]
    BadKey,
    /// The signature does not verify.
    #[error("the signature does not verify under key {fingerprint}")]
    BadSignature {
        /// Fingerprint of the key it was checked with.
        fingerprint: String,
    },
    /// Signed by a key the verifier does not trust.
    #[error("signed by key {fingerprint}, which is not among the trusted keys")]
    UntrustedKey {
        /// Fingerprint of the signing key.
        fingerprint: String,
    },
}

impl SignedCheckpoint {
    /// Signs `statement` with `key`.
    #[must_use]
    pub fn sign(statement: Statement, key: &SigningKey) -> SignedCheckpoint {
        let signature = key.sign(&statement.signed_message()).to_bytes();
        SignedCheckpoint {
            statement,
            public_key: key.verifying_key().to_bytes(),
            signature,
        }
    }

    /// Checks the signature against the key stored with it, and that the key is one of
    /// `trusted` (any key when `trusted` is empty).
    ///
    /// # Errors
    /// [`SignatureError`] saying why it does not verify.
    pub fn verify(&self, trusted: &[[u8; 32]]) -> Result<(), SignatureError> {
        if !trusted.is_empty() && !trusted.contains(&self.public_key) {
            return Err(SignatureError::UntrustedKey {
                fingerprint: fingerprint(&self.public_key),
            });
        }
        let key = VerifyingKey::from_bytes(&self.public_key).map_err(|_| SignatureError::BadKey)?;
        key.verify_strict(
            &self.statement.signed_message(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| SignatureError::BadSignature {
            fingerprint: fingerprint(&self.public_key),
        })
    }

    /// Encodes the checkpoints-file entry ([`ENTRY_LEN`] bytes for a version 1 statement,
    /// [`ENTRY_V2_LEN`] for version 2): statement, public key, signature, CRC-32 of what
    /// comes before it, 4 reserved bytes.
    #[must_use]
    pub fn encode_entry(&self) -> Vec<u8> {
        let mut b = self.statement.encode();
        let crc_at = b.len() + 96;
        b.extend_from_slice(&self.public_key);
        b.extend_from_slice(&self.signature);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        debug_assert_eq!(crc_at + 8, b.len());
        debug_assert_eq!(b.len(), entry_len(self.statement.version()));
        b
    }

    /// Decodes a checkpoints-file entry (the signature is not checked).
    ///
    /// # Errors
    /// [`DecodeError`] on a wrong length, CRC, statement or non-zero reserved bytes.
    pub fn decode_entry(b: &[u8]) -> Result<SignedCheckpoint, DecodeError> {
        need(b, ST_LOG_ID)?;
        let len = entry_len(le::u16_at(b, ST_VERSION));
        need(b, len)?;
        let b = &b[..len];
        let st_len = len - (ENTRY_LEN - STATEMENT_LEN);
        let crc_at = st_len + 96;
        check_crc(le::u32_at(b, crc_at), &b[..crc_at], "checkpoint entry")?;
        check_zero(b, crc_at + 4..len, "checkpoint entry")?;
        Ok(SignedCheckpoint {
            statement: Statement::decode(&b[..st_len])?,
            public_key: le::array_at(b, st_len),
            signature: le::array_at(b, st_len + 32),
        })
    }
}

/// A key's fingerprint: the first 8 bytes of BLAKE3 over the 32 public key bytes, in hex.
#[must_use]
pub fn fingerprint(public_key: &[u8; 32]) -> String {
    super::proof::hex(&blake3::hash(public_key).as_bytes()[..8])
}

/// The first line of a secret key file.
pub const SECRET_KEY_HEADER: &str = "tally-ed25519-secret-key-v1";

/// Encodes a secret key file: a header line and the 32-byte seed in hex.
#[must_use]
pub fn encode_secret_key(key: &SigningKey) -> String {
    format!(
        "{SECRET_KEY_HEADER}\n{}\n",
        super::proof::hex(key.as_bytes())
    )
}

/// Decodes a secret key file.
///
/// # Errors
/// [`DecodeError::Invalid`] when it is not a key file.
pub fn decode_secret_key(text: &str) -> Result<SigningKey, DecodeError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let bad = |detail: &str| DecodeError::Invalid {
        what: "secret key file",
        detail: detail.into(),
    };
    if lines.next() != Some(SECRET_KEY_HEADER) {
        return Err(bad(&format!("the first line must be {SECRET_KEY_HEADER}")));
    }
    let seed = lines
        .next()
        .and_then(super::proof::parse_hex::<32>)
        .ok_or_else(|| bad("the second line must be 64 hex digits"))?;
    if lines.next().is_some() {
        return Err(bad("unexpected text after the key"));
    }
    Ok(SigningKey::from_bytes(&seed))
}

/// Parses a public key file: one or more lines of 64 hex digits (a key each); empty lines
/// and lines starting with `#` are ignored.
///
/// # Errors
/// [`DecodeError::Invalid`] naming the first line that is not a key.
pub fn parse_public_keys(text: &str) -> Result<Vec<[u8; 32]>, DecodeError> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = super::proof::parse_hex::<32>(line)
            .filter(|k| VerifyingKey::from_bytes(k).is_ok())
            .ok_or_else(|| DecodeError::Invalid {
                what: "public key file",
                detail: format!(
                    "line {} is not an Ed25519 public key in 64 hex digits",
                    n + 1
                ),
            })?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(DecodeError::Invalid {
            what: "public key file",
            detail: "no key in it".into(),
        });
    }
    Ok(keys)
}

/// Encodes a public key as a public key file line.
#[must_use]
pub fn encode_public_key(key: &[u8; 32]) -> String {
    format!("{}\n", super::proof::hex(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> Statement {
        Statement {
            log_id: [7; 16],
            id: 3,
            tree_size: 1000,
            time: Timestamp(1_700_000_000_000_000_000),
            root: [1; 32],
            chain_head: [2; 32],
            streams: None,
        }
    }

    #[test]
    fn statement_and_entry_round_trip() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let cp = SignedCheckpoint::sign(statement(), &key);
        let entry = cp.encode_entry();
        assert_eq!(entry.len(), ENTRY_LEN);
        assert_eq!(&entry[..8], STATEMENT_MAGIC);
        assert_eq!(SignedCheckpoint::decode_entry(&entry), Ok(cp));
        assert_eq!(Statement::decode(&entry[..STATEMENT_LEN]), Ok(statement()));
        cp.verify(&[]).unwrap();
        cp.verify(&[cp.public_key]).unwrap();
    }

    #[test]
    fn any_changed_byte_of_a_signed_checkpoint_is_refused() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let cp = SignedCheckpoint::sign(statement(), &key);
        let entry = cp.encode_entry();
        for i in 0..ENTRY_CRC {
            let mut b = entry.clone();
            b[i] ^= 1;
            // The CRC catches it on disk; with the CRC recomputed, the signature must.
            assert!(SignedCheckpoint::decode_entry(&b).is_err(), "byte {i}");
            let crc = crc32fast::hash(&b[..ENTRY_CRC]);
            le::put_u32(&mut b, ENTRY_CRC, crc);
            let ok = SignedCheckpoint::decode_entry(&b).map(|c| c.verify(&[]));
            assert!(!matches!(ok, Ok(Ok(()))), "byte {i}");
        }
    }

    #[test]
    fn untrusted_keys_are_refused() {
        let cp = SignedCheckpoint::sign(statement(), &SigningKey::from_bytes(&[9; 32]));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert!(matches!(
            cp.verify(&[other]),
            Err(SignatureError::UntrustedKey { .. })
        ));
    }

    #[test]
    fn key_files_round_trip_and_refuse_junk() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let text = encode_secret_key(&key);
        assert_eq!(decode_secret_key(&text).unwrap().to_bytes(), key.to_bytes());
        assert!(decode_secret_key("nonsense").is_err());
        assert!(decode_secret_key(&format!("{SECRET_KEY_HEADER}\nabcd\n")).is_err());
        let public = key.verifying_key().to_bytes();
        let file = format!("# ours\n{}\n", encode_public_key(&public));
        assert_eq!(parse_public_keys(&file).unwrap(), vec![public]);
        assert!(parse_public_keys("").is_err());
        assert!(parse_public_keys("zz").is_err());
    }
}
