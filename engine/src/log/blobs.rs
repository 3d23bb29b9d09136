//! Blobs: payloads stored in the cold tier's store by content hash (docs/FORMAT.md, 6.5).
//!
//! An append offloads each payload above the blob threshold before it takes any lock of the
//! write path (the producer policy's included): the
//! blob is written under `<log id>/blobs/<BLAKE3 hex>`, its length checked in the store, and
//! only then is the event (holding the reference) appended. A crash between the two leaves
//! an unreferenced blob, which nothing trusts; the append was not acknowledged. A blob is
//! never written twice: the same bytes have the same key.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use super::append::Blocking;
use super::shared::Shared;
use super::{AppendRequest, EventData};
use crate::cold::{ColdStore, with_retries};
use crate::error::{Error, Result};
use crate::format::blob::{BLOB_BYTES_MAX, BlobRef};
use crate::format::files::blob_object_key;

/// The error for a blob that cannot be written, found or read back as referenced.
pub(crate) fn blob_error(
    blob: &BlobRef,
    object: String,
    detail: impl Into<String>,
    source: Option<io::Error>,
) -> Error {
    Error::Blob {
        hash: blob.hex(),
        object,
        detail: detail.into(),
        source,
    }
}

fn store_of<'s>(shared: &'s Shared, blob: &BlobRef) -> Result<&'s Arc<dyn ColdStore>> {
    shared.cold.blob_store().map_err(|why| {
        blob_error(
            blob,
            format!(
                "(no store)/{}",
                blob_object_key(&shared.meta.log_id, &blob.hash)
            ),
            format!("blobs live in the cold tier's store, and {why}"),
            None,
        )
    })
}

fn retries<T>(shared: &Shared, op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    with_retries(
        shared.opts.cold.attempts,
        shared.opts.cold.first_retry_wait,
        op,
    )
}

/// A blob's bytes as the caller holds them: borrowed (a store that needs its own copy for a
/// request makes one), or shared (it takes a reference).
#[derive(Clone, Copy)]
pub(crate) enum Bytes<'a> {
    Borrowed(&'a [u8]),
    Shared(&'a Arc<Vec<u8>>),
}

impl Bytes<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Borrowed(b) => b,
            Bytes::Shared(b) => b.as_slice(),
        }
    }
}

/// Writes `bytes` as a blob (once: a blob already stored with the right length is kept)
/// and records the store as the log's.
pub(crate) fn put(shared: &Shared, bytes: Bytes<'_>) -> Result<BlobRef> {
    accepts(shared)?;
    let blob =
        BlobRef::of(bytes.as_slice()).map_err(|source| Error::InvalidEvent { index: 0, source })?;
    let store = store_of(shared, &blob)?;
    let key = blob_object_key(&shared.meta.log_id, &blob.hash);
    let object = || format!("{}/{key}", store.url());
    super::cold::record_store(shared, store.as_ref())?;
    let found = retries(shared, || store.head(&key))
        .map_err(|e| blob_error(&blob, object(), "looking for it in the store", Some(e)))?;
    if found != Some(blob.size) {
        // Absent, or an object of another length under a content address: write the bytes
        // that the address names.
        retries(shared, || match bytes {
            Bytes::Borrowed(b) => store.put(&key, b),
            Bytes::Shared(b) => store.put_shared(&key, b),
        })
        .map_err(|e| blob_error(&blob, object(), "writing it", Some(e)))?;
        let stored = retries(shared, || store.head(&key))
            .map_err(|e| blob_error(&blob, object(), "checking it after writing", Some(e)))?;
        if stored != Some(blob.size) {
            return Err(blob_error(
                &blob,
                object(),
                format!(
                    "the store holds {} after writing {} bytes",
                    stored.map_or_else(|| "nothing".to_owned(), |n| format!("{n} bytes")),
                    blob.size
                ),
                None,
            ));
        }
    }
    Ok(blob)
}

/// Whether the log can store blobs: writable, format version 3, with a store.
pub(crate) fn accepts(shared: &Shared) -> Result<()> {
    if shared.read_only {
        return Err(Error::ReadOnly);
    }
    if !shared.meta.layout.allows_blobs() {
        return Err(Error::InvalidAppend {
            reason: format!(
                "a log of format version {} cannot refer to blobs (version 3 can)",
                shared.meta.layout.version()
            ),
        });
    }
    shared
        .cold
        .blob_store()
        .map(|_| ())
        .map_err(|why| Error::Blob {
            hash: String::new(),
            object: "(no store)".into(),
            detail: format!("blobs live in the cold tier's store, and {why}"),
            source: None,
        })
}

/// Checks that the store holds `blob` with its length (an append's own reference).
fn check_present(shared: &Shared, blob: &BlobRef) -> Result<()> {
    let store = store_of(shared, blob)?;
    let key = blob_object_key(&shared.meta.log_id, &blob.hash);
    match retries(shared, || store.head(&key)) {
        Ok(Some(n)) if n == blob.size => Ok(()),
        Ok(found) => Err(blob_error(
            blob,
            format!("{}/{key}", store.url()),
            format!(
                "an event refers to it and the store holds {}",
                found.map_or_else(|| "nothing".to_owned(), |n| format!("{n} bytes"))
            ),
            None,
        )),
        Err(e) => Err(blob_error(
            blob,
            format!("{}/{key}", store.url()),
            "looking for it in the store",
            Some(e),
        )),
    }
}

/// Reads `blob` whole and checks it against its hash.
pub(crate) fn read(shared: &Shared, blob: &BlobRef) -> Result<Vec<u8>> {
    let store = store_of(shared, blob)?;
    let key = blob_object_key(&shared.meta.log_id, &blob.hash);
    let object = || format!("{}/{key}", store.url());
    // Exactly the length the reference names: an object that is longer, shorter or
    // changed fails the check below, and the store never sizes what is read.
    let stored = retries(shared, || store.head(&key))
        .map_err(|e| blob_error(blob, object(), "looking for it in the store", Some(e)))?;
    if stored != Some(blob.size) {
        return Err(blob_error(
            blob,
            object(),
            format!(
                "the store holds {} for a reference of {} bytes",
                stored.map_or_else(|| "nothing".to_owned(), |n| format!("{n} bytes")),
                blob.size
            ),
            stored
                .is_none()
                .then(|| io::Error::from(io::ErrorKind::NotFound)),
        ));
    }
    let bytes = retries(shared, || store.get_range(&key, 0..blob.size))
        .map_err(|e| blob_error(blob, object(), "reading it", Some(e)))?;
    if !blob.matches(&bytes) {
        return Err(blob_error(
            blob,
            object(),
            format!(
                "the store's {} bytes do not match the reference ({} bytes, BLAKE3 {})",
                bytes.len(),
                blob.size,
                blob.hex()
            ),
            None,
        ));
    }
    Ok(bytes)
}

/// Reads `range` of `blob` as stored (unchecked: the caller checks the whole against the
/// hash), for a client that reads a blob in pieces.
pub(crate) fn read_range(shared: &Shared, blob: &BlobRef, range: Range<u64>) -> Result<Vec<u8>> {
    if range.start > range.end || range.end > blob.size {
        return Err(Error::InvalidOptions {
            reason: format!(
                "bytes {}..{} of a blob of {} bytes",
                range.start, range.end, blob.size
            ),
        });
    }
    let store = store_of(shared, blob)?;
    let key = blob_object_key(&shared.meta.log_id, &blob.hash);
    retries(shared, || store.get_range(&key, range.clone())).map_err(|e| {
        blob_error(
            blob,
            format!("{}/{key}", store.url()),
            format!("reading bytes {}..{}", range.start, range.end),
            Some(e),
        )
    })
}

/// The length of `blob`'s object in the store, `None` when it has none.
pub(crate) fn stored_len(shared: &Shared, blob: &BlobRef) -> Result<Option<u64>> {
    let store = store_of(shared, blob)?;
    let key = blob_object_key(&shared.meta.log_id, &blob.hash);
    retries(shared, || store.head(&key)).map_err(|e| {
        blob_error(
            blob,
            format!("{}/{key}", store.url()),
            "looking for it in the store",
            Some(e),
        )
    })
}

/// Whether `ev`, an event of `stream`, is stored as a blob by the append: its payload is
/// above the threshold and the log can store blobs (format version 3 and a store). Never in a
/// system stream (`$...`: snapshots, projection checkpoints, policies and schemas), whose
/// readers take the payload itself, nor in a batch a producer signed.
fn offloads(shared: &Shared, stream: &str, ev: &EventData, signed: bool) -> bool {
    !signed
        && !stream.starts_with('$')
        && ev.blob.is_none()
        && ev.personal.is_none()
        && ev.payload.len() > shared.opts.cold.blob_threshold
        && shared.meta.layout.allows_blobs()
        && shared.cold.blob_store().is_ok()
}

/// Stores the payloads of `requests` that go to blobs and checks the references they give:
/// the blob of each event, by its index in the batch (empty when there is none, the common
/// case, which costs one length comparison per event). A producer signs the envelopes it
/// sends, so a signed batch's payloads are never moved (it may give references).
pub(crate) fn offload(
    shared: &Shared,
    requests: &[AppendRequest<'_>],
    signed: bool,
    may_block: Blocking,
) -> Result<Vec<Option<BlobRef>>> {
    let events = || {
        requests
            .iter()
            .flat_map(|r| r.events.iter().map(move |e| (r.stream, e)))
    };
    if !events().any(|(stream, ev)| ev.blob.is_some() || offloads(shared, stream, ev, signed)) {
        return Ok(Vec::new());
    }
    if may_block == Blocking::Refused {
        // The store is I/O: an async runtime's worker hands the append to a thread that
        // may block.
        return Err(Error::WouldBlock);
    }
    let mut out = Vec::new();
    for (index, (stream, ev)) in events().enumerate() {
        if let Some(blob) = &ev.blob {
            if !shared.meta.layout.allows_blobs() {
                return Err(Error::InvalidAppend {
                    reason: format!(
                        "event {index} refers to a blob, and a log of format version {} cannot",
                        shared.meta.layout.version()
                    ),
                });
            }
            check_present(shared, blob)?;
            out.push(None);
        } else if offloads(shared, stream, ev, signed) {
            if ev.payload.len() as u64 > BLOB_BYTES_MAX {
                return Err(Error::InvalidEvent {
                    index,
                    source: crate::format::DecodeError::TooLong {
                        what: "payload",
                        len: ev.payload.len() as u64,
                        max: BLOB_BYTES_MAX,
                    },
                });
            }
            match put(shared, Bytes::Borrowed(&ev.payload)) {
                Ok(b) => out.push(Some(b)),
                Err(Error::InvalidEvent { source, .. }) => {
                    return Err(Error::InvalidEvent { index, source });
                }
                Err(e) => return Err(e),
            }
        } else {
            out.push(None);
        }
    }
    Ok(out)
}
