//! A segment of an open log: the active one being written, a rolled one waiting for its
//! seal, or a sealed one, as readers, the writer and the sealer share it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use crate::error::{Error, Result};
use crate::format::SegmentSeq;
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::index::{ActiveIndex, SealedIndex};
use crate::log::{ColdPlace, ColdTier};
use crate::sys::{FsFile, MapWriter, OpenMode, SegmentMap};

/// One segment, as readers and the sealer see it.
#[derive(Debug)]
pub(crate) struct SegmentHandle {
    pub(crate) seq: SegmentSeq,
    pub(crate) path: PathBuf,
    /// The storage the segment's file is opened through.
    pub(crate) fs: crate::Storage,
    pub(crate) header: SegmentHeader,
    /// Mapped on first use for sealed segments, at activation for the active one; for a
    /// cold segment, the map of its copy in the cache (emptied when the cache evicts it).
    pub(crate) map: Arc<MapSlot>,
    pub(crate) state: RwLock<SegState>,
    /// Set when the segment is in the cold tier: its local file is gone, and reads go
    /// through the cache. Held for reading while the local file is opened, for writing
    /// while compaction moves it.
    pub(crate) cold: RwLock<Option<ColdPlace>>,
    /// The log's cold tier, set when the segment joins the log's list: a read-only view
    /// asks it where a local segment went when a writer moved it after the view opened.
    pub(crate) tier: OnceLock<Arc<ColdTier>>,
}

/// A segment's map, when it is mapped.
pub(crate) type MapSlot = RwLock<Option<Arc<SegmentMap>>>;

/// Where a segment's index is.
#[derive(Debug)]
pub(crate) enum SegState {
    /// Being written: the index is the writer's.
    Active,
    /// Rolled, not yet sealed: the index is frozen in memory.
    Frozen {
        index: Arc<ActiveIndex>,
        data_end: u64,
    },
    /// Sealed: the footer is written; the sidecar is loaded on first use.
    Sealed {
        footer: SegmentFooter,
        index: Arc<Mutex<Option<Arc<SealedIndex>>>>,
    },
}

impl SegmentHandle {
    /// A local segment's handle, mapped already or on first use.
    pub(crate) fn new(
        seq: SegmentSeq,
        path: PathBuf,
        fs: crate::Storage,
        header: SegmentHeader,
        map: Option<Arc<SegmentMap>>,
        state: SegState,
    ) -> SegmentHandle {
        SegmentHandle {
            seq,
            path,
            fs,
            header,
            map: Arc::new(RwLock::new(map)),
            state: RwLock::new(state),
            cold: RwLock::new(None),
            tier: OnceLock::new(),
        }
    }

    /// The segment's map, mapping a sealed segment on first use.
    pub(crate) fn map(&self) -> Result<Arc<SegmentMap>> {
        if let Some(m) = self.mapped() {
            return Ok(m);
        }
        let cold = self.cold.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(place) = &*cold {
            let fetched = {
                let mut slot = self.map.write().unwrap_or_else(PoisonError::into_inner);
                if let Some(m) = &*slot {
                    return Ok(Arc::clone(m));
                }
                let m = place.tier.materialize(&self.fs, self, place)?;
                *slot = Some(Arc::clone(&m));
                m
            };
            let tier = Arc::clone(&place.tier);
            let bytes = place.entry.segment_footer.data_end + crate::format::PAGE_BYTES;
            drop(cold);
            tier.admit(&self.fs, self.seq, &self.map, bytes);
            return Ok(fetched);
        }
        let data_end = match &*self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            SegState::Sealed { footer, .. } => footer.data_end,
            SegState::Frozen { data_end, .. } => *data_end,
            SegState::Active => unreachable!("the active segment is mapped at activation"),
        };
        let file = match self.fs.open(&self.path, OpenMode::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                drop(cold);
                if self.moved_to_cold()? {
                    return self.map();
                }
                return Err(Error::io("opening segment", &self.path)(e));
            }
            Err(e) => return Err(Error::io("opening segment", &self.path)(e)),
        };
        let map = SegmentMap::map_read_only(&*file, self.header.capacity, data_end)
            .map_err(Error::io("mapping segment", &self.path))?;
        let mut slot = self.map.write().unwrap_or_else(PoisonError::into_inner);
        Ok(Arc::clone(slot.get_or_insert(map)))
    }

    /// Whether the segment, whose local file is gone, was moved to the cold tier after this
    /// log opened (by a writer beside this read-only view): the manifest is read again, and
    /// the segment is read from the cold tier from now on.
    fn moved_to_cold(&self) -> Result<bool> {
        let Some(tier) = self.tier.get() else {
            return Ok(false);
        };
        let Some(place) = tier.moved_since_open(&self.fs, self.seq)? else {
            return Ok(false);
        };
        *self.cold.write().unwrap_or_else(PoisonError::into_inner) = Some(place);
        Ok(true)
    }

    /// The segment's map if it is mapped now.
    pub(crate) fn mapped(&self) -> Option<Arc<SegmentMap>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Where the segment is in the cold tier, if it is there.
    pub(crate) fn cold_place(&self) -> Option<ColdPlace> {
        self.cold
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Opens the segment's file for plain reads: the local file, or for a cold segment its
    /// copy in the cache (fetched first when the cache has none). Returns the path opened.
    pub(crate) fn open_file(&self) -> Result<(Box<dyn FsFile>, PathBuf)> {
        for _ in 0..3 {
            let cold = self.cold.read().unwrap_or_else(PoisonError::into_inner);
            let Some(place) = &*cold else {
                match self.fs.open(&self.path, OpenMode::Read) {
                    Ok(file) => return Ok((file, self.path.clone())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        drop(cold);
                        if self.moved_to_cold()? {
                            continue;
                        }
                        return Err(Error::io("opening segment", &self.path)(e));
                    }
                    Err(e) => return Err(Error::io("opening segment", &self.path)(e)),
                }
            };
            let path = place.tier.cache_path(self.seq);
            drop(cold);
            let map = self.map()?;
            match self.fs.open(&path, OpenMode::Read) {
                Ok(file) => return Ok((file, path)),
                // Evicted between the fetch and the open: forget that map (unless a newer
                // one replaced it) and fetch again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mut slot = self.map.write().unwrap_or_else(PoisonError::into_inner);
                    if slot.as_ref().is_some_and(|m| Arc::ptr_eq(m, &map)) {
                        *slot = None;
                    }
                }
                Err(e) => return Err(Error::io("opening the cold cache", &path)(e)),
            }
        }
        Err(Error::io("opening the cold cache", self.path.clone())(
            std::io::Error::other(
                "evicted again after each of three fetches: the cache is too small",
            ),
        ))
    }
}

/// The active segment as its one writer holds it: the shared handle (whose state is
/// [`SegState::Active`]), the only writer of its map, its in-memory index, and where the
/// next record goes.
#[derive(Debug)]
pub(crate) struct ActiveSegment {
    pub(crate) handle: Arc<SegmentHandle>,
    /// `None` only in a log opened read-only, which never commits.
    pub(crate) map_writer: Option<MapWriter>,
    pub(crate) index: ActiveIndex,
    /// The byte offset the next record is written at.
    pub(crate) write_offset: u64,
}

/// A segment just rolled: frozen in memory until the sealer writes its footer and sidecar.
#[derive(Debug)]
pub(crate) struct RolledSegment {
    pub(crate) handle: Arc<SegmentHandle>,
    pub(crate) index: Arc<ActiveIndex>,
    pub(crate) data_end: u64,
}

impl ActiveSegment {
    /// Whether `bytes` more fit below the footer page.
    pub(crate) fn fits(&self, bytes: u64) -> bool {
        self.write_offset + bytes <= self.handle.header.data_limit()
    }

    /// Replaces this segment with `next` as the active one, freezing this one's index and
    /// end in its shared state (readers go on reading it from memory until it is sealed).
    pub(crate) fn roll_into(&mut self, next: ActiveSegment) -> RolledSegment {
        assert!(
            next.handle.seq.0 == self.handle.seq.0 + 1,
            "segments roll in order"
        );
        assert_eq!(
            next.index.record_count(),
            0,
            "a new active segment is empty"
        );
        let old = std::mem::replace(self, next);
        let index = Arc::new(old.index);
        *old.handle
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = SegState::Frozen {
            index: Arc::clone(&index),
            data_end: old.write_offset,
        };
        RolledSegment {
            handle: old.handle,
            index,
            data_end: old.write_offset,
        }
    }
}
