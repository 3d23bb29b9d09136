//! The cold tier's stores through Apache Arrow's `object_store` crate: its local file
//! system for `file:///path`, and its S3 client for `s3://bucket/prefix` (any S3-compatible
//! store; credentials, region and endpoint from the environment as the AWS conventions
//! have them: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL`, and `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint on
//! loopback).
//!
//! The engine is synchronous and reaches a store through its own trait
//! ([`tally_engine::cold::ColdStore`]); this adapter runs each request on a small runtime
//! of its own and waits for it, so it can be called from any thread, including a thread of
//! another runtime (tallyd's), without blocking that runtime's scheduler on a nested
//! `block_on`.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tally_engine::cold::ColdStore;

/// A [`ColdStore`] over an `object_store` backend.
pub struct ObjectStoreCold {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ObjectStoreCold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreCold")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectStoreCold {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's async context panics; this one has no
        // work left that anybody waits for.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn to_io(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        other => io::Error::other(other),
    }
}

/// Opens the store a URL names: `file:///path` (created when missing) or
/// `s3://bucket[/prefix]`.
///
/// # Errors
/// `InvalidInput` for a malformed URL or another scheme; what the backend reports when it
/// cannot be configured.
pub fn open_store(url: &str) -> io::Result<Arc<dyn ColdStore>> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("{url}: {why}"));
    let (inner, prefix): (Arc<dyn ObjectStore>, String) =
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "a file:// store needs an absolute path (file:///path)".into()
                ));
            }
            std::fs::create_dir_all(path)?;
            // fsync of every object and its directories before a put returns: compaction
            // removes the local segment once the put and the read-back succeed, so the
            // object must be as durable as S3 makes its own.
            let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                .map_err(to_io)?
                .with_fsync(true)
                .with_automatic_cleanup(true);
            (Arc::new(fs), String::new())
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket (s3://bucket/prefix)".into()));
            }
            // TLS for https endpoints: rustls with ring (DEPENDENCIES.md), installed once.
            // rustls 0.23.48 deprecates ring's provider for lacking post-quantum key
            // exchange; aws-lc-rs has it but needs a C build of its own. S3 traffic is
            // object bytes that the manifest's hashes check anyway.
            #[allow(deprecated)]
            let _ = rustls::crypto::ring::default_provider().install_default();
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(to_io)?;
            (Arc::new(s3), prefix.trim_matches('/').to_owned())
        } else {
            return Err(bad(
                "the cold store must be file:///path or s3://bucket/prefix".into(),
            ));
        };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tally-cold-store")
        .enable_all()
        .build()?;
    Ok(Arc::new(ObjectStoreCold {
        inner,
        prefix,
        url: url.trim_end_matches('/').to_owned(),
        runtime: Some(runtime),
    }))
}

impl ObjectStoreCold {
    fn path(&self, key: &str) -> io::Result<ObjectPath> {
        let full = if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjectPath::parse(&full).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    /// Runs `fut` on the adapter's runtime and waits for it.
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = io::Result<T>> + Send + 'static,
    ) -> io::Result<T> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| io::Error::other("the store's runtime is shut down"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| io::Error::other("the store's request was dropped"))?
    }
}

/// Bytes shared with a request body (`put_shared`).
struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl ColdStore for ObjectStoreCold {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let (store, path) = (Arc::clone(&self.inner), self.path(key)?);
        let payload = PutPayload::from(bytes.to_vec());
        self.block(async move { store.put(&path, payload).await.map(|_| ()).map_err(to_io) })
    }

    fn put_shared(&self, key: &str, bytes: &Arc<Vec<u8>>) -> io::Result<()> {
        let (store, path) = (Arc::clone(&self.inner), self.path(key)?);
        let payload = PutPayload::from(bytes::Bytes::from_owner(SharedBytes(Arc::clone(bytes))));
        self.block(async move { store.put(&path, payload).await.map(|_| ()).map_err(to_io) })
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        let (store, path) = (Arc::clone(&self.inner), self.path(key)?);
        self.block(async move {
            let r = store.get(&path).await.map_err(to_io)?;
            // Without a copy when the body arrived in one piece.
            Ok(Vec::from(r.bytes().await.map_err(to_io)?))
        })
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> io::Result<Vec<u8>> {
        let (store, path) = (Arc::clone(&self.inner), self.path(key)?);
        let want = range.end.saturating_sub(range.start);
        self.block(async move {
            let b = store.get_range(&path, range).await.map_err(to_io)?;
            if b.len() as u64 != want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("asked for {want} bytes, the store returned {}", b.len()),
                ));
            }
            Ok(b.to_vec())
        })
    }

    fn head(&self, key: &str) -> io::Result<Option<u64>> {
        let (store, path) = (Arc::clone(&self.inner), self.path(key)?);
        self.block(async move {
            match store.head(&path).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(to_io(e)),
            }
        })
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let (store, path) = (Arc::clone(&self.inner), self.path(key)?);
        self.block(async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(to_io(e)),
            }
        })
    }
}

/// The store a data directory's `cold.store` names, opened through this adapter, or `None`
/// when the log has no cold tier.
///
/// # Errors
/// When the file cannot be read or the store cannot be opened.
pub fn store_of_dir(dir: &std::path::Path) -> io::Result<Option<Arc<dyn ColdStore>>> {
    let path = dir.join(tally_engine::format::files::COLD_STORE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(url) => open_store(url.trim()).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_file_system_store_keeps_objects_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let url = format!("file://{}", dir.path().display());
        let store = open_store(&url).unwrap_or_else(|e| panic!("{e}"));
        store
            .put("ab/1.cold", b"hello world")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.get("ab/1.cold").ok(), Some(b"hello world".to_vec()));
        assert_eq!(
            store.get_range("ab/1.cold", 6..11).ok(),
            Some(b"world".to_vec())
        );
        assert_eq!(store.head("ab/1.cold").ok(), Some(Some(11)));
        // Shared bytes (a blob upload) are stored the same, without a copy of their own.
        let shared = Arc::new(b"a large blob".to_vec());
        store
            .put_shared("ab/blobs/x", &shared)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.get("ab/blobs/x").ok(), Some(shared.to_vec()));
        assert_eq!(
            Arc::strong_count(&shared),
            1,
            "the request let go of the bytes"
        );
        assert_eq!(store.head("ab/2.cold").ok(), Some(None));
        assert_eq!(
            store.get("ab/2.cold").map_err(|e| e.kind()),
            Err(io::ErrorKind::NotFound)
        );
        store.delete("ab/1.cold").unwrap_or_else(|e| panic!("{e}"));
        store.delete("ab/1.cold").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.head("ab/1.cold").ok(), Some(None));
        assert!(open_store("ftp://x").is_err());
        assert!(open_store("file://relative").is_err());
        assert!(open_store("s3:///no-bucket").is_err());
    }

    #[test]
    fn the_adapter_can_be_called_from_inside_another_runtime() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open_store(&format!("file://{}", dir.path().display()))
            .unwrap_or_else(|e| panic!("{e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            store.put("k.cold", b"x").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(store.get("k.cold").ok(), Some(b"x".to_vec()));
        });
        drop(rt);
        drop(store);
    }
}
