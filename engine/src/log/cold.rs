//! The cold tier: moving sealed segments to an object store (compaction), the manifest
//! that says which are there, and bringing one back into a bounded local cache when a read
//! needs it (docs/FORMAT.md, "Cold segment file" and "Cold manifest"; ADR 0009).
//!
//! Compaction of one segment, in this order (a crash or a store failure at any step loses
//! nothing: the local file is the segment until the last step):
//! 1. read the sealed segment's records from its map, checking every checksum, the chain
//!    from the header's previous hash to the footer's last hash, and the footer's Merkle
//!    root;
//! 2. encode the cold object and put it (retried with backoff);
//! 3. get it back and check it: its bytes, its structure, and every block decompressed
//!    against the local records;
//! 4. append a manifest entry with the object's length and hash, and sync it;
//! 5. mark the segment cold and move its file into the cache (where the cache's budget
//!    evicts it like any other), then sync the directory.
//!
//! An object put without a manifest entry is never read (its key is overwritten by the next
//! attempt); a manifest entry whose local file is still there (a crash between 4 and 5)
//! leaves the local file in use until the next compaction finishes the move. Sidecars, the
//! Merkle node file and the checkpoints stay local: proofs never need the store.
//!
//! A read of a cold segment fetches the whole object, checks its length and hash against
//! the manifest and its structure, writes the segment back into `cold-cache/` exactly as it
//! was sealed (the zero bytes between the records and the footer page are a hole), and maps
//! that file; every read path then works as on a local segment. The cache holds at most
//! `cache_bytes` of segments (at least the one being read); the least recently fetched is
//! evicted first. A writable open empties the cache; a read-only view uses a private
//! directory of its own and removes it at close.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::shared::{SegState, SegmentHandle, Shared, Worker, lock};
use super::{Error, Result, now};
use crate::cold::{ColdStore, with_retries};
use crate::format::chain::merkle_root;
use crate::format::cold::{
    BlockEntry, COLD_HEADER_LEN, COLD_TRAILER_LEN, ColdEncodeOptions, MANIFEST_ENTRY_LEN,
    MANIFEST_HEADER_LEN, ManifestEntry, decode_cold, decode_header, decode_index,
    decode_manifest_entry, decode_manifest_header, decode_trailer, decompress_block, encode_cold,
    encode_manifest_entry, encode_manifest_header,
};
use crate::format::files::{COLD_CACHE_DIR, COLD_MANIFEST_FILE, COLD_STORE_FILE, cold_object_key};
use crate::format::segment::SegmentFooter;
use crate::format::{PAGE_BYTES, Position, SEGMENT_DATA_START, SegmentSeq};
use crate::segment::MapSlot;
use crate::sys::{OpenMode, SegmentMap};

/// Which segments go cold when the policy runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactPolicy {
    /// The newest sealed segments kept local whatever else the policy says.
    pub keep_local_segments: usize,
    /// Segments whose last record is older than this go cold. `None` (with no budget):
    /// every sealed segment beyond `keep_local_segments`.
    pub older_than: Option<Duration>,
    /// The oldest sealed segments go cold until the local ones take at most this many
    /// bytes (segment files only).
    pub local_budget_bytes: Option<u64>,
}

impl Default for CompactPolicy {
    fn default() -> CompactPolicy {
        CompactPolicy {
            keep_local_segments: 4,
            older_than: None,
            local_budget_bytes: None,
        }
    }
}

/// The cold tier's settings in [`super::Options`].
#[derive(Clone, Debug)]
pub struct ColdOptions {
    /// The object store. `None`: the store named in the data directory's `cold.store` file,
    /// when it is a `file://` store (the engine reaches no other by itself).
    pub store: Option<Arc<dyn ColdStore>>,
    /// What [`super::Log::compact`] moves when given no policy, and what the background
    /// compaction applies.
    pub policy: CompactPolicy,
    /// Run the policy in a background thread at this interval (at low priority). `None`:
    /// only [`super::Log::compact`] moves segments.
    pub background: Option<Duration>,
    /// The most bytes of cold segments kept in the local cache (at least the one being
    /// read is always kept).
    pub cache_bytes: u64,
    /// The most bytes of decompressed blocks kept for point reads of cold segments that
    /// are not in the segment cache (an event read fetches only the block holding it).
    pub block_cache_bytes: u64,
    /// Block size and zstd level of the cold objects written.
    pub encode: ColdEncodeOptions,
    /// How many times a store operation is tried before compaction gives up on a segment,
    /// and the first wait between tries (four times longer each time).
    pub attempts: u32,
    /// See `attempts`.
    pub first_retry_wait: Duration,
    /// Payloads longer than this are stored as blobs in the store, and the event refers to
    /// them by hash (format version 3 logs with a store; docs/FORMAT.md, 6.5).
    pub blob_threshold: usize,
}

impl Default for ColdOptions {
    fn default() -> ColdOptions {
        ColdOptions {
            store: None,
            policy: CompactPolicy::default(),
            background: None,
            cache_bytes: 1 << 30,
            block_cache_bytes: 256 << 20,
            encode: ColdEncodeOptions::default(),
            attempts: 4,
            first_retry_wait: Duration::from_millis(200),
            blob_threshold: crate::format::blob::BLOB_THRESHOLD_DEFAULT,
        }
    }
}

/// One segment moved by a compaction (or that a dry run would move).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovedSegment {
    /// The segment.
    pub seq: SegmentSeq,
    /// Its first and last positions.
    pub positions: (Position, Position),
    /// Bytes of records in it.
    pub record_bytes: u64,
    /// Bytes of its cold object (0 in a dry run).
    pub object_bytes: u64,
    /// The object's key in the store.
    pub key: String,
}

/// What [`super::Log::compact`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// The store's URL.
    pub store: String,
    /// Nothing was moved: `moved` lists what would be.
    pub dry_run: bool,
    /// Segments moved, oldest first.
    pub moved: Vec<MovedSegment>,
    /// Segments a crash had left half moved (their manifest entry written, their local file
    /// not yet removed), finished by this run.
    pub finished: Vec<SegmentSeq>,
    /// The retention run made first (when the log has a retention policy): events it
    /// removed.
    pub retention_removed: u64,
    /// Where that run recorded itself, when it removed anything.
    pub retention_recorded_at: Option<Position>,
}

/// Where a cold segment is, as a handle knows it.
#[derive(Debug, Clone)]
pub(crate) struct ColdPlace {
    pub(crate) entry: ManifestEntry,
    pub(crate) key: String,
    pub(crate) tier: Arc<ColdTier>,
}

/// The manifest as read or last appended.
#[derive(Debug, Default)]
struct Manifest {
    entries: BTreeMap<SegmentSeq, ManifestEntry>,
    /// Bytes of whole entries (and the header) in the file.
    len: u64,
}

/// Decompressed blocks of cold segments, `(segment, segment offset, bytes)`, least recently
/// used first, and their total bytes.
type BlockCache = (
    std::collections::VecDeque<(SegmentSeq, u64, Arc<Vec<u8>>)>,
    u64,
);

/// A segment in the cache.
#[derive(Debug)]
struct Cached {
    seq: SegmentSeq,
    bytes: u64,
    slot: Weak<MapSlot>,
}

impl ColdTier {
    /// Whether the manifest names segment `seq` (moved, or half moved by a compaction that
    /// a crash cut short: the entry written, the local file still there).
    pub(crate) fn in_manifest(&self, seq: SegmentSeq) -> bool {
        self.manifest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entries
            .contains_key(&seq)
    }
}

/// The cold tier of an open log.
#[derive(Debug)]
pub(crate) struct ColdTier {
    pub(crate) store: Option<Arc<dyn ColdStore>>,
    /// Why there is no store, when there is none.
    no_store: String,
    manifest: Mutex<Manifest>,
    cache_dir: PathBuf,
    /// A read-only view's private cache directory, removed at close.
    private_cache: bool,
    cache_bytes: u64,
    /// Least recently fetched first.
    cached: Mutex<Vec<Cached>>,
    /// Objects fetched since open.
    fetches: std::sync::atomic::AtomicU64,
    /// One compaction at a time.
    pub(crate) compacting: Mutex<()>,
    /// Held while `cold.store` is written (by an append storing a blob, or a compaction).
    recording: Mutex<()>,
    /// The block index of each cold segment a point read reached (fetched once: its
    /// trailer, header and index ranges).
    indexes: Mutex<std::collections::HashMap<SegmentSeq, Arc<Vec<BlockEntry>>>>,
    /// Decompressed blocks for point reads, least recently used first, and their bytes.
    blocks: Mutex<BlockCache>,
    block_cache_bytes: u64,
    /// Blocks fetched since open.
    block_fetches: std::sync::atomic::AtomicU64,
    /// The background compaction thread (when `ColdOptions::background` is set).
    pub(crate) compactor: Worker,
    /// The last background compaction's error, if it failed.
    last_error: Mutex<Option<String>>,
    /// The data directory and the log's id, to read the manifest again.
    dir: PathBuf,
    log_id: [u8; 16],
}

/// The cold tier as [`super::Log::cold_status`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColdStatus {
    /// The store's URL, or why there is none.
    pub store: String,
    /// Segments in the manifest.
    pub cold_segments: usize,
    /// Whole objects fetched from the store since open (into the segment cache).
    pub fetches: u64,
    /// Single blocks fetched for point reads since open.
    pub block_fetches: u64,
    /// Segments in the local cache now, and their bytes.
    pub cached: (usize, u64),
    /// The last background compaction's error, if it failed.
    pub last_error: Option<String>,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    Error::io(op, path)
}

/// Names `store` as the log's in its `cold.store` file, durably, before anything is written
/// to it (a later open without a store finds it there).
pub(crate) fn record_store(shared: &Shared, store: &dyn ColdStore) -> Result<()> {
    let fs = shared.fs();
    if fs.exists(&shared.dir.join(COLD_STORE_FILE)) {
        return Ok(());
    }
    // Two writers of the file would share its temporary name.
    let _one = lock(&shared.cold.recording);
    if !fs.exists(&shared.dir.join(COLD_STORE_FILE)) {
        fs.write_file_atomic(
            &shared.dir,
            COLD_STORE_FILE,
            format!("{}\n", store.url()).as_bytes(),
            false,
        )
        .map_err(io_err("writing", &shared.dir.join(COLD_STORE_FILE)))?;
    }
    Ok(())
}

/// The error for a cold segment that cannot be read or written.
pub(crate) fn cold_error(
    seq: SegmentSeq,
    key: &str,
    store: &str,
    detail: impl Into<String>,
    source: Option<io::Error>,
) -> Error {
    Error::Cold {
        seq: seq.0,
        object: format!("{store}/{key}"),
        detail: detail.into(),
        source,
    }
}

impl ColdTier {
    /// Reads the manifest and sets up the cache (stage 2 of open).
    pub(crate) fn open(
        fs: &crate::Storage,
        dir: &Path,
        log_id: &[u8; 16],
        opts: &super::Options,
        read_only: bool,
    ) -> Result<ColdTier> {
        let recorded = match fs.read_to_string(&dir.join(COLD_STORE_FILE)) {
            Ok(url) => Some(url.trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("reading", dir.join(COLD_STORE_FILE))(e)),
        };
        if let (Some(s), Some(url)) = (&opts.cold.store, &recorded)
            && s.url() != *url
        {
            // One store per log: cold segments in two stores could not all be read back.
            return Err(Error::InvalidOptions {
                reason: format!(
                    "the log's cold segments are in {url} (its cold.store); the store given is {}",
                    s.url()
                ),
            });
        }
        let (store, no_store) = match &opts.cold.store {
            Some(s) => (Some(Arc::clone(s)), String::new()),
            None => match fs.read_to_string(&dir.join(COLD_STORE_FILE)) {
                Ok(url) => match crate::cold::open_url(url.trim(), fs) {
                    Ok(s) => (Some(Arc::new(s) as Arc<dyn ColdStore>), String::new()),
                    Err(e) => (None, format!("the log's store {}: {e}", url.trim())),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    (None, "no cold store is configured".to_owned())
                }
                Err(e) => return Err(Error::io("reading", dir.join(COLD_STORE_FILE))(e)),
            },
        };
        let manifest = read_manifest(fs, dir, log_id)?;
        let (cache_dir, private_cache) = if read_only {
            let nanos = now().0;
            (
                std::env::temp_dir().join(format!("tally-cold-{}-{nanos:x}", std::process::id())),
                true,
            )
        } else {
            (dir.join(COLD_CACHE_DIR), false)
        };
        if !read_only && fs.exists(&cache_dir) {
            // A writable open starts with an empty cache: nothing in it is trusted across
            // opens.
            for name in fs
                .read_dir(&cache_dir)
                .map_err(io_err("listing", &cache_dir))?
            {
                let p = cache_dir.join(&name);
                fs.remove_file(&p)
                    .map_err(io_err("emptying the cold cache", &p))?;
            }
        }
        Ok(ColdTier {
            store,
            no_store,
            manifest: Mutex::new(manifest),
            cache_dir,
            private_cache,
            cache_bytes: opts.cold.cache_bytes,
            cached: Mutex::new(Vec::new()),
            fetches: std::sync::atomic::AtomicU64::new(0),
            compacting: Mutex::new(()),
            recording: Mutex::new(()),
            indexes: Mutex::new(std::collections::HashMap::new()),
            blocks: Mutex::new((std::collections::VecDeque::new(), 0)),
            block_cache_bytes: opts.cold.block_cache_bytes,
            block_fetches: std::sync::atomic::AtomicU64::new(0),
            compactor: Worker::default(),
            last_error: Mutex::new(None),
            dir: dir.to_owned(),
            log_id: *log_id,
        })
    }

    /// Where segment `seq` is in the cold tier if a writer moved it there after this log
    /// opened (its local file is gone): the manifest read again.
    pub(crate) fn moved_since_open(
        self: &Arc<Self>,
        fs: &crate::Storage,
        seq: SegmentSeq,
    ) -> Result<Option<ColdPlace>> {
        let m = read_manifest(fs, &self.dir, &self.log_id)?;
        let Some(entry) = m.entries.get(&seq).copied() else {
            return Ok(None);
        };
        lock(&self.manifest).entries.insert(seq, entry);
        Ok(Some(ColdPlace {
            entry,
            key: cold_object_key(&self.log_id, seq),
            tier: Arc::clone(self),
        }))
    }

    /// The manifest's entries, oldest segment first.
    pub(crate) fn entries(&self) -> Vec<ManifestEntry> {
        lock(&self.manifest).entries.values().copied().collect()
    }

    /// The store's URL, or why there is none.
    pub(crate) fn store_url(&self) -> String {
        self.store
            .as_ref()
            .map_or_else(|| format!("(none: {})", self.no_store), |s| s.url())
    }

    fn store(&self, seq: SegmentSeq, key: &str) -> Result<&Arc<dyn ColdStore>> {
        self.store.as_ref().ok_or_else(|| {
            cold_error(
                seq,
                key,
                "(no store)",
                format!("segment {seq} is cold and {}", self.no_store),
                None,
            )
        })
    }

    /// The store blobs are written to and read from, or why there is none.
    pub(crate) fn blob_store(&self) -> std::result::Result<&Arc<dyn ColdStore>, &str> {
        self.store.as_ref().ok_or(self.no_store.as_str())
    }

    /// What [`super::Log::cold_status`] reports.
    pub(crate) fn status(&self) -> ColdStatus {
        let cached = lock(&self.cached);
        ColdStatus {
            store: self.store_url(),
            cold_segments: lock(&self.manifest).entries.len(),
            fetches: self.fetches.load(std::sync::atomic::Ordering::Relaxed),
            block_fetches: self
                .block_fetches
                .load(std::sync::atomic::Ordering::Relaxed),
            cached: (cached.len(), cached.iter().map(|c| c.bytes).sum()),
            last_error: lock(&self.last_error).clone(),
        }
    }

    /// The cache file of segment `seq`.
    pub(crate) fn cache_path(&self, seq: SegmentSeq) -> PathBuf {
        self.cache_dir.join(seq.file_name())
    }

    /// Fetches a cold segment, checks it, writes it into the cache exactly as it was
    /// sealed, and maps it.
    pub(crate) fn materialize(
        &self,
        fs: &crate::Storage,
        seg: &SegmentHandle,
        place: &ColdPlace,
    ) -> Result<Arc<SegmentMap>> {
        let entry = &place.entry;
        let key = &place.key;
        let store = self.store(seg.seq, key)?;
        let url = store.url();
        // Exactly the manifest's length: a store that returns more is not read further.
        let object = store
            .get_range(key, 0..entry.object_len)
            .map_err(|e| cold_error(seg.seq, key, &url, "fetching the cold object", Some(e)))?;
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let segment = check_object(&object, entry)
            .map_err(|detail| cold_error(seg.seq, key, &url, detail, None))?;
        let path = self.cache_path(seg.seq);
        write_cache_file(fs, &self.cache_dir, &path, &segment, entry)
            .map_err(io_err("writing the cold cache", &path))?;
        let file = fs
            .open(&path, OpenMode::Read)
            .map_err(io_err("opening the cold cache", &path))?;
        let map = SegmentMap::map_read_only(
            &*file,
            entry.segment_header.capacity,
            entry.segment_footer.data_end,
        )
        .map_err(io_err("mapping the cold cache", &path))?;
        Ok(map)
    }

    /// The block of a cold segment that holds the record at segment offset `offset`, and
    /// the segment offset the block starts at: from the block cache, or fetched alone (its
    /// frame by a range read, checked by its CRC and decompressed). The segment's block
    /// index is fetched once, from the object's trailer, header and index ranges, and its
    /// header and footer must be the manifest's.
    pub(crate) fn block_at(
        &self,
        seg: &SegmentHandle,
        place: &ColdPlace,
        offset: u64,
    ) -> Result<(u64, Arc<Vec<u8>>)> {
        let index = self.block_index(seg, place)?;
        let i = index.partition_point(|b| b.segment_end() <= offset);
        let Some(b) = index.get(i).filter(|b| b.segment_offset <= offset) else {
            return Err(super::background::corrupt(
                &self.cache_path(seg.seq),
                offset,
                None,
                format!("no block of cold segment {} holds offset {offset}", seg.seq),
                None,
            ));
        };
        {
            let mut blocks = lock(&self.blocks);
            if let Some(at) = blocks
                .0
                .iter()
                .position(|(s, o, _)| *s == seg.seq && *o == b.segment_offset)
            {
                let hit = blocks.0.remove(at).expect("found above");
                let bytes = Arc::clone(&hit.2);
                blocks.0.push_back(hit);
                return Ok((b.segment_offset, bytes));
            }
        }
        let store = self.store(seg.seq, &place.key)?;
        let url = store.url();
        let frame = store
            .get_range(&place.key, b.object_range())
            .map_err(|e| cold_error(seg.seq, &place.key, &url, "fetching a block", Some(e)))?;
        let data = decompress_block(b, &frame).map_err(|e| {
            cold_error(
                seg.seq,
                &place.key,
                &url,
                format!("block at position {}: {e}", b.first_position),
                None,
            )
        })?;
        self.block_fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let data = Arc::new(data);
        let mut blocks = lock(&self.blocks);
        blocks.1 += data.len() as u64;
        blocks
            .0
            .push_back((seg.seq, b.segment_offset, Arc::clone(&data)));
        while blocks.1 > self.block_cache_bytes && blocks.0.len() > 1 {
            if let Some((_, _, old)) = blocks.0.pop_front() {
                blocks.1 -= old.len() as u64;
            }
        }
        Ok((b.segment_offset, data))
    }

    fn block_index(&self, seg: &SegmentHandle, place: &ColdPlace) -> Result<Arc<Vec<BlockEntry>>> {
        if let Some(i) = lock(&self.indexes).get(&seg.seq) {
            return Ok(Arc::clone(i));
        }
        let (key, entry) = (&place.key, &place.entry);
        let store = self.store(seg.seq, key)?;
        let url = store.url();
        let fail =
            |what: &str, e| cold_error(seg.seq, key, &url, format!("fetching its {what}"), Some(e));
        let len = entry.object_len;
        let tail = store
            .get_range(key, len - COLD_TRAILER_LEN as u64..len)
            .map_err(|e| fail("trailer", e))?;
        let bad = |d: String| cold_error(seg.seq, key, &url, d, None);
        let trailer = decode_trailer(&tail, len).map_err(|e| bad(format!("trailer: {e}")))?;
        let head = store
            .get_range(key, 0..COLD_HEADER_LEN as u64)
            .map_err(|e| fail("header", e))?;
        let header = decode_header(&head).map_err(|e| bad(format!("header: {e}")))?;
        if header.segment_header != entry.segment_header
            || header.segment_footer != entry.segment_footer
        {
            return Err(bad(
                "the object holds another segment than the manifest names".into(),
            ));
        }
        let raw = store
            .get_range(key, trailer.index_offset..len - COLD_TRAILER_LEN as u64)
            .map_err(|e| fail("block index", e))?;
        let index = Arc::new(
            decode_index(&raw, &header, &trailer).map_err(|e| bad(format!("block index: {e}")))?,
        );
        lock(&self.indexes).insert(seg.seq, Arc::clone(&index));
        Ok(index)
    }

    /// Records that `seg` was just brought into the cache, and evicts the least recently
    /// fetched others beyond the budget. Called with no segment lock held.
    pub(crate) fn admit(
        &self,
        fs: &crate::Storage,
        seq: SegmentSeq,
        slot: &Arc<MapSlot>,
        bytes: u64,
    ) {
        let victims = {
            let mut cached = lock(&self.cached);
            cached.retain(|c| c.seq != seq);
            cached.push(Cached {
                seq,
                bytes,
                slot: Arc::downgrade(slot),
            });
            let mut total: u64 = cached.iter().map(|c| c.bytes).sum();
            let mut victims = Vec::new();
            while total > self.cache_bytes && cached.len() > 1 {
                let c = cached.remove(0);
                total -= c.bytes;
                victims.push(c);
            }
            victims
        };
        for v in victims {
            // Under the victim's slot lock, so that no read maps a fresh copy of it between
            // the two steps. Readers that hold the map keep reading it: an unlinked file
            // stays mapped.
            let slot = v.slot.upgrade();
            let mut guard = slot
                .as_ref()
                .map(|s| s.write().unwrap_or_else(std::sync::PoisonError::into_inner));
            if let Some(g) = guard.as_mut() {
                **g = None;
            }
            let _ = fs.remove_file(&self.cache_path(v.seq));
            drop(guard);
        }
    }

    /// Appends an entry to the manifest and syncs it.
    fn append(
        &self,
        fs: &crate::Storage,
        dir: &Path,
        log_id: &[u8; 16],
        e: &ManifestEntry,
    ) -> Result<()> {
        let path = dir.join(COLD_MANIFEST_FILE);
        let mut m = lock(&self.manifest);
        let file = fs
            .open(&path, OpenMode::Create)
            .map_err(io_err("opening", &path))?;
        let created = m.len == 0;
        if created {
            file.write_all_at(&encode_manifest_header(log_id), 0)
                .map_err(io_err("writing", &path))?;
            m.len = MANIFEST_HEADER_LEN as u64;
        }
        file.write_all_at(&encode_manifest_entry(e), m.len)
            .map_err(io_err("writing", &path))?;
        file.sync_data().map_err(io_err("syncing", &path))?;
        if created {
            fs.sync_dir(dir).map_err(io_err("syncing", dir))?;
        }
        m.len += MANIFEST_ENTRY_LEN as u64;
        m.entries.insert(e.seq, *e);
        Ok(())
    }

    /// Removes a read-only view's private cache.
    pub(crate) fn close(&self, fs: &crate::Storage) {
        if self.private_cache && fs.exists(&self.cache_dir) {
            if let Ok(names) = fs.read_dir(&self.cache_dir) {
                for n in names {
                    let _ = fs.remove_file(&self.cache_dir.join(n));
                }
            }
            let _ = std::fs::remove_dir(&self.cache_dir);
        }
    }
}

/// Reads `cold.manifest`: every whole entry, checked. A last entry cut short or failing its
/// CRC is a write a crash interrupted, which nothing acted on (a local file is removed only
/// after its entry is synced); it is ignored, and overwritten by the next append.
fn read_manifest(fs: &crate::Storage, dir: &Path, log_id: &[u8; 16]) -> Result<Manifest> {
    let path = dir.join(COLD_MANIFEST_FILE);
    let bytes = match fs.read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Manifest::default()),
        Err(e) => return Err(Error::io("reading", &path)(e)),
    };
    let corrupt = |offset: u64, detail: String, source| Error::Corrupt {
        file: path.clone(),
        offset,
        position: None,
        detail,
        source,
    };
    if bytes.len() < MANIFEST_HEADER_LEN {
        // The header's own write was cut short: no entry was ever synced.
        return Ok(Manifest::default());
    }
    let id = decode_manifest_header(&bytes)
        .map_err(|e| corrupt(0, "cold manifest header".into(), Some(e)))?;
    if &id != log_id {
        return Err(corrupt(
            0,
            "the cold manifest belongs to another log".into(),
            None,
        ));
    }
    let mut m = Manifest {
        entries: BTreeMap::new(),
        len: MANIFEST_HEADER_LEN as u64,
    };
    let body = &bytes[MANIFEST_HEADER_LEN..];
    let whole = body.len() / MANIFEST_ENTRY_LEN;
    for (i, raw) in body.chunks_exact(MANIFEST_ENTRY_LEN).enumerate() {
        let offset = (MANIFEST_HEADER_LEN + i * MANIFEST_ENTRY_LEN) as u64;
        let e = match decode_manifest_entry(raw) {
            Ok(e) => e,
            // A torn append fails its CRC; it is ignored only if nothing acted on it (its
            // segment is still local). Anything else (an unknown kind with a good CRC, from
            // a newer build) refuses the open rather than being overwritten.
            Err(e @ crate::format::DecodeError::Checksum { .. }) if i + 1 == whole => {
                let seq = SegmentSeq(crate::format::le::u64_at(raw, crate::format::cold::ME_SEQ));
                if fs.exists(&dir.join(seq.file_name())) {
                    break;
                }
                return Err(corrupt(
                    offset,
                    "the last cold manifest entry is damaged and its segment is not local".into(),
                    Some(e),
                ));
            }
            Err(e) => return Err(corrupt(offset, "cold manifest entry".into(), Some(e))),
        };
        if e.segment_header.log_id != *log_id || m.entries.contains_key(&e.seq) {
            return Err(corrupt(
                offset,
                format!(
                    "cold manifest entry for segment {} names another log or repeats a segment",
                    e.seq
                ),
                None,
            ));
        }
        m.entries.insert(e.seq, e);
        m.len = offset + MANIFEST_ENTRY_LEN as u64;
    }
    Ok(m)
}

/// Checks a fetched object against its manifest entry and decodes it into the segment's
/// bytes `0..data_end` (header page and records). Returns why not, for an error that names
/// the segment and object.
fn check_object(object: &[u8], entry: &ManifestEntry) -> std::result::Result<Vec<u8>, String> {
    if object.len() as u64 != entry.object_len {
        return Err(format!(
            "the object is {} bytes; the manifest says {}",
            object.len(),
            entry.object_len
        ));
    }
    if *blake3::hash(object).as_bytes() != entry.object_hash {
        return Err("the object's BLAKE3 hash does not match the manifest".into());
    }
    let layout = decode_cold(object).map_err(|e| format!("the object does not decode: {e}"))?;
    if layout.header.segment_header != entry.segment_header
        || layout.header.segment_footer != entry.segment_footer
    {
        return Err("the object holds another segment than the manifest names".into());
    }
    let data_end = entry.segment_footer.data_end;
    let len = usize::try_from(data_end).map_err(|_| "segment too large".to_owned())?;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&entry.segment_header.encode_page());
    for b in &layout.blocks {
        let r = b.object_range();
        let block = decompress_block(b, &object[r.start as usize..r.end as usize])
            .map_err(|e| format!("block at position {}: {e}", b.first_position))?;
        out.extend_from_slice(&block);
    }
    debug_assert_eq!(
        out.len() as u64,
        data_end,
        "decode_index checked the blocks' ends"
    );
    Ok(out)
}

/// Writes a segment's bytes (`0..data_end`) and its footer page into a cache file of the
/// segment's capacity: the rest is a hole, as zero as the sealed file's.
fn write_cache_file(
    fs: &crate::Storage,
    cache_dir: &Path,
    path: &Path,
    segment: &[u8],
    entry: &ManifestEntry,
) -> io::Result<()> {
    fs.create_dir_all(cache_dir)?;
    let tmp = crate::format::files::temp_name(&path.to_string_lossy());
    let tmp = PathBuf::from(tmp);
    let file = fs.open(&tmp, OpenMode::Truncate { private: false })?;
    file.write_all_at(segment, 0)?;
    let cap = entry.segment_header.capacity;
    file.set_len(cap)?;
    file.write_all_at(&entry.segment_footer.encode_page(), cap - PAGE_BYTES)?;
    drop(file);
    fs.rename(&tmp, path)
}

/// The sealed, local segments a policy moves, oldest first.
/// The system streams an open or an operator reads whole: the producer keys and signing
/// policy (the engine), the schema registry (tallyd), and the retention policies and legal
/// holds (`$governance`). A segment holding events of one stays local, so that a
/// log opens, and its policy holds, while the store is down.
pub(crate) const STREAMS_READ_AT_OPEN: [&str; 4] = [
    super::producers::PRODUCERS_STREAM,
    super::personal::ERASURE_STREAM,
    crate::schema::SCHEMA_STREAM,
    crate::governance::GOVERNANCE_STREAM,
];

/// Whether segment `seg` holds events of a stream an open reads ([`STREAMS_READ_AT_OPEN`]);
/// `true` when its index sidecar cannot tell (it stays local until it can).
fn read_at_open(shared: &Shared, seg: &SegmentHandle) -> bool {
    match super::background::sealed_index(shared, seg) {
        Ok(Some((idx, _))) => (0..idx.stream_count()).any(|i| {
            idx.stream_at(i)
                .0
                .is_some_and(|n| STREAMS_READ_AT_OPEN.contains(&n))
        }),
        _ => true,
    }
}

fn candidates(shared: &Shared, policy: &CompactPolicy) -> Vec<(Arc<SegmentHandle>, SegmentFooter)> {
    let sealed: Vec<(Arc<SegmentHandle>, SegmentFooter)> = shared
        .segments_snapshot()
        .into_iter()
        .filter_map(|s| {
            let footer = match &*s
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
            {
                SegState::Sealed { footer, .. } => *footer,
                _ => return None,
            };
            Some((s, footer))
        })
        .collect();
    let movable = sealed.len().saturating_sub(policy.keep_local_segments);
    let local: Vec<(Arc<SegmentHandle>, SegmentFooter)> = sealed
        .into_iter()
        .take(movable)
        .filter(|(s, _)| s.cold_place().is_none() && !read_at_open(shared, s))
        .collect();
    if policy.older_than.is_none() && policy.local_budget_bytes.is_none() {
        return local;
    }
    let now = now().0;
    let mut over_budget = policy.local_budget_bytes.map_or(0, |budget| {
        let used: u64 = shared
            .segments_snapshot()
            .iter()
            .filter(|s| s.cold_place().is_none())
            .map(|s| s.header.capacity)
            .sum();
        used.saturating_sub(budget)
    });
    local
        .into_iter()
        .filter(|(s, f)| {
            let old = policy.older_than.is_some_and(|age| {
                now.saturating_sub(f.last_record_time.0) >= age.as_nanos() as u64
            });
            let budget = over_budget > 0;
            if budget {
                over_budget = over_budget.saturating_sub(s.header.capacity);
            }
            old || budget
        })
        .collect()
}

/// The background compaction: runs the policy every `every`, at low priority, until the
/// log closes. A failure is kept for [`super::Log::cold_status`] and retried next time.
pub(crate) fn compactor(shared: &Arc<Shared>, every: Duration) {
    crate::sys::lower_thread_priority();
    loop {
        let _ = shared.cold.compactor.wait(every);
        if shared.cold.compactor.stopping() || shared.commit.is_poisoned() {
            return;
        }
        // Retention first (when the log has a policy), so that what is due is removed
        // before its segment goes to the cold tier.
        let r = super::Log::handle(shared).compact(None, false);
        *lock(&shared.cold.last_error) = r.err().map(|e| e.to_string());
    }
}

/// Runs the policy once (see the module comment for the steps and their order).
pub(crate) fn compact(
    shared: &Shared,
    policy: &CompactPolicy,
    dry_run: bool,
) -> Result<CompactReport> {
    if shared.read_only {
        return Err(Error::ReadOnly);
    }
    let tier = &shared.cold;
    let _one = lock(&tier.compacting);
    let store = match &tier.store {
        Some(s) => Arc::clone(s),
        None => {
            return Err(Error::InvalidOptions {
                reason: format!("cannot compact: {}", tier.no_store),
            });
        }
    };
    let mut report = CompactReport {
        store: store.url(),
        dry_run,
        ..CompactReport::default()
    };
    // Segments a crash left half moved: entry written, local file still there.
    let half: Vec<Arc<SegmentHandle>> = {
        let m = lock(&tier.manifest);
        shared
            .segments_snapshot()
            .into_iter()
            .filter(|s| m.entries.contains_key(&s.seq) && s.cold_place().is_none())
            .collect()
    };
    for seg in half {
        if dry_run {
            continue;
        }
        let entry = lock(&tier.manifest).entries[&seg.seq];
        let key = cold_object_key(&shared.meta.log_id, seg.seq);
        let object = with_retries(
            shared.opts.cold.attempts,
            shared.opts.cold.first_retry_wait,
            || store.get_range(&key, 0..entry.object_len),
        )
        .map_err(|e| {
            cold_error(
                seg.seq,
                &key,
                &report.store,
                "reading back the cold object",
                Some(e),
            )
        })?;
        check_object(&object, &entry)
            .map_err(|d| cold_error(seg.seq, &key, &report.store, d, None))?;
        finish_move(shared, &seg, entry, key)?;
        report.finished.push(seg.seq);
    }
    if !dry_run {
        record_store(shared, store.as_ref())?;
    }
    for (seg, footer) in candidates(shared, policy) {
        if shared.shutdown.load(std::sync::atomic::Ordering::Relaxed)
            || shared.cold.compactor.stopping()
        {
            break;
        }
        let key = cold_object_key(&shared.meta.log_id, seg.seq);
        let mut moved = MovedSegment {
            seq: seg.seq,
            positions: (footer.first_position, footer.last_position),
            record_bytes: footer.data_end - SEGMENT_DATA_START,
            object_bytes: 0,
            key: key.clone(),
        };
        if dry_run {
            report.moved.push(moved);
            continue;
        }
        moved.object_bytes = move_segment(shared, &store, &seg, &footer, &key)?;
        report.moved.push(moved);
    }
    Ok(report)
}

/// Steps 1 to 5 for one segment; returns the object's length.
fn move_segment(
    shared: &Shared,
    store: &Arc<dyn ColdStore>,
    seg: &Arc<SegmentHandle>,
    footer: &SegmentFooter,
    key: &str,
) -> Result<u64> {
    let url = store.url();
    let cold = &shared.opts.cold;
    // 1. The records, checked.
    let map = seg.map()?;
    let bytes = map.read(0, footer.data_end).unwrap_or_default();
    if bytes.len() as u64 != footer.data_end {
        return Err(cold_error(
            seg.seq,
            key,
            &url,
            "the segment's map is shorter than its footer says",
            None,
        ));
    }
    let lens = checked_record_lens(seg, footer, bytes)?;
    // 2. Encode and put.
    let object = encode_cold(
        &seg.header,
        footer,
        &bytes[SEGMENT_DATA_START as usize..],
        &lens,
        cold.encode,
    )
    .map_err(|e| cold_error(seg.seq, key, &url, format!("encoding: {e}"), None))?;
    drop(map);
    // Create only: an object already under this key is kept when it is this one (an
    // earlier attempt), and never replaced when it is not (another copy of this log, such as
    // a restored backup that has since diverged, owns it).
    let existing = with_retries(cold.attempts, cold.first_retry_wait, || store.head(key))
        .map_err(|e| cold_error(seg.seq, key, &url, "looking up the cold object", Some(e)))?;
    let same = match existing {
        Some(len) if len == object.len() as u64 => {
            with_retries(cold.attempts, cold.first_retry_wait, || {
                store.get_range(key, 0..len)
            })
            .map_err(|e| cold_error(seg.seq, key, &url, "reading the existing object", Some(e)))?
                == object
        }
        _ => false,
    };
    if existing.is_some() && !same {
        return Err(cold_error(
            seg.seq,
            key,
            &url,
            "another object already holds this key (another copy of this log, or an earlier \
             attempt with other settings); it is never replaced: remove it if no manifest \
             names it",
            None,
        ));
    }
    if !same {
        with_retries(cold.attempts, cold.first_retry_wait, || {
            store.put(key, &object)
        })
        .map_err(|e| cold_error(seg.seq, key, &url, "writing the cold object", Some(e)))?;
    }
    // 3. Read back and check against the local bytes.
    let back = with_retries(cold.attempts, cold.first_retry_wait, || {
        store.get_range(key, 0..object.len() as u64)
    })
    .map_err(|e| cold_error(seg.seq, key, &url, "reading back the cold object", Some(e)))?;
    let entry = ManifestEntry {
        seq: seg.seq,
        recorded_time: now(),
        object_len: object.len() as u64,
        object_hash: *blake3::hash(&object).as_bytes(),
        segment_header: seg.header,
        segment_footer: *footer,
    };
    let segment = check_object(&back, &entry)
        .map_err(|d| cold_error(seg.seq, key, &url, format!("the copy read back: {d}"), None))?;
    let map = seg.map()?;
    if map.read(0, footer.data_end) != Some(&segment[..]) {
        return Err(cold_error(
            seg.seq,
            key,
            &url,
            "the copy read back differs from the local segment",
            None,
        ));
    }
    drop(map);
    // 4. The manifest entry, durable.
    shared
        .cold
        .append(shared.fs(), &shared.dir, &shared.meta.log_id, &entry)?;
    // 5. Cold from now on.
    finish_move(shared, seg, entry, key.to_owned())?;
    Ok(entry.object_len)
}

/// Every record of a sealed segment checked (checksums, chain from the header to the
/// footer, Merkle root); returns their lengths.
fn checked_record_lens(
    seg: &SegmentHandle,
    footer: &SegmentFooter,
    bytes: &[u8],
) -> Result<Vec<u64>> {
    let mut src = crate::segment::SliceSource { bytes };
    let from = crate::segment::ScanFrom {
        layout: seg.header.layout,
        offset: SEGMENT_DATA_START,
        position: seg.header.base_position,
        chain: seg.header.prev_chain_hash,
    };
    let scan = crate::segment::scan(&mut src, from, footer.data_end);
    let hashes: Vec<crate::format::Hash32> =
        scan.records.iter().map(|r| r.header.chain_hash).collect();
    if scan.records.len() as u64 != footer.record_count
        || scan.complete_end != footer.data_end
        || hashes.last() != Some(&footer.last_chain_hash)
        || merkle_root(&hashes) != footer.merkle_root
    {
        return Err(super::background::corrupt(
            &seg.path,
            scan.complete_end,
            None,
            format!(
                "segment {} does not match its footer ({} valid records of {}); it is not moved \
                 to the cold tier",
                seg.seq,
                scan.records.len(),
                footer.record_count
            ),
            None,
        ));
    }
    Ok(scan.records.iter().map(|r| r.header.record_len()).collect())
}

/// Step 5: marks the segment cold, moves its local file into the cache, syncs the directory.
fn finish_move(
    shared: &Shared,
    seg: &Arc<SegmentHandle>,
    entry: ManifestEntry,
    key: String,
) -> Result<()> {
    let fs = shared.fs();
    let tier = &shared.cold;
    let cache = tier.cache_path(seg.seq);
    fs.create_dir_all(&tier.cache_dir)
        .map_err(io_err("creating", &tier.cache_dir))?;
    {
        let mut place = seg
            .cold
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The local file becomes the cached copy: the map readers hold stays valid, and the
        // next read needs no fetch.
        fs.rename(&seg.path, &cache).map_err(io_err(
            "moving a compacted segment into the cold cache",
            &seg.path,
        ))?;
        *place = Some(ColdPlace {
            entry,
            key,
            tier: Arc::clone(tier),
        });
    }
    fs.sync_dir(&shared.dir)
        .map_err(io_err("syncing", &shared.dir))?;
    tier.admit(
        fs,
        seg.seq,
        &seg.map,
        entry.segment_footer.data_end + PAGE_BYTES,
    );
    Ok(())
}
