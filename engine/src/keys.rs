//! Keys of data subjects, kept outside the log (docs/FORMAT.md 22, ADR 0012).
//!
//! Personal data is sealed at append with a key of its data subject
//! ([`crate::format::sealed`]); forgetting the subject destroys the key, and from then on
//! nobody can read that data, in any segment, backup or extract, without a byte of them
//! rewritten. The keys live in a [`KeyStore`]: [`FileKeyStore`] by default, a file of fixed
//! slots each holding one subject key wrapped (XChaCha20-Poly1305) by a master key the
//! operator keeps elsewhere. The trait admits a KMS later.
//!
//! A key store must not be inside the log's directory: a copy of the directory (a backup)
//! would then carry the keys, and destroying one would not erase the copy.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, AeadInOut, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::le;
use crate::format::sealed::SubjectHash;

/// The key store's file in its directory.
pub const KEY_FILE: &str = "subjects.keys";
/// The file's magic.
pub const KEY_FILE_MAGIC: &[u8; 8] = b"TALLYKEY";
/// The file's layout version.
pub const KEY_FILE_VERSION: u16 = 1;
/// Bytes of the header, and of each slot after it.
pub const SLOT_LEN: usize = 128;
/// A slot's state: a live key.
pub const SLOT_LIVE: u8 = 1;
/// A slot's state: a destroyed key (its nonce and wrapped key are zeros).
pub const SLOT_DESTROYED: u8 = 2;
/// Header: `magic` (`KEY_FILE_MAGIC`).
pub const KH_MAGIC: usize = 0;
/// Header: `version` (`u16`).
pub const KH_VERSION: usize = 8;
/// Header: reserved, zero.
pub const KH_RESERVED: usize = 10;
/// Header: `slot_len` (`u32`, [`SLOT_LEN`]).
pub const KH_SLOT_LEN: usize = 12;
/// Header: the nonce that wraps the token key.
pub const KH_NONCE: usize = 16;
/// Header: the wrapped token key (32 bytes and a 16-byte tag).
pub const KH_TOKEN_KEY: usize = 40;
/// Header: reserved, zero.
pub const KH_RESERVED_B: usize = 88;
/// Header and slot: the CRC-32 of the bytes before it.
pub const K_CRC: usize = SLOT_LEN - 4;
/// Slot: `state` ([`SLOT_LIVE`] or [`SLOT_DESTROYED`]).
pub const KS_STATE: usize = 0;
/// Slot: reserved, zero.
pub const KS_RESERVED: usize = 1;
/// Slot: `generation` (`u32`).
pub const KS_GENERATION: usize = 4;
/// Slot: the subject's id hash.
pub const KS_SUBJECT: usize = 8;
/// Slot: the nonce that wraps the key.
pub const KS_NONCE: usize = 40;
/// Slot: the wrapped key (32 bytes and a 16-byte tag).
pub const KS_WRAPPED_KEY: usize = 64;
/// Slot: reserved, zero.
pub const KS_RESERVED_B: usize = 112;
/// Bytes of a CRC-covered slot or header before its CRC.
const CRC_AT: usize = K_CRC;
/// The prefix of a subject key's associated data when wrapped.
const WRAP_AAD: &[u8] = b"tally subject key v1\0";
/// The associated data of the wrapped tokenisation key.
const TOKEN_AAD: &[u8] = b"tally token key v1\0";

/// The detail of the error a store another process holds gives.
const HELD_ELSEWHERE: &str = "another process holds it (stop tallyd, or open it read-only)";

/// Whether `e` is [`FileKeyStore::open`]'s refusal of a store another process holds.
#[must_use]
pub fn is_held_elsewhere(e: &Error) -> bool {
    matches!(e, Error::Keys { detail, .. } if detail == HELD_ELSEWHERE)
}

/// A 32-byte key. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A random key.
    ///
    /// # Errors
    /// [`Error::Keys`] when the system has no randomness to give.
    pub fn random() -> Result<SecretKey> {
        Ok(SecretKey(random_bytes::<32>()?))
    }

    /// The key from 64 hexadecimal digits (surrounding white space ignored).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for anything else.
    pub fn from_hex(text: &str) -> Result<SecretKey> {
        crate::format::proof::parse_hex::<32>(text.trim())
            .map(SecretKey)
            .ok_or_else(|| Error::InvalidOptions {
                reason: "a key is 64 hexadecimal digits".into(),
            })
    }

    /// 64 lower-case hexadecimal digits.
    #[must_use]
    pub fn to_hex(&self) -> String {
        crate::format::proof::hex(&self.0)
    }

    /// Reads a master key from a file of 64 hexadecimal digits.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read; [`Error::InvalidOptions`] when it holds
    /// anything else.
    pub fn from_file(path: &Path) -> Result<SecretKey> {
        let text = std::fs::read_to_string(path).map_err(Error::io("read master key", path))?;
        SecretKey::from_hex(&text).map_err(|_| Error::InvalidOptions {
            reason: format!(
                "{} does not hold a master key (64 hexadecimal digits)",
                path.display()
            ),
        })
    }

    /// Writes a new random master key to `path`, which must not exist, readable by its
    /// owner only, and syncs it.
    ///
    /// # Errors
    /// [`Error::Io`] when the file exists or cannot be written.
    pub fn create_file(path: &Path) -> Result<SecretKey> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let key = SecretKey::random()?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(Error::io("create master key", path))?;
        f.write_all(format!("{}\n", key.to_hex()).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(Error::io("write master key", path))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(Error::io("sync", dir))?;
        }
        Ok(key)
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::Keys {
        path: PathBuf::new(),
        detail: format!("no randomness: {e}"),
        source: None,
    })?;
    Ok(b)
}

/// A fresh 24-byte nonce: 16 random bytes drawn once per process, then a counter, so that
/// no two nonces of a process are equal and two processes share a prefix with probability
/// 2^-128, without a system call per nonce.
///
/// # Errors
/// [`Error::Keys`] when the system has no randomness to give.
pub fn nonce() -> Result<[u8; 24]> {
    static PREFIX: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = match PREFIX.get() {
        Some(p) => *p,
        None => {
            let p = random_bytes::<16>()?;
            *PREFIX.get_or_init(|| p)
        }
    };
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(&prefix);
    out[16..].copy_from_slice(&n.to_le_bytes());
    Ok(out)
}

/// Encrypts `plaintext` with XChaCha20-Poly1305 under `key` and a random nonce, which it
/// returns with the ciphertext (tag last).
///
/// # Errors
/// [`Error::Keys`] when the system has no randomness to give.
pub fn encrypt(key: &SecretKey, aad: &[u8], plaintext: &[u8]) -> Result<([u8; 24], Vec<u8>)> {
    let nonce = random_bytes::<24>()?;
    let ct = encrypt_with(key, &nonce, aad, plaintext);
    Ok((nonce, ct))
}

/// Encrypts with the nonce given.
#[must_use]
pub fn encrypt_with(key: &SecretKey, nonce: &[u8; 24], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&Key::from(key.0));
    // Encryption fails only for a message beyond the cipher's limit (256 GiB); payloads
    // are at most 1 MiB.
    cipher
        .encrypt(
            &XNonce::from(*nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_default()
}

/// Encrypts `buf` in place with XChaCha20-Poly1305 under `key` and `nonce` and returns the
/// tag, which goes after the ciphertext (the layout of [`encrypt_with`]'s output, built in the
/// caller's buffer without a copy).
#[must_use]
pub fn encrypt_in_place(key: &SecretKey, nonce: &[u8; 24], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
    let cipher = XChaCha20Poly1305::new(&Key::from(key.0));
    // As in `encrypt_with`: fails only beyond the cipher's limit (256 GiB).
    cipher
        .encrypt_inout_detached(&XNonce::from(*nonce), aad, buf.into())
        .map(Into::into)
        .unwrap_or_default()
}

/// Decrypts; `None` when the key, nonce, associated data or ciphertext is not the one
/// sealed.
#[must_use]
pub fn decrypt(
    key: &SecretKey,
    nonce: &[u8; 24],
    aad: &[u8],
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    let cipher = XChaCha20Poly1305::new(&Key::from(key.0));
    cipher
        .decrypt(
            &XNonce::from(*nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .ok()
}

/// The stable token of a value: `tok_` and the first 16 bytes, in hexadecimal, of the
/// value's BLAKE3 keyed by the deployment's token key. Equal values give equal tokens, so
/// projections can join on them; without the key nobody can tell which value a token
/// stands for by hashing guesses.
#[must_use]
pub fn token(token_key: &SecretKey, value: &[u8]) -> String {
    let h = blake3::keyed_hash(&token_key.0, value);
    let hex: String = h.as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("tok_{hex}")
}

/// What a key store knows of one key of a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyLookup {
    /// The key.
    Live(SecretKey),
    /// The key was destroyed.
    Destroyed,
    /// The store never held it.
    Unknown,
}

/// Where subject keys live. Implementations must make every key they hand out for an
/// append durable before returning it (an event sealed under a key that is then lost
/// would be unreadable), and a destruction durable before returning.
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// Where the store is (a directory, a KMS address), for messages and to refuse a store
    /// inside the log's directory.
    fn location(&self) -> &Path;

    /// The current key of each subject and its generation, of at least the generation given:
    /// a subject without a live key of that generation or later gets a new one (the next
    /// generation, and at least the one given), after any older live key is destroyed. The
    /// log gives one past every erased generation, so that a store that missed a
    /// destruction (restored from an older copy, or torn) never hands out an erased key.
    ///
    /// # Errors
    /// [`Error::Keys`] when the store cannot be read or written.
    fn keys_at_least(&self, subjects: &[(SubjectHash, u32)]) -> Result<Vec<(u32, SecretKey)>>;

    /// [`KeyStore::keys_at_least`] of generation 1 or later.
    ///
    /// # Errors
    /// As [`KeyStore::keys_at_least`].
    fn keys_for_append(&self, subjects: &[SubjectHash]) -> Result<Vec<(u32, SecretKey)>> {
        let at_least: Vec<(SubjectHash, u32)> = subjects.iter().map(|s| (*s, 1)).collect();
        self.keys_at_least(&at_least)
    }

    /// The key of `subject` of `generation`.
    ///
    /// # Errors
    /// [`Error::Keys`] when the store cannot be read, or holds a key it cannot unwrap.
    fn key(&self, subject: &SubjectHash, generation: u32) -> Result<KeyLookup>;

    /// The subject's newest generation, and whether its key is live.
    ///
    /// # Errors
    /// [`Error::Keys`] when the store cannot be read.
    fn generation(&self, subject: &SubjectHash) -> Result<Option<(u32, bool)>>;

    /// Destroys the subject's live key, durably. `Ok(false)` when it had none.
    ///
    /// # Errors
    /// [`Error::Keys`] when the store cannot be written.
    fn destroy(&self, subject: &SubjectHash) -> Result<bool>;

    /// The deployment's tokenisation key ([`token`]).
    fn token_key(&self) -> &SecretKey;

    /// Subjects with a key (live or destroyed) in the store.
    fn subjects(&self) -> usize;
}

#[derive(Debug)]
struct Entry {
    generation: u32,
    slot: u32,
    live: bool,
    /// The unwrapped key, once used.
    key: Option<SecretKey>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    subjects: HashMap<SubjectHash, Entry>,
    /// The next free slot.
    next_slot: u32,
}

/// The default key store: `subjects.keys` in a directory of its own, outside the log's
/// (docs/FORMAT.md 22). A 128-byte header holds the tokenisation key wrapped by the master
/// key (so a wrong master key is refused at open); each 128-byte slot after it holds one
/// key of one subject, wrapped by the master key, or a destroyed key's zeros. Opening reads
/// every slot's header fields (a few bytes per subject in memory); keys are unwrapped on
/// first use.
pub struct FileKeyStore {
    dir: PathBuf,
    path: PathBuf,
    master: SecretKey,
    token_key: SecretKey,
    inner: Mutex<Inner>,
    damaged: u64,
    read_only: bool,
}

impl std::fmt::Debug for FileKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKeyStore")
            .field("dir", &self.dir)
            .field("damaged", &self.damaged)
            .finish_non_exhaustive()
    }
}

fn slot_crc(b: &[u8]) -> u32 {
    crc32fast::hash(&b[..CRC_AT])
}

fn wrap_aad(subject: &SubjectHash, generation: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(WRAP_AAD.len() + 36);
    a.extend_from_slice(WRAP_AAD);
    a.extend_from_slice(&subject.0);
    a.extend_from_slice(&generation.to_le_bytes());
    a
}

impl FileKeyStore {
    /// Opens the key store in `dir` with `master`, creating the directory and an empty store
    /// when `create` is set and there is none. The process holds the store's lock until it
    /// drops it: one writer at a time (tallyd, or a tool on a stopped log).
    ///
    /// # Errors
    /// [`Error::Keys`] for a file that is not a key store, a master key that does not
    /// unwrap it, a store another process holds, or I/O errors.
    pub fn open(dir: &Path, master: &SecretKey, create: bool) -> Result<FileKeyStore> {
        Self::open_as(dir, master, create, false)
    }

    /// Opens the key store to read keys only, without its lock (beside a writer that holds
    /// it): it knows the subjects the file held when opened, and refuses to add or destroy
    /// keys.
    ///
    /// # Errors
    /// As [`FileKeyStore::open`].
    pub fn open_read_only(dir: &Path, master: &SecretKey) -> Result<FileKeyStore> {
        Self::open_as(dir, master, false, true)
    }

    fn open_as(
        dir: &Path,
        master: &SecretKey,
        create: bool,
        read_only: bool,
    ) -> Result<FileKeyStore> {
        let path = dir.join(KEY_FILE);
        let keys_err = |detail: String| Error::Keys {
            path: path.clone(),
            detail,
            source: None,
        };
        if !path.exists() {
            if !create {
                return Err(keys_err("there is no key store here".into()));
            }
            std::fs::create_dir_all(dir).map_err(Error::io("create key store", dir))?;
            Self::create_file(dir, &path, master)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(Error::io("open key store", &path))?;
        if !read_only {
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(keys_err(HELD_ELSEWHERE.into()));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io("lock key store", &path)(e));
                }
            }
        }
        let len = file
            .metadata()
            .map_err(Error::io("stat key store", &path))?
            .len();
        if len < SLOT_LEN as u64 {
            return Err(keys_err(format!("{len} bytes: shorter than its header")));
        }
        let mut header = [0u8; SLOT_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(Error::io("read key store", &path))?;
        if &header[KH_MAGIC..KH_MAGIC + 8] != KEY_FILE_MAGIC {
            return Err(keys_err("not a key store (bad magic)".into()));
        }
        if le::u32_at(&header, CRC_AT) != slot_crc(&header) {
            return Err(keys_err("its header's checksum does not match".into()));
        }
        let version = le::u16_at(&header, KH_VERSION);
        if version != KEY_FILE_VERSION || le::u32_at(&header, KH_SLOT_LEN) != SLOT_LEN as u32 {
            return Err(keys_err(format!(
                "layout version {version} (this build reads {KEY_FILE_VERSION})"
            )));
        }
        let nonce: [u8; 24] = le::array_at(&header, KH_NONCE);
        let token = decrypt(
            master,
            &nonce,
            TOKEN_AAD,
            &header[KH_TOKEN_KEY..KH_RESERVED_B],
        )
        .filter(|k| k.len() == 32)
        .ok_or_else(|| keys_err("the master key does not open this key store".into()))?;
        let mut token_key = [0u8; 32];
        token_key.copy_from_slice(&token);
        // Every whole slot; a torn last slot (a crash while one was added) is ignored and
        // written over.
        let slots = (len - SLOT_LEN as u64) / SLOT_LEN as u64;
        let slots = u32::try_from(slots).map_err(|_| keys_err(format!("{slots} slots")))?;
        let mut subjects: HashMap<SubjectHash, Entry> = HashMap::new();
        let mut damaged = 0;
        let mut damaged_slots: Vec<u32> = Vec::new();
        let mut buf = vec![0u8; SLOT_LEN * 8192];
        let mut at = 0u32;
        while at < slots {
            let n = (slots - at).min(8192);
            let bytes = &mut buf[..n as usize * SLOT_LEN];
            file.read_exact_at(bytes, SLOT_LEN as u64 * (1 + u64::from(at)))
                .map_err(Error::io("read key store", &path))?;
            for (i, s) in bytes.chunks_exact(SLOT_LEN).enumerate() {
                let slot = at + i as u32;
                let state = s[KS_STATE];
                if le::u32_at(s, CRC_AT) != slot_crc(s)
                    || !(state == SLOT_LIVE || state == SLOT_DESTROYED)
                    || s[KS_RESERVED..KS_GENERATION].iter().any(|&b| b != 0)
                    || s[KS_RESERVED_B..K_CRC].iter().any(|&b| b != 0)
                {
                    // A slot torn by a crash while it was written: it was being created
                    // (its key was never handed out) or destroyed (the erasure event is
                    // durable, and it is read as destroyed).
                    damaged += 1;
                    damaged_slots.push(slot);
                    continue;
                }
                let subject = SubjectHash(le::array_at(s, KS_SUBJECT));
                let generation = le::u32_at(s, KS_GENERATION);
                let newer = subjects
                    .get(&subject)
                    .is_none_or(|e| generation >= e.generation);
                if newer {
                    subjects.insert(
                        subject,
                        Entry {
                            generation,
                            slot,
                            live: state == SLOT_LIVE,
                            key: None,
                        },
                    );
                }
            }
            at += n;
        }
        // A damaged slot may hold what a torn destruction left of a key: a writable open
        // zeroes it (what it held was never handed out, or was erased).
        if !read_only && !damaged_slots.is_empty() {
            for slot in &damaged_slots {
                file.write_all_at(&[0u8; SLOT_LEN], SLOT_LEN as u64 * (1 + u64::from(*slot)))
                    .map_err(Error::io("zero a damaged key slot", &path))?;
            }
            file.sync_data()
                .map_err(Error::io("sync key store", &path))?;
        }
        Ok(FileKeyStore {
            dir: dir.to_owned(),
            path,
            master: master.clone(),
            token_key: SecretKey(token_key),
            inner: Mutex::new(Inner {
                file,
                subjects,
                next_slot: slots,
            }),
            damaged,
            read_only,
        })
    }

    fn create_file(dir: &Path, path: &Path, master: &SecretKey) -> Result<()> {
        let token = SecretKey::random()?;
        let (nonce, wrapped) = encrypt(master, TOKEN_AAD, &token.0)?;
        let mut h = [0u8; SLOT_LEN];
        h[KH_MAGIC..KH_MAGIC + 8].copy_from_slice(KEY_FILE_MAGIC);
        le::put_u16(&mut h, KH_VERSION, KEY_FILE_VERSION);
        le::put_u32(&mut h, KH_SLOT_LEN, SLOT_LEN as u32);
        h[KH_NONCE..KH_TOKEN_KEY].copy_from_slice(&nonce);
        h[KH_TOKEN_KEY..KH_RESERVED_B].copy_from_slice(&wrapped);
        let crc = slot_crc(&h);
        le::put_u32(&mut h, CRC_AT, crc);
        // Written whole under a temporary name, then renamed: a crash leaves no store or a
        // whole one.
        // Readable by its owner only; linked into place, which fails if another process made
        // the store meanwhile (whose store is then the one used).
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = dir.join(format!("{KEY_FILE}.{}.tmp", std::process::id()));
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io("create key store", &tmp))?;
        f.write_all_at(&h, 0)
            .and_then(|()| f.sync_all())
            .map_err(Error::io("write key store", &tmp))?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("link key store", path)(e)),
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io("sync", dir))
    }

    /// Slots whose checksum did not match at open (torn by a crash while written).
    #[must_use]
    pub fn damaged_slots(&self) -> u64 {
        self.damaged
    }

    fn refuse_if_read_only(&self, what: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::Keys {
                path: self.path.clone(),
                detail: format!("opened read-only: cannot {what}"),
                source: None,
            });
        }
        Ok(())
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> Error + '_ {
        move |e| Error::Keys {
            path: self.path.clone(),
            detail: format!("{op}: {e}"),
            source: Some(e),
        }
    }

    fn slot_bytes(
        &self,
        state: u8,
        subject: &SubjectHash,
        generation: u32,
        key: Option<&SecretKey>,
    ) -> Result<[u8; SLOT_LEN]> {
        let mut s = [0u8; SLOT_LEN];
        s[KS_STATE] = state;
        le::put_u32(&mut s, KS_GENERATION, generation);
        s[KS_SUBJECT..KS_NONCE].copy_from_slice(&subject.0);
        if let Some(key) = key {
            let (nonce, wrapped) = encrypt(&self.master, &wrap_aad(subject, generation), &key.0)?;
            s[KS_NONCE..KS_WRAPPED_KEY].copy_from_slice(&nonce);
            s[KS_WRAPPED_KEY..KS_RESERVED_B].copy_from_slice(&wrapped);
        }
        let crc = slot_crc(&s);
        le::put_u32(&mut s, CRC_AT, crc);
        Ok(s)
    }

    fn unwrap_slot(&self, inner: &Inner, subject: &SubjectHash, e: &Entry) -> Result<SecretKey> {
        let mut s = [0u8; SLOT_LEN];
        inner
            .file
            .read_exact_at(&mut s, SLOT_LEN as u64 * (1 + u64::from(e.slot)))
            .map_err(self.io_err("read a key"))?;
        let nonce: [u8; 24] = le::array_at(&s, KS_NONCE);
        let damaged = || Error::Keys {
            path: self.path.clone(),
            detail: format!(
                "the key of subject {subject} (generation {}) does not unwrap: the slot was changed",
                e.generation
            ),
            source: None,
        };
        if le::u32_at(&s, CRC_AT) != slot_crc(&s)
            || s[KS_STATE] != SLOT_LIVE
            || s[KS_SUBJECT..KS_NONCE] != subject.0
            || le::u32_at(&s, KS_GENERATION) != e.generation
        {
            return Err(damaged());
        }
        let key = decrypt(
            &self.master,
            &nonce,
            &wrap_aad(subject, e.generation),
            &s[KS_WRAPPED_KEY..KS_RESERVED_B],
        )
        .filter(|k| k.len() == 32)
        .ok_or_else(damaged)?;
        let mut k = [0u8; 32];
        k.copy_from_slice(&key);
        Ok(SecretKey(k))
    }
}

impl KeyStore for FileKeyStore {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn keys_at_least(&self, subjects: &[(SubjectHash, u32)]) -> Result<Vec<(u32, SecretKey)>> {
        let mut inner = self.inner.lock();
        let mut out = Vec::with_capacity(subjects.len());
        let mut new_slots: Vec<u8> = Vec::new();
        let mut created: HashMap<SubjectHash, (u32, SecretKey)> = HashMap::new();
        // Live keys older than asked for: destroyed, in place, before the new ones count.
        let mut stale: Vec<(u32, [u8; SLOT_LEN])> = Vec::new();
        let first_new = inner.next_slot;
        for &(ref subject, at_least) in subjects {
            if let Some((g, k)) = created.get(subject) {
                out.push((*g, k.clone()));
                continue;
            }
            let live = match inner.subjects.get(subject) {
                Some(e) if e.live && e.generation >= at_least => {
                    Some((e.generation, e.key.clone()))
                }
                Some(e) if e.live => {
                    stale.push((
                        e.slot,
                        self.slot_bytes(SLOT_DESTROYED, subject, e.generation, None)?,
                    ));
                    None
                }
                _ => None,
            };
            if let Some((generation, key)) = live {
                let key = match key {
                    Some(k) => k,
                    None => {
                        let e = &inner.subjects[subject];
                        let k = self.unwrap_slot(&inner, subject, e)?;
                        if let Some(e) = inner.subjects.get_mut(subject) {
                            e.key = Some(k.clone());
                        }
                        k
                    }
                };
                out.push((generation, key));
                continue;
            }
            let generation = inner
                .subjects
                .get(subject)
                .map_or(1, |e| e.generation.saturating_add(1))
                .max(at_least);
            let key = SecretKey::random()?;
            new_slots.extend_from_slice(&self.slot_bytes(
                SLOT_LIVE,
                subject,
                generation,
                Some(&key),
            )?);
            created.insert(*subject, (generation, key.clone()));
            out.push((generation, key));
        }
        if !created.is_empty() {
            self.refuse_if_read_only("add keys")?;
            for (slot, bytes) in &stale {
                inner
                    .file
                    .write_all_at(bytes, SLOT_LEN as u64 * (1 + u64::from(*slot)))
                    .map_err(self.io_err("destroy a key"))?;
            }
            // Every new key is durable before any is handed out.
            inner
                .file
                .write_all_at(&new_slots, SLOT_LEN as u64 * (1 + u64::from(first_new)))
                .and_then(|()| inner.file.sync_data())
                .map_err(self.io_err("add keys"))?;
            let mut slot = first_new;
            for chunk in new_slots.chunks_exact(SLOT_LEN) {
                let subject = SubjectHash(le::array_at(chunk, KS_SUBJECT));
                let (generation, key) = created[&subject].clone();
                inner.subjects.insert(
                    subject,
                    Entry {
                        generation,
                        slot,
                        live: true,
                        key: Some(key),
                    },
                );
                slot += 1;
            }
            inner.next_slot = slot;
        }
        Ok(out)
    }

    fn key(&self, subject: &SubjectHash, generation: u32) -> Result<KeyLookup> {
        let mut inner = self.inner.lock();
        let Some(e) = inner.subjects.get(subject) else {
            return Ok(KeyLookup::Unknown);
        };
        if generation > e.generation {
            return Ok(KeyLookup::Unknown);
        }
        if generation < e.generation || !e.live {
            return Ok(KeyLookup::Destroyed);
        }
        if let Some(k) = &e.key {
            return Ok(KeyLookup::Live(k.clone()));
        }
        // A read-only store reads the slot each time and keeps no key: its writer (tallyd)
        // may destroy it at any moment.
        if self.read_only {
            let mut s = [0u8; SLOT_LEN];
            inner
                .file
                .read_exact_at(&mut s, SLOT_LEN as u64 * (1 + u64::from(e.slot)))
                .map_err(self.io_err("read a key"))?;
            if s[KS_STATE] == SLOT_DESTROYED && le::u32_at(&s, K_CRC) == slot_crc(&s) {
                return Ok(KeyLookup::Destroyed);
            }
            return self.unwrap_slot(&inner, subject, e).map(KeyLookup::Live);
        }
        let k = self.unwrap_slot(&inner, subject, e)?;
        if let Some(e) = inner.subjects.get_mut(subject) {
            e.key = Some(k.clone());
        }
        Ok(KeyLookup::Live(k))
    }

    fn generation(&self, subject: &SubjectHash) -> Result<Option<(u32, bool)>> {
        Ok(self
            .inner
            .lock()
            .subjects
            .get(subject)
            .map(|e| (e.generation, e.live)))
    }

    fn destroy(&self, subject: &SubjectHash) -> Result<bool> {
        let mut inner = self.inner.lock();
        let Some((slot, generation)) = inner
            .subjects
            .get(subject)
            .filter(|e| e.live)
            .map(|e| (e.slot, e.generation))
        else {
            return Ok(false);
        };
        self.refuse_if_read_only("destroy a key")?;
        let s = self.slot_bytes(SLOT_DESTROYED, subject, generation, None)?;
        inner
            .file
            .write_all_at(&s, SLOT_LEN as u64 * (1 + u64::from(slot)))
            .and_then(|()| inner.file.sync_data())
            .map_err(self.io_err("destroy a key"))?;
        if let Some(e) = inner.subjects.get_mut(subject) {
            e.live = false;
            e.key = None;
        }
        Ok(true)
    }

    fn token_key(&self) -> &SecretKey {
        &self.token_key
    }

    fn subjects(&self) -> usize {
        self.inner.lock().subjects.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::sealed::subject_hash;

    fn store(dir: &Path) -> FileKeyStore {
        FileKeyStore::open(dir, &SecretKey([5; 32]), true).unwrap()
    }

    #[test]
    fn keys_are_created_once_survive_reopen_and_are_destroyed() {
        let d = tempfile::tempdir().unwrap();
        let a = subject_hash("a");
        let b = subject_hash("b");
        let (ka, kb) = {
            let s = store(d.path());
            let got = s.keys_for_append(&[a, b, a]).unwrap();
            assert_eq!(got[0], got[2]);
            assert_eq!(got[0].0, 1);
            assert_ne!(got[0].1, got[1].1);
            (got[0].1.clone(), got[1].1.clone())
        };
        let s = store(d.path());
        assert_eq!(s.key(&a, 1).unwrap(), KeyLookup::Live(ka));
        assert_eq!(s.key(&b, 1).unwrap(), KeyLookup::Live(kb.clone()));
        assert_eq!(s.key(&a, 2).unwrap(), KeyLookup::Unknown);
        assert!(s.destroy(&a).unwrap());
        assert!(!s.destroy(&a).unwrap());
        drop(s);
        let s = store(d.path());
        assert_eq!(s.key(&a, 1).unwrap(), KeyLookup::Destroyed);
        assert_eq!(s.key(&b, 1).unwrap(), KeyLookup::Live(kb));
        // Seen again: a new generation, a new key.
        let again = s.keys_for_append(&[a]).unwrap();
        assert_eq!(again[0].0, 2);
        assert_eq!(s.key(&a, 1).unwrap(), KeyLookup::Destroyed);
        // The destroyed slot holds no byte of the key.
        let bytes = std::fs::read(d.path().join(KEY_FILE)).unwrap();
        let slot = &bytes[SLOT_LEN..2 * SLOT_LEN];
        assert_eq!(slot[0], SLOT_DESTROYED);
        assert!(slot[40..112].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_wrong_master_key_or_a_changed_slot_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let a = subject_hash("a");
        store(d.path()).keys_for_append(&[a]).unwrap();
        let err = FileKeyStore::open(d.path(), &SecretKey([6; 32]), false).unwrap_err();
        assert!(err.to_string().contains("master key"), "{err}");
        // A wrapped key changed (and its CRC fixed up) does not unwrap.
        let path = d.path().join(KEY_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SLOT_LEN + 70] ^= 1;
        let crc = slot_crc(&bytes[SLOT_LEN..2 * SLOT_LEN]);
        le::put_u32(&mut bytes, SLOT_LEN + CRC_AT, crc);
        std::fs::write(&path, &bytes).unwrap();
        let s = store(d.path());
        assert!(matches!(s.key(&a, 1), Err(Error::Keys { .. })));
        drop(s);
        // A torn slot is skipped and counted.
        bytes[SLOT_LEN + 3] ^= 1;
        bytes.extend_from_slice(&[1; 50]);
        std::fs::write(&path, &bytes).unwrap();
        let s = store(d.path());
        assert_eq!(s.damaged_slots(), 1);
        assert_eq!(s.key(&a, 1).unwrap(), KeyLookup::Unknown);
        assert_eq!(s.keys_for_append(&[a]).unwrap()[0].0, 1);
    }

    #[test]
    fn one_writer_at_a_time_and_read_only_opens_refuse_writes() {
        let d = tempfile::tempdir().unwrap();
        let a = subject_hash("a");
        let w = store(d.path());
        w.keys_for_append(&[a]).unwrap();
        let err = FileKeyStore::open(d.path(), &SecretKey([5; 32]), false).unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
        let r = FileKeyStore::open_read_only(d.path(), &SecretKey([5; 32])).unwrap();
        assert!(matches!(r.key(&a, 1).unwrap(), KeyLookup::Live(_)));
        assert!(r.destroy(&a).is_err());
        assert!(r.keys_for_append(&[subject_hash("b")]).is_err());
        drop(w);
        assert!(FileKeyStore::open(d.path(), &SecretKey([5; 32]), false).is_ok());
    }

    #[test]
    fn a_store_that_missed_a_destruction_never_hands_out_an_erased_generation() {
        let d = tempfile::tempdir().unwrap();
        let a = subject_hash("a");
        let w = store(d.path());
        assert_eq!(w.keys_for_append(&[a]).unwrap()[0].0, 1);
        // The log says generation 1 was erased; the store still holds it live.
        let got = w.keys_at_least(&[(a, 2)]).unwrap();
        assert_eq!(got[0].0, 2);
        assert_eq!(w.key(&a, 1).unwrap(), KeyLookup::Destroyed);
        drop(w);
        let bytes = std::fs::read(d.path().join(KEY_FILE)).unwrap();
        assert_eq!(
            bytes[SLOT_LEN + KS_STATE],
            SLOT_DESTROYED,
            "the old slot is destroyed on disk"
        );
        assert!(
            bytes[SLOT_LEN + KS_NONCE..SLOT_LEN + KS_RESERVED_B]
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn a_writable_open_zeroes_damaged_slots_and_a_reader_sees_destructions() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (subject_hash("a"), subject_hash("b"));
        store(d.path()).keys_for_append(&[a, b]).unwrap();
        // A destruction torn halfway: the state says destroyed, the key bytes are still there.
        let path = d.path().join(KEY_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SLOT_LEN + KS_STATE] = SLOT_DESTROYED;
        std::fs::write(&path, &bytes).unwrap();
        let w = store(d.path());
        assert_eq!(w.damaged_slots(), 1);
        let after = std::fs::read(&path).unwrap();
        assert!(after[SLOT_LEN..2 * SLOT_LEN].iter().all(|&x| x == 0));
        // A reader beside the writer sees the writer's destruction at once.
        let r = FileKeyStore::open_read_only(d.path(), &SecretKey([5; 32])).unwrap();
        assert!(matches!(r.key(&b, 1).unwrap(), KeyLookup::Live(_)));
        assert!(w.destroy(&b).unwrap());
        assert_eq!(r.key(&b, 1).unwrap(), KeyLookup::Destroyed);
    }

    #[test]
    fn hostile_key_store_files_are_errors_or_damaged_slots_never_panics() {
        let d = tempfile::tempdir().unwrap();
        let a = subject_hash("a");
        store(d.path()).keys_for_append(&[a]).unwrap();
        let path = d.path().join(KEY_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..300 {
            let mut bytes = good.clone();
            // Flip a few bytes anywhere, and sometimes cut or extend the file.
            for _ in 0..1 + round % 4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % bytes.len();
                bytes[at] ^= (x >> 32) as u8 | 1;
            }
            match round % 5 {
                0 => bytes.truncate((x as usize) % bytes.len()),
                1 => bytes.extend_from_slice(&[0xFF; 77]),
                _ => {}
            }
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(s) = FileKeyStore::open(d.path(), &SecretKey([5; 32]), false) {
                // Whatever it holds, a lookup answers or fails; it never panics.
                let _ = s.key(&a, 1);
                let _ = s.keys_for_append(&[a]);
            }
        }
    }

    #[test]
    fn nonces_never_repeat_in_a_process() {
        let mut seen = std::collections::HashSet::new();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..10_000).map(|_| nonce().unwrap()).collect::<Vec<_>>())
            })
            .collect();
        for t in threads {
            for n in t.join().unwrap() {
                assert!(seen.insert(n));
            }
        }
    }

    #[test]
    fn tokens_are_stable_and_keyed() {
        let k = SecretKey([1; 32]);
        assert_eq!(token(&k, b"\"x\""), token(&k, b"\"x\""));
        assert_ne!(token(&k, b"\"x\""), token(&k, b"\"y\""));
        assert_ne!(token(&k, b"\"x\""), token(&SecretKey([2; 32]), b"\"x\""));
        assert_eq!(token(&k, b"x").len(), 36);
    }

    #[test]
    fn master_key_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("master.key");
        let k = SecretKey::create_file(&p).unwrap();
        assert_eq!(SecretKey::from_file(&p).unwrap(), k);
        assert!(SecretKey::create_file(&p).is_err());
        std::fs::write(&p, "nothex").unwrap();
        assert!(SecretKey::from_file(&p).is_err());
        assert_eq!(format!("{k:?}"), "SecretKey(..)");
    }
}
