//! One segment in detail, for the operator's `tally inspect`: what its header, footer and
//! index say, read through the storage seam.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::{PAGE_BYTES, Position, SegmentSeq, Timestamp};
use crate::index::SealedIndex;
use crate::log::{Direction, Log, SegmentInfo};
use crate::sys::OpenMode;

/// What a segment's index sidecar says.
#[derive(Clone, Debug)]
pub struct IndexSummary {
    /// The sidecar.
    pub file: PathBuf,
    /// Records it indexes.
    pub records: u64,
    /// Streams it names.
    pub streams: usize,
    /// Whether it covers the whole segment.
    pub complete: bool,
}

/// One segment in detail ([`Log::segment_detail`]).
#[derive(Clone, Debug)]
pub struct SegmentDetail {
    /// What [`Log::segments`] says of it.
    pub info: SegmentInfo,
    /// Its header, decoded and checked (`None` for a segment in the cold tier, whose header
    /// is in the cold manifest).
    pub header: Option<SegmentHeader>,
    /// Its footer, once sealed (`None` for a cold segment, and while active).
    pub footer: Option<SegmentFooter>,
    /// Record times of its first and last record: from the footer, the cold manifest, or
    /// the records of the active segment.
    pub record_times: Option<(Timestamp, Timestamp)>,
    /// Its index sidecar, when there is a usable one.
    pub index: Option<IndexSummary>,
}

fn read_page(log: &Log, path: &Path, at: u64) -> Result<Vec<u8>> {
    let fs = log.shared.fs();
    let f = fs
        .open(path, OpenMode::Read)
        .map_err(Error::io("open", path))?;
    let mut page = vec![0u8; PAGE_BYTES as usize];
    f.read_exact_at(&mut page, at)
        .map_err(Error::io("read", path))?;
    Ok(page)
}

fn corrupt(path: &Path, offset: u64, what: &str, e: crate::format::DecodeError) -> Error {
    Error::Corrupt {
        file: path.to_path_buf(),
        offset,
        position: None,
        detail: what.to_owned(),
        source: Some(e),
    }
}

impl Log {
    /// One segment in detail: its header and footer (decoded and checked), record times,
    /// and what its index sidecar says.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when the log has no segment `seq`; [`Error::Corrupt`] when
    /// its header or footer does not decode; I/O errors.
    pub fn segment_detail(&self, seq: SegmentSeq) -> Result<SegmentDetail> {
        let info = self
            .segments()
            .into_iter()
            .find(|s| s.seq == seq)
            .ok_or_else(|| Error::InvalidOptions {
                reason: format!("the log has no segment {seq}"),
            })?;
        let idx_path = info.path.with_extension("idx");
        let index = self
            .shared
            .fs()
            .read(&idx_path)
            .ok()
            .and_then(|b| SealedIndex::open(Arc::new(b)).ok())
            .map(|i| IndexSummary {
                file: idx_path,
                records: i.record_count(),
                streams: i.stream_count(),
                complete: i.is_complete(),
            });
        if info.cold.is_some() {
            return Ok(SegmentDetail {
                record_times: info.record_times,
                info,
                header: None,
                footer: None,
                index,
            });
        }
        let header = SegmentHeader::decode_page(&read_page(self, &info.path, 0)?)
            .map_err(|e| corrupt(&info.path, 0, "segment header", e))?;
        let footer = if info.sealed {
            let at = header.footer_offset();
            Some(
                SegmentFooter::decode_page(&read_page(self, &info.path, at)?)
                    .map_err(|e| corrupt(&info.path, at, "segment footer", e))?,
            )
        } else {
            None
        };
        let record_times = match &footer {
            Some(f) => Some((f.first_record_time, f.last_record_time)),
            None if info.record_count > 0 => {
                let first = self.read_all(info.base_position, 1, Direction::Forward)?;
                let last = Position(info.base_position.0 + info.record_count - 1);
                let last = self.read_all(last, 1, Direction::Forward)?;
                first
                    .first()
                    .zip(last.first())
                    .map(|(a, b)| (a.record_time, b.record_time))
            }
            None => None,
        };
        Ok(SegmentDetail {
            info,
            header: Some(header),
            footer,
            record_times,
            index,
        })
    }
}
