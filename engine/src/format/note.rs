//! Checkpoints as text that lives outside the data directory (docs/FORMAT.md, "Checkpoint
//! notes"): C2SP signed notes (c2sp.org/signed-note) whose body is a C2SP transparency log
//! checkpoint (c2sp.org/tlog-checkpoint) naming the hash function, signed by the log and
//! cosigned by witnesses (c2sp.org/tlog-cosignature, Ed25519 `cosignature/v1`).
//!
//! An auditor files a note away and later hands it back to `tally verify --trusted`; a
//! witness keeps the newest note it cosigned. The body is canonical: it is derived from the
//! checkpoint statement and nothing else, so a note that parses re-encodes to the same
//! bytes, and the statement it carries is exactly the one the log signed.
//!
//! The log's signature line: a statement of version 1 is signed as 120 binary bytes
//! (FORMAT.md section 17.1), so its signature type is `0xff` followed by the identifier
//! `tally-statement-v1` (signed-note's type for signatures it assigns no byte to). Plain
//! C2SP tools ignore such a line and verify the cosignatures only.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::Hash32;
use super::Timestamp;
use super::checkpoint::{SignatureError, SignedCheckpoint, Statement, fingerprint};
use super::proof::{hex, parse_hex};

/// What starts every Tally log's origin line; the log id in hex follows.
pub const ORIGIN_PREFIX: &str = "tally/";
/// The extension line that names the hash function of the tree (RFC 9162 with BLAKE3).
pub const HASH_LINE: &str = "hash blake3";
/// Signature type of a plain Ed25519 note signature over the note text.
pub const SIG_TYPE_ED25519: u8 = 0x01;
/// Signature type of an Ed25519 `cosignature/v1` (c2sp.org/tlog-cosignature).
pub const SIG_TYPE_COSIGNATURE_V1: u8 = 0x04;
/// Signature type for types signed-note assigns no byte to; an identifier follows.
pub const SIG_TYPE_OTHER: u8 = 0xff;
/// The identifier after [`SIG_TYPE_OTHER`] of a signature over a version 1 statement.
pub const STATEMENT_V1_SIG_ID: &[u8] = b"tally-statement-v1";
/// The longest key name (a witness's) this implementation accepts.
pub const KEY_NAME_BYTES_MAX: usize = 64;
/// The most signature lines a note may carry.
pub const NOTE_SIGNATURES_MAX: usize = 64;
/// The largest note accepted, in bytes.
pub const NOTE_BYTES_MAX: usize = 16 * 1024;

/// Why a note was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoteError {
    /// The text is not a signed note, its body is not a Tally checkpoint, or a witness key
    /// does not decode.
    #[error("malformed: {0}")]
    Malformed(String),
    /// No signature line is by a trusted key of the log.
    #[error("the note carries no signature by a trusted key of log {origin}")]
    NotSignedByLog {
        /// The note's origin line.
        origin: String,
    },
    /// A signature by a trusted key does not verify.
    #[error("signature by {name} does not verify: {source}")]
    BadSignature {
        /// The key name of the signature line.
        name: String,
        /// Why.
        source: SignatureError,
    },
}

fn malformed(detail: impl Into<String>) -> NoteError {
    NoteError::Malformed(detail.into())
}

/// The origin line of a log: `tally/` and the log id in lower-case hex.
#[must_use]
pub fn origin(log_id: &[u8; 16]) -> String {
    format!("{ORIGIN_PREFIX}{}", hex(log_id))
}

/// A key name is usable if it is non-empty, has no Unicode space or `+`, no control
/// character, and at most [`KEY_NAME_BYTES_MAX`] bytes.
#[must_use]
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= KEY_NAME_BYTES_MAX
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// The signed-note key ID: the first 4 bytes of SHA-256 over the key name, a newline, the
/// signature type (with its identifier, for `0xff`) and the public key.
#[must_use]
pub fn key_id(name: &str, sig_type: &[u8], public_key: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update(sig_type);
    h.update(public_key);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

fn log_sig_type(statement: &Statement) -> Vec<u8> {
    match statement.streams {
        None => [&[SIG_TYPE_OTHER][..], STATEMENT_V1_SIG_ID].concat(),
        Some(_) => vec![SIG_TYPE_ED25519],
    }
}

/// The note body of a checkpoint (its signed text for a version 2 statement): origin, tree
/// size, root (base64), then the extension lines `hash blake3`, `checkpoint <id>`,
/// `time <nanoseconds>`, `chain-head <base64>`, and for version 2 `streams <count>
/// <base64 root>`. Each line ends with a newline.
#[must_use]
pub fn checkpoint_body(s: &Statement) -> String {
    let mut body = format!(
        "{}\n{}\n{}\n{HASH_LINE}\ncheckpoint {}\ntime {}\nchain-head {}\n",
        origin(&s.log_id),
        s.tree_size,
        B64.encode(s.root),
        s.id,
        s.time.0,
        B64.encode(s.chain_head)
    );
    if let Some((count, root)) = &s.streams {
        body.push_str(&format!("streams {count} {}\n", B64.encode(root)));
    }
    body
}

/// Parses a checkpoint body back into its statement. Only the canonical form is accepted:
/// the body must be exactly what [`checkpoint_body`] makes of the statement.
///
/// # Errors
/// [`NoteError::Malformed`] naming the first line that is wrong.
pub fn parse_checkpoint_body(body: &str) -> Result<Statement, NoteError> {
    let lines: Vec<&str> = body
        .strip_suffix('\n')
        .ok_or_else(|| malformed("the body does not end with a newline"))?
        .split('\n')
        .collect();
    if !(7..=8).contains(&lines.len()) {
        return Err(malformed(format!(
            "a checkpoint body has 7 or 8 lines, this one {}",
            lines.len()
        )));
    }
    let log_id = lines[0]
        .strip_prefix(ORIGIN_PREFIX)
        .and_then(parse_hex::<16>)
        .ok_or_else(|| malformed(format!("origin line {:?} is not tally/<log id>", lines[0])))?;
    let number = |line: &str, what: &str| -> Result<u64, NoteError> {
        line.parse::<u64>()
            .map_err(|_| malformed(format!("{what} {line:?} is not a decimal number")))
    };
    let hash = |text: &str, what: &str| -> Result<Hash32, NoteError> {
        B64.decode(text)
            .ok()
            .and_then(|b| <Hash32>::try_from(b.as_slice()).ok())
            .ok_or_else(|| malformed(format!("{what} {text:?} is not a base64 hash")))
    };
    let field = |line: &str, key: &str| -> Result<String, NoteError> {
        line.strip_prefix(key)
            .and_then(|r| r.strip_prefix(' '))
            .map(str::to_owned)
            .ok_or_else(|| malformed(format!("expected a {key} line, found {line:?}")))
    };
    if lines[3] != HASH_LINE {
        return Err(malformed(format!(
            "expected {HASH_LINE:?}, found {:?}: not a BLAKE3 Tally log",
            lines[3]
        )));
    }
    let streams = match lines.get(7) {
        None => None,
        Some(line) => {
            let rest = field(line, "streams")?;
            let (count, root) = rest
                .split_once(' ')
                .ok_or_else(|| malformed(format!("streams line {line:?}")))?;
            Some((number(count, "stream count")?, hash(root, "streams root")?))
        }
    };
    let s = Statement {
        log_id,
        id: number(&field(lines[4], "checkpoint")?, "checkpoint id")?,
        tree_size: number(lines[1], "tree size")?,
        time: Timestamp(number(&field(lines[5], "time")?, "time")?),
        root: hash(lines[2], "root")?,
        chain_head: hash(&field(lines[6], "chain-head")?, "chain head")?,
        streams,
    };
    if checkpoint_body(&s) != body {
        return Err(malformed("the body is not in canonical form"));
    }
    Ok(s)
}

/// A signature line of a note: key name, key ID and the signature bytes after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteSignature {
    /// The key name.
    pub name: String,
    /// The 4-byte key ID.
    pub key_id: [u8; 4],
    /// The signature bytes after the key ID.
    pub bytes: Vec<u8>,
}

impl NoteSignature {
    /// The signature line, with its newline.
    #[must_use]
    pub fn line(&self) -> String {
        let mut raw = self.key_id.to_vec();
        raw.extend_from_slice(&self.bytes);
        format!("\u{2014} {} {}\n", self.name, B64.encode(raw))
    }
}

/// A signed note: its text (the body, ending with a newline) and its signature lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The note text, ending with a newline.
    pub body: String,
    /// Its signatures, in order.
    pub signatures: Vec<NoteSignature>,
}

impl Note {
    /// Parses a signed note (c2sp.org/signed-note).
    ///
    /// # Errors
    /// [`NoteError::Malformed`] when it is not one, is larger than [`NOTE_BYTES_MAX`], or
    /// carries more than [`NOTE_SIGNATURES_MAX`] signatures.
    pub fn parse(text: &str) -> Result<Note, NoteError> {
        if text.len() > NOTE_BYTES_MAX {
            return Err(malformed(format!(
                "{} bytes, more than {NOTE_BYTES_MAX}",
                text.len()
            )));
        }
        if text.chars().any(|c| c.is_control() && c != '\n') {
            return Err(malformed("a control character other than newline"));
        }
        let split = text
            .rfind("\n\n")
            .ok_or_else(|| malformed("no blank line before the signatures"))?;
        let body = &text[..=split];
        let sigs = &text[split + 2..];
        let sig_text = sigs
            .strip_suffix('\n')
            .ok_or_else(|| malformed("the last signature line does not end with a newline"))?;
        let mut signatures = Vec::new();
        for line in sig_text.split('\n') {
            let rest = line
                .strip_prefix("\u{2014} ")
                .ok_or_else(|| malformed(format!("{line:?} is not a signature line")))?;
            let (name, b64) = rest
                .split_once(' ')
                .ok_or_else(|| malformed(format!("{line:?} is not a signature line")))?;
            if !valid_key_name(name) {
                return Err(malformed(format!("key name {name:?}")));
            }
            let raw = B64
                .decode(b64)
                .map_err(|_| malformed(format!("signature of {name} is not base64")))?;
            if raw.len() < 5 {
                return Err(malformed(format!("signature of {name} is too short")));
            }
            signatures.push(NoteSignature {
                name: name.to_owned(),
                key_id: [raw[0], raw[1], raw[2], raw[3]],
                bytes: raw[4..].to_vec(),
            });
            if signatures.len() > NOTE_SIGNATURES_MAX {
                return Err(malformed("too many signatures"));
            }
        }
        Ok(Note {
            body: body.to_owned(),
            signatures,
        })
    }

    /// The note as text: body, blank line, signature lines.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = self.body.clone();
        out.push('\n');
        for s in &self.signatures {
            out.push_str(&s.line());
        }
        out
    }
}

/// The log's signature line of a checkpoint.
#[must_use]
pub fn log_signature(cp: &SignedCheckpoint) -> NoteSignature {
    let name = origin(&cp.statement.log_id);
    NoteSignature {
        key_id: key_id(&name, &log_sig_type(&cp.statement), &cp.public_key),
        name,
        bytes: cp.signature.to_vec(),
    }
}

/// A checkpoint as a signed note: its body, the log's signature, and `cosignatures`.
#[must_use]
pub fn checkpoint_note(cp: &SignedCheckpoint, cosignatures: &[Cosignature]) -> Note {
    let mut signatures = vec![log_signature(cp)];
    signatures.extend(cosignatures.iter().map(Cosignature::note_signature));
    Note {
        body: checkpoint_body(&cp.statement),
        signatures,
    }
}

/// Reads a checkpoint from a note: the statement its body gives, with the log's signature
/// by one of `log_keys` (a signature line named after the origin whose key ID is that of a
/// trusted key), verified.
///
/// # Errors
/// [`NoteError`] when the body is not a checkpoint, no line is by a trusted key, or the
/// signature does not verify.
pub fn checkpoint_from_note(
    note: &Note,
    log_keys: &[[u8; 32]],
) -> Result<SignedCheckpoint, NoteError> {
    let statement = parse_checkpoint_body(&note.body)?;
    let name = origin(&statement.log_id);
    let sig_type = log_sig_type(&statement);
    for key in log_keys {
        let id = key_id(&name, &sig_type, key);
        let Some(sig) = note
            .signatures
            .iter()
            .find(|s| s.name == name && s.key_id == id)
        else {
            continue;
        };
        let signature: [u8; 64] = sig.bytes.as_slice().try_into().map_err(|_| {
            malformed(format!(
                "the log's signature is {} bytes, not 64",
                sig.bytes.len()
            ))
        })?;
        let cp = SignedCheckpoint {
            statement,
            public_key: *key,
            signature,
        };
        cp.verify(log_keys)
            .map_err(|source| NoteError::BadSignature { name, source })?;
        return Ok(cp);
    }
    Err(NoteError::NotSignedByLog { origin: name })
}

/// A witness's public key, as a C2SP verifier key (vkey): `<name>+<key ID in
/// hex>+<base64 of the signature type byte and the 32 key bytes>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessKey {
    /// The witness's key name.
    pub name: String,
    /// Its Ed25519 public key.
    pub public_key: [u8; 32],
}

impl WitnessKey {
    /// The key ID of its cosignatures.
    #[must_use]
    pub fn key_id(&self) -> [u8; 4] {
        key_id(&self.name, &[SIG_TYPE_COSIGNATURE_V1], &self.public_key)
    }

    /// The vkey line (without a newline).
    #[must_use]
    pub fn encode(&self) -> String {
        let mut raw = vec![SIG_TYPE_COSIGNATURE_V1];
        raw.extend_from_slice(&self.public_key);
        format!("{}+{}+{}", self.name, hex(&self.key_id()), B64.encode(raw))
    }

    /// Parses a vkey of type `0x04` (a `cosignature/v1` witness key).
    ///
    /// # Errors
    /// [`NoteError::Malformed`] saying what is wrong.
    pub fn parse(text: &str) -> Result<WitnessKey, NoteError> {
        // The base64 key may itself contain '+': only the first two separate fields.
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("a witness key is <name>+<key id>+<base64 key>"));
        };
        if !valid_key_name(name) {
            return Err(malformed(format!("witness key name {name:?}")));
        }
        let raw = B64
            .decode(b64)
            .map_err(|_| malformed("the witness key is not base64"))?;
        if raw.len() != 33 || raw[0] != SIG_TYPE_COSIGNATURE_V1 {
            return Err(malformed(
                "the witness key is not an Ed25519 cosignature/v1 key (type 0x04, 32 bytes)",
            ));
        }
        let public_key: [u8; 32] = raw[1..].try_into().map_err(|_| malformed("key length"))?;
        VerifyingKey::from_bytes(&public_key)
            .map_err(|_| malformed("the witness key is not an Ed25519 point"))?;
        let key = WitnessKey {
            name: name.to_owned(),
            public_key,
        };
        if parse_hex::<4>(id) != Some(key.key_id()) {
            return Err(malformed(
                "the witness key's ID does not match its name and key",
            ));
        }
        Ok(key)
    }
}

/// A witness's cosignature of a checkpoint (c2sp.org/tlog-cosignature, Ed25519
/// `cosignature/v1`): "as of `timestamp`, this is the largest consistent tree I have seen
/// of the log".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cosignature {
    /// The witness's key name.
    pub name: String,
    /// Its public key.
    pub public_key: [u8; 32],
    /// Seconds since the Unix epoch when it cosigned.
    pub timestamp: u64,
    /// The Ed25519 signature over [`Cosignature::message`].
    pub signature: [u8; 64],
}

impl Cosignature {
    /// What a cosignature signs: `cosignature/v1`, `time <timestamp>`, then the body.
    #[must_use]
    pub fn message(timestamp: u64, body: &str) -> Vec<u8> {
        format!("cosignature/v1\ntime {timestamp}\n{body}").into_bytes()
    }

    /// Cosigns a checkpoint body.
    #[must_use]
    pub fn sign(key: &SigningKey, name: &str, timestamp: u64, body: &str) -> Cosignature {
        Cosignature {
            name: name.to_owned(),
            public_key: key.verifying_key().to_bytes(),
            timestamp,
            signature: key.sign(&Cosignature::message(timestamp, body)).to_bytes(),
        }
    }

    /// Checks the cosignature over `body`.
    ///
    /// # Errors
    /// [`SignatureError`] when the key is not a curve point or the signature does not
    /// verify.
    pub fn verify(&self, body: &str) -> Result<(), SignatureError> {
        let key = VerifyingKey::from_bytes(&self.public_key).map_err(|_| SignatureError::BadKey)?;
        key.verify_strict(
            &Cosignature::message(self.timestamp, body),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| SignatureError::BadSignature {
            fingerprint: fingerprint(&self.public_key),
        })
    }

    /// The witness's key.
    #[must_use]
    pub fn witness(&self) -> WitnessKey {
        WitnessKey {
            name: self.name.clone(),
            public_key: self.public_key,
        }
    }

    /// The cosignature as a note signature line: key ID, then the timestamp (big-endian,
    /// as tlog-cosignature specifies) and the signature.
    #[must_use]
    // c2sp.org/tlog-cosignature serialises the timestamp big-endian.
    #[allow(clippy::big_endian_bytes)]
    pub fn note_signature(&self) -> NoteSignature {
        let mut bytes = self.timestamp.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.signature);
        NoteSignature {
            name: self.name.clone(),
            key_id: self.witness().key_id(),
            bytes,
        }
    }

    /// The cosignatures in `note` by the witnesses in `keys` (matched by name and key ID),
    /// whether or not they verify.
    #[must_use]
    // c2sp.org/tlog-cosignature serialises the timestamp big-endian.
    #[allow(clippy::big_endian_bytes)]
    pub fn in_note(note: &Note, keys: &[WitnessKey]) -> Vec<Cosignature> {
        let mut out = Vec::new();
        for s in &note.signatures {
            let Some(k) = keys
                .iter()
                .find(|k| k.name == s.name && k.key_id() == s.key_id)
            else {
                continue;
            };
            let (Ok(ts), Ok(sig)) = (
                <[u8; 8]>::try_from(s.bytes.get(..8).unwrap_or_default()),
                <[u8; 64]>::try_from(s.bytes.get(8..).unwrap_or_default()),
            ) else {
                continue;
            };
            out.push(Cosignature {
                name: k.name.clone(),
                public_key: k.public_key,
                timestamp: u64::from_be_bytes(ts),
                signature: sig,
            });
        }
        out
    }
}

/// Magic of an entry of `tally.cosignatures`.
pub const COSIGNATURE_MAGIC: &[u8; 8] = b"TALLYCOS";
/// Layout version of a cosignature entry.
pub const COSIGNATURE_VERSION: u16 = 1;
/// Bytes of an entry of `tally.cosignatures`.
pub const COSIGNATURE_ENTRY_LEN: usize = 256;
/// `version` (u16).
pub const CE_VERSION: usize = 8;
/// `name_len` (u16).
pub const CE_NAME_LEN: usize = 10;
/// 4 reserved bytes.
pub const CE_RESERVED_A: usize = 12;
/// `checkpoint_id` (u64).
pub const CE_CHECKPOINT_ID: usize = 16;
/// `tree_size` (u64) of the checkpoint cosigned.
pub const CE_TREE_SIZE: usize = 24;
/// `root` (32 bytes) of the checkpoint cosigned.
pub const CE_ROOT: usize = 32;
/// The witness's public key (32 bytes).
pub const CE_PUBLIC_KEY: usize = 64;
/// `timestamp` (u64, seconds).
pub const CE_TIMESTAMP: usize = 96;
/// The signature (64 bytes).
pub const CE_SIGNATURE: usize = 104;
/// The witness's key name (UTF-8, zero-padded to [`KEY_NAME_BYTES_MAX`] bytes).
pub const CE_NAME: usize = 168;
/// 20 reserved bytes.
pub const CE_RESERVED_B: usize = CE_NAME + KEY_NAME_BYTES_MAX;
/// CRC-32 of bytes `0..CE_CRC`.
pub const CE_CRC: usize = 252;
const _: () = assert!(CE_RESERVED_B + 20 == CE_CRC);
const _: () = assert!(CE_CRC + 4 == COSIGNATURE_ENTRY_LEN);

/// A cosignature as stored beside the log, with the checkpoint it cosigns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CosignatureEntry {
    /// The checkpoint's id.
    pub checkpoint_id: u64,
    /// The checkpoint's tree size when it was cosigned.
    pub tree_size: u64,
    /// The checkpoint's root when it was cosigned.
    pub root: Hash32,
    /// The cosignature.
    pub cosignature: Cosignature,
}

impl CosignatureEntry {
    /// Encodes the entry.
    ///
    /// # Panics
    /// If the witness name is not a valid key name (checked when the cosignature is
    /// accepted).
    #[must_use]
    pub fn encode(&self) -> [u8; COSIGNATURE_ENTRY_LEN] {
        use super::le;
        let c = &self.cosignature;
        assert!(valid_key_name(&c.name), "witness name {:?}", c.name);
        let mut b = [0u8; COSIGNATURE_ENTRY_LEN];
        b[..8].copy_from_slice(COSIGNATURE_MAGIC);
        le::put_u16(&mut b, CE_VERSION, COSIGNATURE_VERSION);
        le::put_u16(&mut b, CE_NAME_LEN, c.name.len() as u16);
        le::put_u64(&mut b, CE_CHECKPOINT_ID, self.checkpoint_id);
        le::put_u64(&mut b, CE_TREE_SIZE, self.tree_size);
        b[CE_ROOT..CE_ROOT + 32].copy_from_slice(&self.root);
        b[CE_PUBLIC_KEY..CE_PUBLIC_KEY + 32].copy_from_slice(&c.public_key);
        le::put_u64(&mut b, CE_TIMESTAMP, c.timestamp);
        b[CE_SIGNATURE..CE_SIGNATURE + 64].copy_from_slice(&c.signature);
        b[CE_NAME..CE_NAME + c.name.len()].copy_from_slice(c.name.as_bytes());
        let crc = crc32fast::hash(&b[..CE_CRC]);
        le::put_u32(&mut b, CE_CRC, crc);
        b
    }

    /// Decodes an entry (the signature is not checked).
    ///
    /// # Errors
    /// [`super::DecodeError`] on a short entry, bad magic, CRC or version, non-zero
    /// reserved or padding bytes, or an invalid name.
    pub fn decode(b: &[u8]) -> Result<CosignatureEntry, super::DecodeError> {
        use super::{check_crc, check_magic, check_version, check_zero, le, need};
        need(b, COSIGNATURE_ENTRY_LEN)?;
        let b = &b[..COSIGNATURE_ENTRY_LEN];
        check_magic(b, COSIGNATURE_MAGIC, "TALLYCOS")?;
        check_crc(le::u32_at(b, CE_CRC), &b[..CE_CRC], "cosignature entry")?;
        check_version(le::u16_at(b, CE_VERSION), "cosignature entry")?;
        check_zero(b, CE_RESERVED_A..CE_CHECKPOINT_ID, "cosignature entry")?;
        let name_len = usize::from(le::u16_at(b, CE_NAME_LEN));
        let bad_name = || super::DecodeError::Invalid {
            what: "cosignature entry",
            detail: "witness name".into(),
        };
        if name_len > KEY_NAME_BYTES_MAX {
            return Err(bad_name());
        }
        check_zero(b, CE_NAME + name_len..CE_CRC, "cosignature entry")?;
        let name = std::str::from_utf8(&b[CE_NAME..CE_NAME + name_len])
            .ok()
            .filter(|n| valid_key_name(n))
            .ok_or_else(bad_name)?;
        Ok(CosignatureEntry {
            checkpoint_id: le::u64_at(b, CE_CHECKPOINT_ID),
            tree_size: le::u64_at(b, CE_TREE_SIZE),
            root: le::array_at(b, CE_ROOT),
            cosignature: Cosignature {
                name: name.to_owned(),
                public_key: le::array_at(b, CE_PUBLIC_KEY),
                timestamp: le::u64_at(b, CE_TIMESTAMP),
                signature: le::array_at(b, CE_SIGNATURE),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(streams: Option<(u64, Hash32)>) -> Statement {
        Statement {
            log_id: [7; 16],
            id: 3,
            tree_size: 1000,
            time: Timestamp(1_700_000_000_000_000_000),
            root: [1; 32],
            chain_head: [2; 32],
            streams,
        }
    }

    #[test]
    fn bodies_round_trip_and_only_the_canonical_form_parses() {
        for s in [statement(None), statement(Some((42, [3; 32])))] {
            let body = checkpoint_body(&s);
            assert_eq!(parse_checkpoint_body(&body), Ok(s));
            assert!(parse_checkpoint_body(&body.replace("1000", "01000")).is_err());
            assert!(parse_checkpoint_body(&body.replace("hash blake3", "hash sha256")).is_err());
            assert!(parse_checkpoint_body(body.trim_end()).is_err());
        }
    }

    #[test]
    fn a_note_carries_the_log_signature_and_cosignatures() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let cp = SignedCheckpoint::sign(statement(None), &key);
        let w = SigningKey::from_bytes(&[4; 32]);
        let cosig = Cosignature::sign(
            &w,
            "witness.example/w1",
            1_700_000_000,
            &checkpoint_body(&cp.statement),
        );
        let text = checkpoint_note(&cp, std::slice::from_ref(&cosig)).encode();
        let note = Note::parse(&text).unwrap();
        assert_eq!(note.encode(), text);
        assert_eq!(checkpoint_from_note(&note, &[cp.public_key]), Ok(cp));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert!(matches!(
            checkpoint_from_note(&note, &[other]),
            Err(NoteError::NotSignedByLog { .. })
        ));
        let wk = cosig.witness();
        assert_eq!(WitnessKey::parse(&wk.encode()), Ok(wk.clone()));
        // Keys whose base64 holds '+' parse too.
        for seed in 0..64u8 {
            let k = WitnessKey {
                name: "w.example/x".into(),
                public_key: SigningKey::from_bytes(&[seed; 32])
                    .verifying_key()
                    .to_bytes(),
            };
            assert_eq!(WitnessKey::parse(&k.encode()), Ok(k.clone()), "seed {seed}");
        }
        let found = Cosignature::in_note(&note, &[wk]);
        assert_eq!(found, vec![cosig.clone()]);
        found[0].verify(&note.body).unwrap();
        // A cosignature does not carry over to another body.
        let other_body = checkpoint_body(&statement(Some((1, [0; 32]))));
        assert!(cosig.verify(&other_body).is_err());
        // A changed body fails the log's signature.
        let forged = text.replace("\n1000\n", "\n999\n");
        let forged = Note::parse(&forged).unwrap();
        assert!(checkpoint_from_note(&forged, &[cp.public_key]).is_err());
    }

    #[test]
    fn cosignature_entries_round_trip_and_refuse_damage() {
        let w = SigningKey::from_bytes(&[4; 32]);
        let e = CosignatureEntry {
            checkpoint_id: 9,
            tree_size: 77,
            root: [5; 32],
            cosignature: Cosignature::sign(&w, "w.example/1", 12, "body\n"),
        };
        let b = e.encode();
        assert_eq!(CosignatureEntry::decode(&b), Ok(e));
        for i in 0..COSIGNATURE_ENTRY_LEN {
            let mut d = b;
            d[i] ^= 1;
            assert!(CosignatureEntry::decode(&d).is_err(), "byte {i}");
        }
        assert!(CosignatureEntry::decode(&b[..100]).is_err());
    }

    #[test]
    fn c2sp_key_ids_follow_the_spec() {
        // SHA-256(name || "\n" || 0x04 || key)[:4], computed independently.
        let key = [0x11; 32];
        let mut h = Sha256::new();
        h.update(b"w.example/a\n\x04");
        h.update(key);
        let want = h.finalize();
        assert_eq!(
            key_id("w.example/a", &[4], &key),
            [want[0], want[1], want[2], want[3]]
        );
    }
}
