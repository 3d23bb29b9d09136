//! A segment of an open log: the active one being written, a rolled one waiting for its
//! seal, or a sealed one, as readers, the writer and the sealer share it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::error::{Error, Result};
use crate::format::SegmentSeq;
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::index::{ActiveIndex, SealedIndex};
use crate::sys::{MapWriter, OpenMode, SegmentMap};

/// One segment, as readers and the sealer see it.
#[derive(Debug)]
pub(crate) struct SegmentHandle {
    pub(crate) seq: SegmentSeq,
    pub(crate) path: PathBuf,
    /// The storage the segment's file is opened through.
    pub(crate) fs: crate::Storage,
    pub(crate) header: SegmentHeader,
    /// Mapped on first use for sealed segments, at activation for the active one.
    pub(crate) map: OnceLock<Arc<SegmentMap>>,
    pub(crate) state: RwLock<SegState>,
}

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
    /// The segment's map, mapping a sealed segment on first use.
    pub(crate) fn map(&self) -> Result<&Arc<SegmentMap>> {
        if let Some(m) = self.map.get() {
            return Ok(m);
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
        let file = self
            .fs
            .open(&self.path, OpenMode::Read)
            .map_err(Error::io("opening segment", &self.path))?;
        let map = SegmentMap::map_read_only(&*file, self.header.capacity, data_end)
            .map_err(Error::io("mapping segment", &self.path))?;
        let _ = self.map.set(map);
        Ok(self.map.get().expect("set above or by a racing reader"))
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
