//! Where the audit reads, a page at a time: a data directory (opened read-only) or a
//! running server, through the stream index and the attribute indexes either way.
//!
//! A page holds at most [`PAGE_EVENTS_MAX`] events and, as far as the events' sizes allow
//! telling in advance, about the page budget in bytes: a lookup through the attribute
//! indexes stops at the budget (`Query::max_bytes` locally, the server's frame remotely);
//! a stream page is sized on the largest event seen so far, starting small. Locally, the
//! sealed segments' mapped pages are let go of every [`RELEASE_EVERY`] events read, so
//! that resident memory does not grow with the part of the log read.

use anyhow::{Context, Result, bail};
use tally_engine::{Direction, EventView, Field, Log, Position, Query};
use tally_server::client::Client;
use tally_server::protocol::FindQuery;

use crate::support::open_read_only;

/// Most events asked for in one page.
pub const PAGE_EVENTS_MAX: usize = 1024;
/// Events asked for in the first page of a stream, before any event's size is known:
/// [`PAGE_EVENTS_MAX`] events of the largest size could be a gigabyte.
const FIRST_PAGE_EVENTS: usize = 16;
/// Events read between two releases of the segments' mapped pages
/// ([`Log::release_mapped_memory`]).
const RELEASE_EVERY: u64 = 4096;
/// Bytes counted for an event besides its strings and payload (the decoded event's fixed
/// fields and allocation).
const EVENT_OVERHEAD_BYTES: usize = 128;

/// The bytes an event read holds in memory, roughly.
pub fn event_bytes(e: &dyn EventView) -> usize {
    EVENT_OVERHEAD_BYTES
        + e.payload().len()
        + e.stream().len()
        + e.event_type().len()
        + e.aggregate_type().len()
        + e.correlation_id().len()
        + e.causation_id().len()
        + e.actor().len()
}

/// One page of events, and where the next one starts.
pub struct Page {
    pub events: Vec<Box<dyn EventView>>,
    /// The version (stream pages) or position (lookups) to ask for next.
    pub next: u64,
    /// Whether nothing is left after this page.
    pub end: bool,
}

enum Reader {
    Local(Log),
    Remote {
        rt: tokio::runtime::Runtime,
        client: Client,
    },
}

/// A data directory or a server, read in pages.
pub struct Source {
    reader: Reader,
    /// Bytes one page may hold.
    page_bytes: usize,
    /// The largest event seen so far, in [`event_bytes`].
    largest_event_bytes: usize,
    /// Events read since the mapped pages were last let go of.
    since_release: u64,
    /// Events read in all.
    pub events_read: u64,
}

impl Source {
    /// Opens `dir` read-only, or connects to the server at `server` (one of them).
    ///
    /// # Errors
    /// Neither or both given; what opening or connecting reports.
    pub fn open(
        dir: Option<&std::path::Path>,
        server: Option<&str>,
        page_bytes: usize,
    ) -> Result<Source> {
        let reader = match (dir, server) {
            (Some(dir), None) => Reader::Local(open_read_only(dir)?),
            (None, Some(addr)) => {
                let rt = crate::commands::remote::runtime()?;
                let client = rt.block_on(async {
                    Client::connect(addr)
                        .await
                        .with_context(|| format!("connecting to {addr}"))
                })?;
                Reader::Remote { rt, client }
            }
            _ => bail!("give a data directory or --server ADDR (one of them)"),
        };
        Ok(Source {
            reader,
            page_bytes: page_bytes.max(1),
            largest_event_bytes: 0,
            since_release: 0,
            events_read: 0,
        })
    }

    /// The version of `stream`'s last event, or `None` if it has none.
    ///
    /// # Errors
    /// What the log or the server reports.
    pub fn stream_head(&self, stream: &str) -> Result<Option<u64>> {
        Ok(match &self.reader {
            Reader::Local(log) => log.stream_info(stream)?.map(|i| i.last_version),
            Reader::Remote { rt, client } => rt
                .block_on(client.stream_info(stream))?
                .map(|i| i.last_version),
        })
    }

    /// Events of `stream` from version `from` on, in order.
    ///
    /// # Errors
    /// What the log or the server reports.
    pub fn stream_page(&mut self, stream: &str, from: u64) -> Result<Page> {
        let max = match self.largest_event_bytes {
            0 => FIRST_PAGE_EVENTS,
            n => (self.page_bytes / n).clamp(1, PAGE_EVENTS_MAX),
        };
        let page = match &self.reader {
            Reader::Local(log) => {
                let events = log.read_stream(stream, from, max, Direction::Forward)?;
                Page {
                    next: events.last().map_or(from, |e| e.version + 1),
                    end: events.len() < max,
                    events: boxed(events),
                }
            }
            Reader::Remote { rt, client } => {
                let max = u32::try_from(max).expect("PAGE_EVENTS_MAX fits a u32");
                let (events, next, end) =
                    rt.block_on(client.read_stream(stream, from, max, Direction::Forward))?;
                Page {
                    next,
                    end: end || events.is_empty(),
                    events: boxed(events),
                }
            }
        };
        self.read(&page)?;
        Ok(page)
    }

    /// Events whose `field` is `value`, from position `from` on, in order.
    ///
    /// # Errors
    /// What the log or the server reports.
    pub fn find_page(&mut self, field: Field, value: &str, from: u64) -> Result<Page> {
        let page = match &self.reader {
            Reader::Local(log) => {
                let q = Query::field(field, value)
                    .positions(Position(from)..Position(u64::MAX))
                    .limit(PAGE_EVENTS_MAX)
                    .max_bytes(self.page_bytes);
                let events = log.find(&q)?;
                // The lookup stops at the limit or once the bytes reach the budget;
                // short of both, it found everything there is.
                let bytes: usize = events.iter().map(|e| e.body().len()).sum();
                let full = events.len() >= q.limit || bytes >= q.max_bytes;
                Page {
                    next: events.last().map_or(from, |e| e.position.0 + 1),
                    end: !full || events.is_empty(),
                    events: boxed(events),
                }
            }
            Reader::Remote { rt, client } => {
                let q = FindQuery {
                    field: Some((field, value.to_owned())),
                    record_time: None,
                    event_time: None,
                    from,
                    max: u32::try_from(PAGE_EVENTS_MAX).expect("PAGE_EVENTS_MAX fits a u32"),
                };
                let (events, next, end) = rt.block_on(client.find(&q))?;
                if !end && next <= from {
                    bail!("the server's FIND did not advance from position {from}");
                }
                Page {
                    next,
                    end,
                    events: boxed(events),
                }
            }
        };
        self.read(&page)?;
        Ok(page)
    }

    /// Counts the events of a page read, and lets go of the mapped segment pages now and
    /// then.
    fn read(&mut self, page: &Page) -> Result<()> {
        let n = page.events.len() as u64;
        self.events_read += n;
        self.since_release += n;
        if let Some(largest) = page.events.iter().map(|e| event_bytes(&**e)).max() {
            self.largest_event_bytes = self.largest_event_bytes.max(largest);
        }
        if self.since_release >= RELEASE_EVERY {
            self.since_release = 0;
            if let Reader::Local(log) = &self.reader {
                log.release_mapped_memory()?;
            }
        }
        Ok(())
    }
}

fn boxed<E: EventView + 'static>(events: Vec<E>) -> Vec<Box<dyn EventView>> {
    events
        .into_iter()
        .map(|e| Box::new(e) as Box<dyn EventView>)
        .collect()
}
