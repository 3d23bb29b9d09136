//! The server: accepts connections, decodes requests, runs them against the engine, and
//! writes responses (docs/PROTOCOL.md).
//!
//! Shape:
//! - one tokio task per connection reads its frames and writes its responses and pushes; a
//!   connection may have `inflight_max` requests unanswered, and a request's slot is freed
//!   only when its response has been written to the socket, so a client that does not read
//!   its responses stops being read (backpressure, no unbounded queue);
//! - appends are submitted to the engine on the connection's task (ordering and hashing, a
//!   few microseconds); then one connection at a time leads a sync on its own task, which
//!   covers every append written before it whichever connection sent it (group commit),
//!   and announces it; the others wait for the announcement without blocking a thread
//!   and answer their appends, or lead the next sync;
//! - reads and proofs run on tokio's blocking pool;
//! - each subscription is a task that reads the log from its next position, in batches no
//!   larger than the client's remaining credit, with at most `SUB_FRAMES_QUEUED` frames
//!   waiting for the socket; when it has read everything it waits for the log to grow, so
//!   catch-up and live delivery are one loop and nothing is skipped or sent twice.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tally_engine::format::blob::BLOB_BYTES_MAX;
use tally_engine::format::envelope::EnvelopeRef;
use tally_engine::{
    AppendHandle, AppendRequest, AppendResult, Direction, Durability, Error as EngineError,
    EventData, ExpectedVersion, Log, Options, Position, Verify,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::protocol::{
    self, APPEND_EVENTS_MAX_DEFAULT, AppendPart, CONSUMER_EVENT_TYPE, CONSUMER_STREAM_PREFIX,
    ConsistencyResponse, ErrorCode, FRAME_BYTES_MAX_DEFAULT, FRAME_BYTES_MAX_FLOOR, Filter,
    HelloOk, LENGTH_BYTES, Limits, PROTOCOL_VERSION, ProofResponse, ProtocolError, Request,
    Response, SYSTEM_STREAM_PREFIX, ServerInfo, SubscribeFrom, SubscribeTarget, WireError, op,
};

/// The server's name and version, sent in HELLO and SERVER_INFO responses.
pub const SERVER_NAME: &str = concat!("tallyd/", env!("CARGO_PKG_VERSION"));
/// Events one read returns at most (fewer when the frame would exceed its limit).
pub const READ_EVENTS_MAX: u32 = 4096;
/// Records a filtered read or subscription examines per batch before it answers with what
/// it found (possibly nothing) and where to continue.
pub const FILTER_SCAN_WINDOW: u64 = 8192;
/// Events one subscription push carries at most.
pub const SUB_BATCH_MAX: u64 = 1024;
/// Reads (and proofs) of one connection that may run or wait for its socket at once.
pub const READS_QUEUED: usize = 8;
/// Push frames of one subscription that may wait for the socket.
pub const SUB_FRAMES_QUEUED: usize = 4;
/// Bytes the writer gathers from queued frames into one write.
const WRITE_BATCH_BYTES: usize = 256 << 10;

/// How a server runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The data directory.
    pub data: PathBuf,
    /// The address to listen on.
    pub listen: SocketAddr,
    /// Most open connections; more are refused with `TooManyConnections`.
    pub connections_max: usize,
    /// Unanswered requests per connection before the server stops reading it.
    pub inflight_max: u32,
    /// Subscriptions per connection.
    pub subscriptions_max: u32,
    /// Largest frame, either way.
    pub frame_bytes_max: u32,
    /// Events per append.
    pub append_events_max: u32,
    /// Time a new connection has to send HELLO.
    pub handshake_timeout: Duration,
    /// A connection with nothing in flight, no subscription and no frame for this long is
    /// closed.
    pub idle_timeout: Duration,
    /// How long a shutdown waits for in-flight requests and connections to finish.
    pub shutdown_timeout: Duration,
    /// Bytes of responses built and not yet written, over all connections (reads and
    /// subscription batches reserve their frame's room first and wait while it is used up).
    pub response_bytes_max: usize,
    /// Each connection's share of `response_bytes_max`.
    pub connection_response_bytes_max: usize,
    /// A connection that waits this long for response room while it holds at least half
    /// its share (it does not read its socket) gets `LimitExceeded` and is closed.
    pub response_wait: Duration,
    /// Bytes of unfinished blob uploads (BLOB_PUT) held in memory, over all connections;
    /// an upload that would pass it is refused with `LimitExceeded`.
    pub blob_upload_bytes_max: u64,
    /// Whether GOVERN may change policies and holds and apply retention. Off by default:
    /// until clients are authenticated (issue 17), any client could otherwise release a
    /// legal hold; reads of the rules and plans are always allowed.
    pub governance_changes: bool,
    /// How the log is opened (durability, segment size, recovery, checkpoints).
    pub options: Options,
}

impl Config {
    /// Defaults for everything but the data directory.
    #[must_use]
    pub fn new(data: impl Into<PathBuf>) -> Config {
        Config {
            data: data.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], protocol::DEFAULT_PORT)),
            connections_max: 10_000,
            inflight_max: 1024,
            subscriptions_max: 64,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            append_events_max: APPEND_EVENTS_MAX_DEFAULT,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(10),
            response_bytes_max: 256 << 20,
            connection_response_bytes_max: 64 << 20,
            response_wait: Duration::from_secs(30),
            blob_upload_bytes_max: 512 << 20,
            governance_changes: false,
            options: Options::default(),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            frame_bytes_max: self.frame_bytes_max,
            append_events_max: self.append_events_max,
            inflight_max: self.inflight_max,
            subscriptions_max: self.subscriptions_max,
        }
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The log could not be opened.
    #[error("opening the log in {}", dir.display())]
    Open {
        /// The data directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: EngineError,
    },
    /// The engine failed to close the log.
    #[error("closing the log")]
    Close(#[source] EngineError),
}

/// What every connection shares.
struct Ctx {
    log: Arc<Log>,
    cfg: Config,
    acks: std::sync::mpsc::Sender<Ack>,
    visible: Arc<watch::Sender<u64>>,
    shutdown: watch::Receiver<bool>,
    connections: AtomicU32,
    started: Instant,
    /// A connection is leading a sync on its task (see `settle_acks`).
    inline_leader: AtomicBool,
    /// Connections with appends waiting for a sync.
    waiting: std::sync::atomic::AtomicUsize,
    /// The runtime has at least two workers, so one may block in a sync.
    inline_leader_allowed: bool,
    /// The schema registry (`$schemas`), kept current by REGISTER_SCHEMA: the server is
    /// the log's only writer.
    schemas: std::sync::RwLock<Arc<tally_engine::schema::Registry>>,
    /// Held by a registration from before it reads the registry until it has replaced it,
    /// so that registrations run one at a time while appends keep reading the registry.
    registering: std::sync::Mutex<()>,
    /// Some registered schema asks for validation: appends are checked.
    validating: AtomicBool,
    /// The memory budget for responses not yet written.
    budget: Arc<crate::budget::Budget>,
    /// Bytes reserved by unfinished blob uploads (`Config::blob_upload_bytes_max`).
    blob_upload_bytes: Arc<AtomicU64>,
}

/// What a connection holds between its requests.
#[derive(Default)]
struct Session {
    /// Its subscriptions, by their SUBSCRIBE's request id.
    subs: HashMap<u32, SubControl>,
    /// Its unfinished blob upload.
    upload: Option<BlobUpload>,
}

/// A connection's blob upload in progress (BLOB_PUT), holding its bytes' reservation.
struct BlobUpload {
    total: u64,
    buf: Vec<u8>,
    _held: UploadReservation,
}

/// Bytes of [`Ctx::blob_upload_bytes`] an upload holds, given back when it ends.
struct UploadReservation {
    counter: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for UploadReservation {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A frame on its way to a connection's socket.
struct Outbound {
    frame: Vec<u8>,
    /// It answers a request (the connection's in-flight count drops when it is written).
    answers_request: bool,
    /// Released once written (a subscription's share of the queue).
    permit: Option<OwnedSemaphorePermit>,
    /// The frame's room in the memory budget, released once written.
    reserved: Option<crate::budget::Reserved>,
}

/// Where a response goes. Every request gets exactly one `Reply`, which sends exactly one
/// frame (or, for CREDIT, none) and so frees the request's in-flight slot; a reply
/// dropped unsent answers `Internal` rather than leaking the slot.
struct Reply {
    request_id: u32,
    opcode: u8,
    tx: mpsc::UnboundedSender<Outbound>,
    done: bool,
    /// Released when the response is written (a read's share of the connection's
    /// response bytes).
    permit: Option<OwnedSemaphorePermit>,
    /// The connection's part of the memory budget.
    budget: Arc<crate::budget::ConnBudget>,
    /// Room reserved for this response, kept until it is written.
    reserved: Option<crate::budget::Reserved>,
}

impl Reply {
    fn send(self, resp: &Response) {
        let mut out = Vec::with_capacity(64);
        resp.encode(self.opcode, self.request_id, &mut out);
        self.send_frame(out);
    }

    fn send_frame(mut self, frame: Vec<u8>) {
        self.done = true;
        let mut reserved = self.reserved.take();
        if let Some(r) = &mut reserved {
            r.shrink_to(frame.len());
        }
        // The connection may be gone; then there is nobody to tell.
        let _ = self.tx.send(Outbound {
            frame,
            answers_request: true,
            permit: self.permit.take(),
            reserved,
        });
    }

    fn error(self, e: WireError) {
        self.send(&Response::Error(e));
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let mut out = Vec::new();
            WireError::new(
                ErrorCode::Internal,
                "the request was dropped without an answer",
            )
            .encode(op::ERROR, self.request_id, &mut out);
            let _ = self.tx.send(Outbound {
                frame: out,
                answers_request: true,
                permit: None,
                reserved: None,
            });
        }
    }
}

/// The connection task's own output. Answers given on the task itself go straight into
/// the bytes it writes next instead of through its channel: a send on the channel wakes the
/// receiving task, and a task woken while it runs is put back on the runtime's queue when it
/// next waits, which wakes a second worker (an eventfd write and a futex) to run it there.
/// That cost a context switch and a CPU migration per request.
struct Here<'a> {
    out: &'a mut Vec<u8>,
    inflight: &'a mut u32,
    /// An append handed to the blocking pool because it would have blocked this worker
    /// (`defer_append`): the connection waits for it before its next request, so that its
    /// requests still take effect in order.
    deferred: &'a mut Option<tokio::task::JoinHandle<()>>,
}

impl Here<'_> {
    fn send(&mut self, mut reply: Reply, resp: &Response) {
        resp.encode(reply.opcode, reply.request_id, self.out);
        reply.done = true;
        *self.inflight -= 1;
    }

    fn error(&mut self, reply: Reply, e: WireError) {
        self.send(reply, &Response::Error(e));
    }

    /// Frees the slot without a response (CREDIT has none).
    fn no_response(&mut self, mut reply: Reply) {
        reply.done = true;
        *self.inflight -= 1;
    }
}

/// An append waiting for its acknowledgement on the ack thread.
struct Ack {
    handle: AppendHandle,
    reply: Reply,
    kind: AckKind,
}

/// The checkpoint stream of projection `name`, or why the name is refused.
fn projection_stream(name: &str) -> Result<String, WireError> {
    let stream = tally_engine::projection::checkpoint_stream(name);
    if name.is_empty() || tally_engine::format::envelope::check_stream_id(&stream).is_err() {
        return Err(WireError::new(
            ErrorCode::MalformedRequest,
            format!(
                "projection name must be 1 to {} bytes without control characters",
                tally_engine::format::envelope::STREAM_BYTES_MAX
                    - tally_engine::projection::CHECKPOINT_STREAM_PREFIX.len()
            ),
        ));
    }
    Ok(stream)
}

#[derive(Clone, Copy)]
enum AckKind {
    One,
    Multi,
    ConsumerCheckpoint,
}

/// Waits for an append's sync and returns its response.
fn ack_response(ctx_visible: &watch::Sender<u64>, log: &Log, ack: Ack) -> (Reply, Response) {
    let Ack {
        handle,
        reply,
        kind,
    } = ack;
    let resp = match handle.wait() {
        Ok(results) => {
            publish_visible(ctx_visible, log);
            append_response(kind, results)
        }
        Err(e) => Response::Error(engine_error(&e)),
    };
    (reply, resp)
}

fn append_response(kind: AckKind, mut results: Vec<AppendResult>) -> Response {
    match kind {
        AckKind::One => Response::Appended(results.remove(0)),
        AckKind::Multi => Response::AppendedMulti(results),
        AckKind::ConsumerCheckpoint => Response::CheckpointStored,
    }
}

fn publish_visible(visible: &watch::Sender<u64>, log: &Log) {
    let now = log.next_position().0;
    visible.send_if_modified(|v| {
        if now > *v {
            *v = now;
            true
        } else {
            false
        }
    });
}

/// The error response for an engine error.
#[must_use]
pub fn engine_error(e: &EngineError) -> WireError {
    let (code, wrong_version) = match e {
        EngineError::WrongExpectedVersion {
            stream,
            expected,
            actual,
        } => (
            ErrorCode::WrongExpectedVersion,
            Some((
                stream.clone(),
                protocol::expected_to_wire(*expected),
                *actual,
            )),
        ),
        EngineError::InvalidEvent { .. } => (ErrorCode::InvalidEvent, None),
        EngineError::InvalidAppend { .. } => (ErrorCode::InvalidAppend, None),
        EngineError::BatchTooLarge { .. } => (ErrorCode::BatchTooLarge, None),
        EngineError::PartialDuplicate { .. } => (ErrorCode::PartialDuplicate, None),
        EngineError::DuplicateEventId { .. } => (ErrorCode::DuplicateEventId, None),
        EngineError::Poisoned { .. } => (ErrorCode::Poisoned, None),
        EngineError::ReadOnly => (ErrorCode::ReadOnly, None),
        EngineError::Closed => (ErrorCode::ShuttingDown, None),
        EngineError::Corrupt { .. } | EngineError::Index { .. } => (ErrorCode::Corrupt, None),
        EngineError::Io { .. } => (ErrorCode::Io, None),
        EngineError::Proof(_) => (ErrorCode::ProofUnavailable, None),
        EngineError::Blob { .. } => (ErrorCode::BlobUnavailable, None),
        EngineError::SignatureRefused { .. } => (ErrorCode::SignatureRefused, None),
        EngineError::ErasureHeld { .. } => (ErrorCode::ErasureHeld, None),
        EngineError::Keys { .. } => (ErrorCode::Io, None),
        _ => (ErrorCode::Internal, None),
    };
    // The message names the cause chain, as the engine's errors keep their sources.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    WireError {
        code: code.as_u16(),
        message,
        wrong_version,
    }
}

/// A bound, not yet serving, server.
pub struct Server {
    listener: TcpListener,
    ctx: Arc<Ctx>,
    shutdown_tx: watch::Sender<bool>,
    ack_thread: std::thread::JoinHandle<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens (and recovers, or creates) the log and binds the listening socket. Must be
    /// called inside a tokio runtime.
    ///
    /// # Errors
    /// [`ServerError::Open`], [`ServerError::Bind`], [`ServerError::Config`].
    pub async fn bind(cfg: Config) -> Result<Server, ServerError> {
        if cfg.frame_bytes_max < FRAME_BYTES_MAX_FLOOR {
            return Err(ServerError::Config(format!(
                "frame_bytes_max must be at least {FRAME_BYTES_MAX_FLOOR} (one largest event)"
            )));
        }
        if cfg.inflight_max == 0 || cfg.append_events_max == 0 || cfg.connections_max == 0 {
            return Err(ServerError::Config(
                "inflight_max, append_events_max and connections_max must be at least 1".into(),
            ));
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let (dir, options) = (cfg.data.clone(), cfg.options.clone());
        // Both read files: on the blocking pool.
        let (log, registry) = tokio::task::spawn_blocking(move || {
            Log::open(&dir, options).map(|log| {
                let registry = tally_engine::schema::Registry::load(&log);
                (log, registry)
            })
        })
        .await
        .map_err(|e| ServerError::Config(format!("open task failed: {e}")))?
        .map_err(|source| ServerError::Open {
            dir: cfg.data.clone(),
            source,
        })?;
        let registry = registry.map_err(|e| {
            ServerError::Config(format!(
                "the schema registry ({}) does not load: {e}",
                tally_engine::schema::SCHEMA_STREAM
            ))
        })?;
        let report = log.recovery_report();
        tracing::info!(
            data = %cfg.data.display(),
            clean = report.clean,
            next_position = report.next_position.0,
            truncations = report.truncations.len(),
            records_scanned = report.records_scanned,
            "log open"
        );
        for t in &report.truncations {
            tracing::warn!(file = %t.file.display(), offset = t.offset, records = t.records, reason = %t.reason, "recovery cut a torn tail");
        }
        let log = Arc::new(log);
        let (acks, ack_rx) = std::sync::mpsc::channel::<Ack>();
        let visible = Arc::new(watch::channel(log.next_position().0).0);
        let (shutdown_tx, shutdown) = watch::channel(false);
        let budget = crate::budget::Budget::new(
            cfg.response_bytes_max,
            cfg.connection_response_bytes_max,
            cfg.response_wait,
        );
        let ctx = Arc::new(Ctx {
            log: Arc::clone(&log),
            cfg,
            acks,
            visible: Arc::clone(&visible),
            shutdown,
            connections: AtomicU32::new(0),
            started: Instant::now(),
            inline_leader: AtomicBool::new(false),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            inline_leader_allowed: {
                let rt = tokio::runtime::Handle::current();
                rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                    && rt.metrics().num_workers() >= 2
            },
            validating: AtomicBool::new(registry.validates() || registry.marks_personal()),
            budget,
            blob_upload_bytes: Arc::new(AtomicU64::new(0)),
            registering: std::sync::Mutex::new(()),
            schemas: std::sync::RwLock::new(Arc::new(registry)),
        });
        // The ack thread holds the log and the watch, not the context: the context holds
        // the channel's sender, and the thread ends when the last sender is dropped.
        let ack_log = Arc::clone(&log);
        let ack_thread = std::thread::Builder::new()
            .name("tallyd-ack".into())
            .spawn(move || {
                // Acknowledgements oldest first: when one returns, the sync that covered
                // it usually covered the next ones too.
                while let Ok(ack) = ack_rx.recv() {
                    let (reply, resp) = ack_response(&visible, &ack_log, ack);
                    reply.send(&resp);
                }
            })
            .map_err(|e| ServerError::Config(format!("cannot start the ack thread: {e}")))?;
        Ok(Server {
            listener,
            ctx,
            shutdown_tx,
            ack_thread,
        })
    }

    /// The address the server listens on.
    ///
    /// # Errors
    /// The socket's address cannot be read.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests
    /// finish (up to the shutdown timeout), ends subscriptions with `ShuttingDown`, and
    /// closes the log.
    ///
    /// # Errors
    /// [`ServerError::Close`] if the log could not be closed cleanly.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let Server {
            listener,
            ctx,
            shutdown_tx,
            ack_thread,
        } = self;
        let conn_slots = Arc::new(Semaphore::new(ctx.cfg.connections_max));
        let mut conns = JoinSet::new();
        // After a burst of large responses (a client that did not read, many large reads),
        // the freed memory goes back to the system instead of staying resident.
        // (It holds the budget alone: anything holding `ctx` would keep the ack thread's
        // channel open and the shutdown below waiting for it.)
        let trimmer = {
            let budget = Arc::clone(&ctx.budget);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(TRIM_POLL).await;
                    if budget.take_trim_due() {
                        let _ =
                            tokio::task::spawn_blocking(tally_engine::release_free_memory).await;
                        tracing::debug!("returned freed response memory to the system");
                    }
                }
            })
        };
        let _stop_trimmer = AbortOnDrop(trimmer);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        while conns.try_join_next().is_some() {}
                        let _ = stream.set_nodelay(true);
                        match Arc::clone(&conn_slots).try_acquire_owned() {
                            Ok(slot) => {
                                let ctx = Arc::clone(&ctx);
                                conns.spawn(async move {
                                    ctx.connections.fetch_add(1, Ordering::Relaxed);
                                    connection(&ctx, stream, peer).await;
                                    ctx.connections.fetch_sub(1, Ordering::Relaxed);
                                    drop(slot);
                                });
                            }
                            Err(_) => {
                                tracing::warn!(%peer, "refused: too many connections");
                                conns.spawn(refuse(stream));
                            }
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        }
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        drop(listener);
        let _ = shutdown_tx.send(true);
        let deadline = tokio::time::Instant::now() + ctx.cfg.shutdown_timeout;
        while !conns.is_empty() {
            match tokio::time::timeout_at(deadline, conns.join_next()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(left = conns.len(), "shutdown timeout: closing connections");
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                }
            }
        }
        // Every connection is gone; the ack thread ends once the last sender does, after
        // answering (or failing) what it holds.
        let log = Arc::clone(&ctx.log);
        drop(ctx);
        let ctx_wait = tokio::task::spawn_blocking(move || ack_thread.join());
        let _ = ctx_wait.await;
        // Blocking reads may still hold the log briefly.
        let mut log = log;
        let closed = loop {
            match Arc::try_unwrap(log) {
                Ok(l) => break Some(l),
                Err(l) if tokio::time::Instant::now() < deadline + Duration::from_secs(5) => {
                    log = l;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => break None,
            }
        };
        match closed {
            Some(l) => {
                tokio::task::spawn_blocking(move || l.close())
                    .await
                    .map_err(|e| ServerError::Config(format!("close task failed: {e}")))?
                    .map_err(ServerError::Close)?;
                tracing::info!("log closed");
            }
            None => tracing::warn!("log still in use after shutdown; it closes on exit"),
        }
        Ok(())
    }
}

async fn refuse(mut stream: TcpStream) {
    let mut out = Vec::new();
    WireError::new(
        ErrorCode::TooManyConnections,
        "the server has too many connections",
    )
    .encode(op::ERROR, 0, &mut out);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

/// Takes the next whole frame body off the front of `buf`, if there is one.
fn next_frame(buf: &mut BytesMut, frame_bytes_max: u32) -> Result<Option<BytesMut>, ProtocolError> {
    if buf.len() < LENGTH_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    protocol::check_frame_len(len, frame_bytes_max)?;
    let total = LENGTH_BYTES + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(LENGTH_BYTES);
    Ok(Some(buf.split_to(len as usize)))
}

/// Reads one frame body; `Ok(None)` on a clean end of stream.
async fn read_frame(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    frame_bytes_max: u32,
) -> Result<Option<BytesMut>, FrameReadError> {
    loop {
        if let Some(f) = next_frame(buf, frame_bytes_max).map_err(FrameReadError::Protocol)? {
            return Ok(Some(f));
        }
        buf.reserve(64 << 10);
        // `read_buf` is cancel-safe: a timeout never loses bytes.
        match rd.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(FrameReadError::Truncated),
            Ok(_) => {}
            Err(e) => return Err(FrameReadError::Io(e)),
        }
    }
}

#[derive(Debug)]
enum FrameReadError {
    Protocol(ProtocolError),
    Truncated,
    Io(std::io::Error),
}

/// A subscription as the connection sees it.
struct SubControl {
    credit: Arc<SubShared>,
    task: tokio::task::JoinHandle<()>,
}

struct SubShared {
    credit: AtomicU64,
    /// The request id of an UNSUBSCRIBE, plus one (0: none).
    unsubscribe: AtomicU64,
    ended: AtomicBool,
    /// With `ended`: stop without a SUB_ENDED (the client closed its side).
    quiet: AtomicBool,
    wake: Notify,
}

fn error_frame(out: &mut Vec<u8>, code: ErrorCode, message: impl Into<String>, request_id: u32) {
    WireError::new(code, message).encode(op::ERROR, request_id, out);
}

async fn connection(ctx: &Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let cfg = &ctx.cfg;
    let mut out = Vec::new();
    let hello = tokio::time::timeout(
        cfg.handshake_timeout,
        read_frame(
            &mut rd,
            &mut buf,
            cfg.frame_bytes_max.min(protocol::HELLO_FRAME_BYTES_MAX),
        ),
    )
    .await;
    let version = match hello {
        Err(_) => {
            error_frame(
                &mut out,
                ErrorCode::Timeout,
                "no HELLO within the handshake timeout",
                0,
            );
            None
        }
        Ok(Ok(Some(frame))) => handshake(ctx, &frame, &mut out),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            frame_error(&mut out, e);
            None
        }
    };
    if !out.is_empty() && wr.write_all(&out).await.is_err() {
        return;
    }
    match version {
        Some(version) => {
            tracing::debug!(%peer, version, "connection ready");
            serve(ctx, rd, wr, buf, version).await;
        }
        None => {
            let _ = wr.shutdown().await;
        }
    }
    tracing::debug!(%peer, "connection closed");
}

fn frame_error(out: &mut Vec<u8>, e: FrameReadError) {
    match e {
        FrameReadError::Protocol(p) => error_frame(out, p.code(), p.to_string(), 0),
        FrameReadError::Truncated => tracing::debug!("connection closed inside a frame"),
        FrameReadError::Io(e) => tracing::debug!(error = %e, "connection read failed"),
    }
}

fn handshake(ctx: &Ctx, frame: &[u8], out: &mut Vec<u8>) -> Option<u16> {
    let (h, payload) = match protocol::split_frame(frame) {
        Ok(x) => x,
        Err(e) => {
            error_frame(out, ErrorCode::MalformedRequest, e.to_string(), 0);
            return None;
        }
    };
    if h.opcode != op::HELLO {
        error_frame(
            out,
            ErrorCode::HandshakeRequired,
            format!(
                "the first frame must be HELLO (0x01), not 0x{:02x}",
                h.opcode
            ),
            h.request_id,
        );
        return None;
    }
    if h.flags != 0 {
        // Reserved, as on every frame (PROTOCOL.md section 2).
        error_frame(
            out,
            ErrorCode::MalformedRequest,
            format!("frame flags must be 0, got 0x{:02x}", h.flags),
            h.request_id,
        );
        return None;
    }
    let (min, max) = match Request::decode(h.opcode, payload, 0) {
        Ok(Request::Hello {
            min_version,
            max_version,
            ..
        }) => (min_version, max_version),
        Ok(_) => unreachable!("HELLO decodes to Hello"),
        Err(e) => {
            error_frame(out, e.code(), e.to_string(), h.request_id);
            return None;
        }
    };
    let version = max.min(PROTOCOL_VERSION);
    if version < min.max(1) {
        error_frame(
            out,
            ErrorCode::UnsupportedVersion,
            format!(
                "client speaks versions {min}..={max}; this server speaks 1..={PROTOCOL_VERSION}"
            ),
            h.request_id,
        );
        return None;
    }
    let ok = Response::Hello(HelloOk {
        version,
        server: SERVER_NAME.into(),
        log_id: ctx.log.log_id(),
        next_position: ctx.log.next_position().0,
        limits: ctx.cfg.limits(),
    });
    ok.encode(op::HELLO, h.request_id, out);
    Some(version)
}

/// Serves a connection after its handshake, on one task: it reads requests (up to
/// `inflight_max` unanswered, then it stops reading: backpressure), writes responses and
/// pushes that other tasks and threads queue for it, and leads the wait for its appends'
/// sync when no other connection is leading one (see [`Ctx::inline_leader`]).
async fn serve(
    ctx: &Arc<Ctx>,
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut buf: BytesMut,
    version: u16,
) {
    let cfg = &ctx.cfg;
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let mut session = Session::default();
    let mut shutdown = ctx.shutdown.clone();
    let mut inflight: u32 = 0;
    let mut out: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut held: Vec<OwnedSemaphorePermit> = Vec::new();
    let mut eof = false;
    let mut closing = false;
    let mut stopping_since: Option<tokio::time::Instant> = None;
    let mut said_goodbye = false;
    let mut last_activity = tokio::time::Instant::now();
    let mut pending: VecDeque<Ack> = VecDeque::new();
    let mut durable = ctx.visible.subscribe();
    let read_slots = Arc::new(Semaphore::new(READS_QUEUED));
    let budget = ctx.budget.connection();
    // What was written, with the budget room it held (released with `held`).
    let mut held_room: Vec<crate::budget::Reserved> = Vec::new();
    loop {
        if budget.is_exceeded() && !closing {
            error_frame(
                &mut out,
                ErrorCode::LimitExceeded,
                "this connection held more than its share of the server's response memory for too long: read your socket (see response_bytes_max)",
                0,
            );
            closing = true;
        }
        // 1. Every whole frame that has a slot.
        let mut acks = Vec::new();
        let mut deferred = None;
        while !closing && stopping_since.is_none() && inflight < cfg.inflight_max {
            let frame = match next_frame(&mut buf, cfg.frame_bytes_max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    error_frame(&mut out, e.code(), e.to_string(), 0);
                    closing = true;
                    break;
                }
            };
            inflight += 1;
            let (h, payload) = match protocol::split_frame(&frame) {
                Ok(x) => x,
                Err(e) => {
                    inflight -= 1;
                    error_frame(&mut out, e.code(), e.to_string(), 0);
                    closing = true;
                    break;
                }
            };
            if h.request_id == 0 {
                // Id 0 names the connection in an ERROR (PROTOCOL.md 2): an error about this
                // request would read as a connection-level error, so it is one.
                inflight -= 1;
                error_frame(
                    &mut out,
                    ErrorCode::MalformedRequest,
                    "request id 0 is reserved for the HELLO and for connection-level errors",
                    0,
                );
                closing = true;
                break;
            }
            let reply = Reply {
                request_id: h.request_id,
                opcode: h.opcode,
                tx: tx.clone(),
                done: false,
                permit: None,
                budget: Arc::clone(&budget),
                reserved: None,
            };
            let mut here = Here {
                out: &mut out,
                inflight: &mut inflight,
                deferred: &mut deferred,
            };
            if h.flags != 0 {
                // Reserved: refused now so that they can be given a meaning later.
                here.error(
                    reply,
                    WireError::new(
                        ErrorCode::MalformedRequest,
                        format!("frame flags must be 0, got 0x{:02x}", h.flags),
                    ),
                );
                continue;
            }
            match Request::decode(h.opcode, payload, cfg.append_events_max) {
                // The frame was whole, so the stream is still in step: answer and go on.
                Err(e) => here.error(reply, WireError::new(e.code(), e.to_string())),
                Ok(req) => acks.extend(handle(
                    ctx,
                    req,
                    reply,
                    &mut here,
                    &mut session,
                    &read_slots,
                    version,
                )),
            }
            if deferred.is_some() {
                break;
            }
        }
        // An append that would have blocked this worker runs on the blocking pool; the
        // connection's next request waits for it (its answer goes out through `tx`).
        if let Some(task) = deferred.take() {
            let _ = task.await;
        }
        // 2. Appends waiting for their sync.
        if !acks.is_empty() || !pending.is_empty() {
            // Seen before checking, so that an announcement after the check wakes us.
            durable.borrow_and_update();
            let was_waiting = !pending.is_empty();
            pending.extend(acks);
            let mut here = Here {
                out: &mut out,
                inflight: &mut inflight,
                deferred: &mut deferred,
            };
            answer_synced(ctx, &mut pending, &mut here);
            if !pending.is_empty()
                && ctx.inline_leader_allowed
                && !ctx.inline_leader.load(Ordering::Acquire)
                && ctx.waiting.load(Ordering::Relaxed) > usize::from(was_waiting)
            {
                // Other connections wait for syncs too, and some may have been woken by
                // the last announcement: before blocking this worker for the next sync,
                // let them answer (and write) what it covered.
                tokio::task::yield_now().await;
                here = Here {
                    out: &mut out,
                    inflight: &mut inflight,
                    deferred: &mut deferred,
                };
                answer_synced(ctx, &mut pending, &mut here);
            }
            settle_acks(ctx, &mut pending, &mut here);
            match (was_waiting, pending.is_empty()) {
                (false, false) => {
                    ctx.waiting.fetch_add(1, Ordering::Relaxed);
                }
                (true, true) => {
                    ctx.waiting.fetch_sub(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        // 3. What is queued for the socket, up to a batch, then one write.
        while out.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(o) => take(&mut out, &mut inflight, &mut held, &mut held_room, o),
                Err(_) => break,
            }
        }
        if !out.is_empty() {
            // A client that does not read its socket blocks this write; the budget wakes it
            // when that client has held too much for too long, and the connection ends.
            let written = {
                let mut write = std::pin::pin!(wr.write_all(&out));
                loop {
                    tokio::select! {
                        r = &mut write => break r.is_ok(),
                        () = budget.notify.notified() => {
                            if budget.is_exceeded() {
                                break false;
                            }
                        }
                    }
                }
            };
            if !written {
                break;
            }
            out.clear();
            if out.capacity() > 4 * WRITE_BATCH_BYTES {
                out = Vec::with_capacity(WRITE_BATCH_BYTES);
            }
            held.clear();
            held_room.clear();
            last_activity = tokio::time::Instant::now();
        }
        if closing {
            break;
        }
        let stopping = *shutdown.borrow() || eof;
        if stopping && stopping_since.is_none() {
            stopping_since = Some(tokio::time::Instant::now());
            // A shutdown ends subscriptions with SUB_ENDED ShuttingDown; a client that
            // closed its side gets nothing more pushed.
            let quiet = !*shutdown.borrow();
            for s in session.subs.values() {
                s.credit.quiet.store(quiet, Ordering::SeqCst);
                s.credit.ended.store(true, Ordering::SeqCst);
                s.credit.wake.notify_one();
            }
        }
        if let Some(since) = stopping_since {
            session.subs.retain(|_, s| !s.task.is_finished());
            let timed_out = since.elapsed() > cfg.shutdown_timeout;
            if (inflight == 0 && session.subs.is_empty()) || timed_out {
                if *shutdown.borrow() && !said_goodbye {
                    // Last, after every answer and push already queued.
                    said_goodbye = true;
                    while let Ok(o) = rx.try_recv() {
                        take(&mut out, &mut inflight, &mut held, &mut held_room, o);
                    }
                    let why = if timed_out && inflight > 0 {
                        "the server is shutting down and stopped waiting for requests in flight: those without an answer may or may not have been executed"
                    } else {
                        "the server is shutting down: it answered every request it read; later ones were not read or executed"
                    };
                    error_frame(&mut out, ErrorCode::ShuttingDown, why, 0);
                    continue;
                }
                break;
            }
        }
        // 4. Wait for bytes, something to write, a shutdown, or the idle timer.
        let can_read = stopping_since.is_none() && inflight < cfg.inflight_max;
        if can_read {
            buf.reserve(64 << 10);
        }
        let idle_at = last_activity + cfg.idle_timeout;
        tokio::select! {
            r = rd.read_buf(&mut buf), if can_read => match r {
                Ok(0) => {
                    if !buf.is_empty() {
                        tracing::debug!("connection closed inside a frame");
                    }
                    eof = true;
                }
                Ok(_) => last_activity = tokio::time::Instant::now(),
                Err(e) => {
                    tracing::debug!(error = %e, "connection read failed");
                    eof = true;
                }
            },
            Some(o) = rx.recv() => take(&mut out, &mut inflight, &mut held, &mut held_room, o),
            () = budget.notify.notified() => {}
            // Another connection's sync was announced: ours may be covered, or it is our
            // turn to lead. The timer guards against an announcement that never comes.
            _ = durable.changed(), if !pending.is_empty() => {}
            () = tokio::time::sleep(Duration::from_millis(2)), if !pending.is_empty() => {}
            _ = shutdown.changed(), if stopping_since.is_none() => {}
            () = tokio::time::sleep_until(idle_at), if stopping_since.is_none() => {
                session.subs.retain(|_, s| !s.task.is_finished());
                if inflight == 0 && session.subs.is_empty() {
                    error_frame(&mut out, ErrorCode::Timeout, "idle timeout", 0);
                    closing = true;
                } else {
                    last_activity = tokio::time::Instant::now();
                }
            }
            () = tokio::time::sleep(Duration::from_millis(100)), if stopping_since.is_some() => {}
        }
    }
    if !pending.is_empty() {
        ctx.waiting.fetch_sub(1, Ordering::Relaxed);
    }
    for s in session.subs.values() {
        s.credit.ended.store(true, Ordering::SeqCst);
        s.credit.wake.notify_one();
    }
    let _ = wr.shutdown().await;
}

fn take(
    out: &mut Vec<u8>,
    inflight: &mut u32,
    held: &mut Vec<OwnedSemaphorePermit>,
    held_room: &mut Vec<crate::budget::Reserved>,
    o: Outbound,
) {
    if out.is_empty() {
        // A large read response is written as it is, not copied.
        *out = o.frame;
    } else {
        out.extend_from_slice(&o.frame);
    }
    if o.answers_request {
        *inflight -= 1;
    }
    held.extend(o.permit);
    held_room.extend(o.reserved);
}

/// Answers the appends of `pending` whose sync is done; when some are not and no other
/// connection is leading a sync, leads one on this task (no cross-thread hand-off on the
/// way to the sync or back) and answers them all. Otherwise the connection waits for the
/// leader's announcement on `Ctx::visible` (see `serve`) and comes back here. On a runtime
/// with one worker, the ack thread waits instead.
/// Clears the leader flag when dropped, even if the wait panicked: a flag left set would
/// stop every later sync led by a connection.
struct StepDown<'a>(&'a AtomicBool);

impl Drop for StepDown<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Answers the appends at the front of `pending` whose sync is done.
fn answer_synced(ctx: &Arc<Ctx>, pending: &mut VecDeque<Ack>, here: &mut Here<'_>) {
    while pending.front().is_some_and(|a| a.handle.is_done()) {
        if let Some(a) = pending.pop_front() {
            let (reply, resp) = ack_response(&ctx.visible, &ctx.log, a);
            here.send(reply, &resp);
        }
    }
}

fn settle_acks(ctx: &Arc<Ctx>, pending: &mut VecDeque<Ack>, here: &mut Here<'_>) {
    answer_synced(ctx, pending, here);
    if pending.is_empty() {
        return;
    }
    if !ctx.inline_leader_allowed {
        for ack in pending.drain(..) {
            if let Err(std::sync::mpsc::SendError(ack)) = ctx.acks.send(ack) {
                // The ack thread is gone only after every connection ended; answer here.
                let (reply, resp) = ack_response(&ctx.visible, &ctx.log, ack);
                here.send(reply, &resp);
            }
        }
        return;
    }
    if ctx
        .inline_leader
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    // Waiting for the last covers the earlier ones (durability is a prefix), and the
    // sync this leads covers every append written before it, from any connection.
    //
    // The wait blocks this runtime worker. That is deliberate: at most one connection
    // leads at a time, so at most one worker is blocked, and the runtime has at least two
    // (`inline_leader_allowed`), whose other workers take this one's queued tasks. Handing
    // the worker off first (`block_in_place`) measured 20 us slower per sync and put 10 ms
    // stalls into the 99.9th percentile.
    let acks: Vec<Ack> = pending.drain(..).collect();
    let step_down = StepDown(&ctx.inline_leader);
    let done: Vec<_> = acks
        .into_iter()
        .map(|a| (a.handle.wait(), a.reply, a.kind))
        .collect();
    // Step down before announcing, so that a follower woken by the announcement whose
    // appends this sync did not cover can lead the next one.
    drop(step_down);
    publish_visible(&ctx.visible, &ctx.log);
    for (r, reply, kind) in done {
        match r {
            Ok(results) => here.send(reply, &append_response(kind, results)),
            Err(e) => here.error(reply, engine_error(&e)),
        }
    }
}

fn reserved(stream: &str) -> bool {
    stream.starts_with(SYSTEM_STREAM_PREFIX)
}

#[must_use]
fn handle(
    ctx: &Arc<Ctx>,
    req: Request,
    reply: Reply,
    here: &mut Here<'_>,
    session: &mut Session,
    read_slots: &Arc<Semaphore>,
    version: u16,
) -> Option<Ack> {
    let subs = &mut session.subs;
    match req {
        Request::BlobPut {
            offset,
            total,
            chunk,
        } => blob_put(
            ctx,
            &mut session.upload,
            (offset, total, &chunk),
            reply,
            here,
        ),
        Request::Hello { .. } => here.error(
            reply,
            WireError::new(
                ErrorCode::MalformedRequest,
                "HELLO was already received on this connection",
            ),
        ),
        Request::Ping(b) => here.send(reply, &Response::Pong(b)),
        Request::ServerInfo => {
            let log = &ctx.log;
            let info = ServerInfo {
                server: SERVER_NAME.into(),
                protocol_version: version,
                log_id: log.log_id(),
                next_position: log.next_position().0,
                segments: log.segments().len() as u64,
                connections: ctx.connections.load(Ordering::Relaxed),
                uptime_ms: ctx.started.elapsed().as_millis() as u64,
                durability: durability_code(ctx.cfg.options.durability),
                checkpoints: log.checkpoint_count() as u64,
            };
            here.send(reply, &Response::ServerInfo(info));
        }
        Request::Append(part) => {
            return append(
                ctx,
                std::slice::from_ref(&part),
                None,
                reply,
                here,
                AckKind::One,
            );
        }
        Request::AppendMulti(parts) => {
            return append(ctx, &parts, None, reply, here, AckKind::Multi);
        }
        Request::AppendSigned { parts, signature } => {
            return append(ctx, &parts, Some(&signature), reply, here, AckKind::Multi);
        }
        Request::CheckpointStore { name, position } => {
            let Some(stream) = consumer_stream(&name) else {
                return early(
                    here,
                    reply,
                    WireError::new(
                        ErrorCode::MalformedRequest,
                        format!(
                            "consumer name must be 1 to 200 bytes without control characters, got {} bytes",
                            name.len()
                        ),
                    ),
                );
            };
            let part = AppendPart {
                stream,
                expected: ExpectedVersion::Any,
                events: vec![EventData::new(
                    CONSUMER_EVENT_TYPE,
                    position.to_le_bytes().to_vec(),
                )],
            };
            return submit(
                ctx,
                std::slice::from_ref(&part),
                None,
                reply,
                here,
                AckKind::ConsumerCheckpoint,
                Validate::No,
            );
        }
        Request::ProjectionStore {
            name,
            next,
            state_version,
            state,
        } => {
            let stream = match projection_stream(&name) {
                Ok(s) => s,
                Err(e) => return early(here, reply, e),
            };
            let part = AppendPart {
                stream,
                expected: ExpectedVersion::Any,
                events: vec![EventData::new(
                    tally_engine::projection::CHECKPOINT_EVENT_TYPE,
                    tally_engine::projection::encode_checkpoint_payload(
                        next,
                        state_version,
                        &state,
                    ),
                )],
            };
            return submit(
                ctx,
                std::slice::from_ref(&part),
                None,
                reply,
                here,
                AckKind::ConsumerCheckpoint,
                Validate::No,
            );
        }
        Request::ProjectionAppend {
            name,
            manifest,
            payload,
        } => {
            let stream = match projection_stream(&name) {
                Ok(s) => s,
                Err(e) => return early(here, reply, e),
            };
            let event_type = if manifest {
                // A manifest that does not decode would only be passed over by every load:
                // refuse it here, with the reason.
                if let Err(e) = tally_engine::state_store::Manifest::decode(&payload) {
                    return early(
                        here,
                        reply,
                        WireError::new(ErrorCode::MalformedRequest, e.to_string()),
                    );
                }
                tally_engine::state_store::MANIFEST_EVENT_TYPE
            } else {
                tally_engine::state_store::PART_EVENT_TYPE
            };
            let part = AppendPart {
                stream,
                expected: ExpectedVersion::Any,
                events: vec![EventData::new(event_type, payload)],
            };
            return submit(
                ctx,
                std::slice::from_ref(&part),
                None,
                reply,
                here,
                AckKind::One,
                Validate::No,
            );
        }
        Request::Subscribe {
            target,
            from,
            credit,
        } => {
            subs.retain(|_, s| !s.task.is_finished());
            if subs.len() >= ctx.cfg.subscriptions_max as usize {
                return early(
                    here,
                    reply,
                    WireError::new(
                        ErrorCode::TooManySubscriptions,
                        format!(
                            "a connection may have {} subscriptions",
                            ctx.cfg.subscriptions_max
                        ),
                    ),
                );
            }
            if subs.contains_key(&reply.request_id) {
                return early(
                    here,
                    reply,
                    WireError::new(
                        ErrorCode::MalformedRequest,
                        "a subscription with this request id is active",
                    ),
                );
            }
            if let SubscribeTarget::Stream(s) = &target
                && let Err(e) = tally_engine::format::envelope::check_stream_id(s)
            {
                return early(
                    here,
                    reply,
                    WireError::new(ErrorCode::MalformedRequest, e.to_string()),
                );
            }
            // "Now" is when the request is read, not when its task first runs: an append
            // pipelined right after it must be delivered.
            let start = match (&target, from) {
                (_, SubscribeFrom::At(p)) => p,
                (SubscribeTarget::All(_), SubscribeFrom::Now) => ctx.log.next_position().0,
                (SubscribeTarget::Stream(s), SubscribeFrom::Now) => match ctx.log.stream_info(s) {
                    Ok(i) => i.map_or(0, |i| i.last_version + 1),
                    Err(e) => return early(here, reply, engine_error(&e)),
                },
            };
            let shared = Arc::new(SubShared {
                credit: AtomicU64::new(u64::from(credit)),
                unsubscribe: AtomicU64::new(0),
                ended: AtomicBool::new(false),
                quiet: AtomicBool::new(false),
                wake: Notify::new(),
            });
            let id = reply.request_id;
            let task = tokio::spawn(subscription(
                Arc::clone(ctx),
                target,
                start,
                Arc::clone(&shared),
                reply,
            ));
            subs.insert(
                id,
                SubControl {
                    credit: shared,
                    task,
                },
            );
        }
        Request::Credit {
            subscription,
            credit,
        } => {
            // CREDIT has no response; its permit is released now. Credit for a
            // subscription that has ended is ignored (it may have crossed the end).
            if let Some(s) = subs.get(&subscription) {
                let _ = s
                    .credit
                    .credit
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                        Some(c.saturating_add(u64::from(credit)).min(u64::from(u32::MAX)))
                    });
                s.credit.wake.notify_one();
            }
            here.no_response(reply);
        }
        Request::Unsubscribe { subscription } => match subs.remove(&subscription) {
            Some(s) if !s.task.is_finished() => {
                // The subscription's task answers, after its last push.
                s.credit
                    .unsubscribe
                    .store(u64::from(reply.request_id) + 1, Ordering::SeqCst);
                s.credit.wake.notify_one();
                tokio::spawn(async move {
                    let _ = s.task.await;
                    reply.send(&Response::Unsubscribed);
                });
            }
            _ => here.error(
                reply,
                WireError::new(
                    ErrorCode::UnknownSubscription,
                    format!("no active subscription {subscription} on this connection"),
                ),
            ),
        },
        req => {
            // At most READS_QUEUED reads of a connection run or wait for its socket at
            // once: a client that pipelines many large reads and does not read its socket
            // holds a bounded number of response bytes.
            let ctx = Arc::clone(ctx);
            let slots = Arc::clone(read_slots);
            tokio::spawn(async move {
                let mut reply = reply;
                match slots.acquire_owned().await {
                    Ok(p) => reply.permit = Some(p),
                    Err(_) => return,
                }
                // Room for the largest frame the answer can be, shrunk to its size once
                // built; a connection over its share waits (or, not reading, is closed).
                let budget = Arc::clone(&reply.budget);
                match budget
                    .reserve(ctx.cfg.frame_bytes_max as usize + 1024)
                    .await
                {
                    Ok(r) => reply.reserved = Some(r),
                    Err(_exceeded) => {
                        return reply.error(WireError::new(
                            ErrorCode::LimitExceeded,
                            "this connection holds more than its share of the server's response memory",
                        ));
                    }
                }
                let _ =
                    tokio::task::spawn_blocking(move || blocking_request(&ctx, req, reply)).await;
            });
        }
    }
    None
}

/// One piece of a blob upload: kept in the connection's upload until the last, which
/// stores the blob on the blocking pool and answers with its reference.
fn blob_put(
    ctx: &Arc<Ctx>,
    upload: &mut Option<BlobUpload>,
    (offset, total, chunk): (u64, u64, &[u8]),
    reply: Reply,
    here: &mut Here<'_>,
) {
    let malformed = |here: &mut Here<'_>, reply, m: String| {
        here.error(reply, WireError::new(ErrorCode::MalformedRequest, m));
    };
    if offset == 0 {
        // A new upload replaces an unfinished one (its bytes are given back).
        *upload = None;
        if total == 0 || total > BLOB_BYTES_MAX {
            return here.error(
                reply,
                WireError::new(
                    ErrorCode::LimitExceeded,
                    format!("a blob holds 1 to {BLOB_BYTES_MAX} bytes, not {total}"),
                ),
            );
        }
        if let Err(e) = ctx.log.accepts_blobs() {
            return here.error(reply, engine_error(&e));
        }
        let max = ctx.cfg.blob_upload_bytes_max;
        let counter = Arc::clone(&ctx.blob_upload_bytes);
        if counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(total).filter(|&n| n <= max)
            })
            .is_err()
        {
            return here.error(
                reply,
                WireError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the server holds unfinished blob uploads up to {max} bytes; an upload of {total} does not fit now"
                    ),
                ),
            );
        }
        // Given back when the upload ends, however it ends.
        let held = UploadReservation {
            counter,
            bytes: total,
        };
        // The whole blob's room at once (reserved above, and at most BLOB_BYTES_MAX): grown
        // piece by piece, the buffer would take up to twice that while it doubles.
        let mut buf = Vec::new();
        if buf.try_reserve_exact(total as usize).is_err() {
            return here.error(
                reply,
                WireError::new(
                    ErrorCode::LimitExceeded,
                    format!("the server cannot hold an upload of {total} bytes now"),
                ),
            );
        }
        *upload = Some(BlobUpload {
            total,
            buf,
            _held: held,
        });
    }
    let Some(u) = upload.as_mut() else {
        return malformed(
            here,
            reply,
            format!(
                "no blob upload on this connection continues at offset {offset}: start one at offset 0"
            ),
        );
    };
    let received = u.buf.len() as u64;
    if u.total != total || offset != received {
        return malformed(
            here,
            reply,
            format!(
                "the upload of {} bytes continues at offset {received}, not at {offset} of {total}",
                u.total
            ),
        );
    }
    if chunk.len() as u64 > total - received {
        return malformed(
            here,
            reply,
            format!(
                "a piece of {} bytes at offset {offset} passes the blob's {total} bytes",
                chunk.len()
            ),
        );
    }
    u.buf.extend_from_slice(chunk);
    let received = u.buf.len() as u64;
    if received < total {
        return here.send(
            reply,
            &Response::BlobPut {
                received,
                blob: None,
            },
        );
    }
    let Some(done) = upload.take() else {
        return;
    };
    let log = Arc::clone(&ctx.log);
    tokio::spawn(async move {
        let _ = tokio::task::spawn_blocking(move || {
            // The upload's bytes are shared with the store's request, not copied: a blob is
            // in memory once. The reservation lasts until they are stored.
            let BlobUpload { buf, _held, .. } = done;
            let buf = Arc::new(buf);
            match log.put_blob_shared(&buf) {
                Ok(b) => reply.send(&Response::BlobPut {
                    received: b.size,
                    blob: Some(b),
                }),
                Err(e) => reply.error(engine_error(&e)),
            }
            drop((buf, _held));
        })
        .await;
    });
}

/// Answers with an error and returns no ack.
fn early(here: &mut Here<'_>, reply: Reply, e: WireError) -> Option<Ack> {
    here.error(reply, e);
    None
}

fn consumer_stream(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return None;
    }
    Some(format!("{CONSUMER_STREAM_PREFIX}{name}"))
}

#[must_use]
fn append(
    ctx: &Arc<Ctx>,
    parts: &[AppendPart],
    signature: Option<&tally_engine::format::producer::ProducerSignature>,
    reply: Reply,
    here: &mut Here<'_>,
    kind: AckKind,
) -> Option<Ack> {
    if let Some(p) = parts.iter().find(|p| reserved(&p.stream)) {
        here.error(reply, WireError::new(
            ErrorCode::ReservedStream,
            format!(
                "stream {:?}: names starting with {SYSTEM_STREAM_PREFIX:?} are the server's own",
                p.stream
            ),
        ));
        return None;
    }
    if !ctx.validating.load(Ordering::Acquire) {
        return submit(ctx, parts, signature, reply, here, kind, Validate::Yes);
    }
    // Checked and submitted under the read lock, so that a registration (which takes the
    // write lock to place its event in the log) is either before this append, and checks
    // it, or after it. A registration placing its event now would block this worker.
    let registry = match ctx.schemas.try_read() {
        Ok(r) => r,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            defer_append(ctx, parts, signature, reply, here, kind, Validate::Yes);
            return None;
        }
    };
    match check_schemas(&registry, parts) {
        Err(e) => {
            here.error(reply, e);
            return None;
        }
        Ok(Some(marked)) => {
            // Personal data to seal: the key store is I/O, so the append goes to the
            // blocking pool (which applies the registry again, to the same result).
            drop(registry);
            defer_append(ctx, &marked, signature, reply, here, kind, Validate::Yes);
            return None;
        }
        Ok(None) => {}
    }
    let ack = submit(ctx, parts, signature, reply, here, kind, Validate::Yes);
    drop(registry);
    ack
}

/// Whether an append's events are checked against the schema registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Validate {
    /// A client's events: checked when the registry validates.
    Yes,
    /// The server's own (consumer and projection checkpoints): never.
    No,
}

/// Checks every event against the registry, and marks the personal data its schema marks
/// (FORMAT.md 6.6): `Some` parts with the marks when any event has some.
fn check_schemas(
    registry: &tally_engine::schema::Registry,
    parts: &[AppendPart],
) -> Result<Option<Vec<AppendPart>>, WireError> {
    let violation = |stream: &str, i: usize, err: tally_engine::schema::SchemaError| {
        WireError::new(
            ErrorCode::SchemaViolation,
            format!("stream {stream:?}, event {i}: {err}"),
        )
    };
    let mut marked: Option<Vec<AppendPart>> = None;
    for (pi, p) in parts.iter().enumerate() {
        for (i, e) in p.events.iter().enumerate() {
            registry
                .check(e)
                .map_err(|err| violation(&p.stream, i, err))?;
            if let Some(personal) = registry
                .personal_for(e)
                .map_err(|err| violation(&p.stream, i, err))?
            {
                let m = marked.get_or_insert_with(|| parts.to_vec());
                m[pi].events[i].personal = Some(personal);
            }
        }
    }
    Ok(marked)
}

/// Submits an append without blocking this worker; returns it if it still waits for its
/// sync. An append that would block (a roll waiting for its spare segment, a lock held
/// across slow work) goes to the blocking pool instead ([`defer_append`]).
#[must_use]
fn submit(
    ctx: &Arc<Ctx>,
    parts: &[AppendPart],
    signature: Option<&tally_engine::format::producer::ProducerSignature>,
    reply: Reply,
    here: &mut Here<'_>,
    kind: AckKind,
    validate: Validate,
) -> Option<Ack> {
    match ctx
        .log
        .try_append_deferred_multi(&requests(parts), signature)
    {
        Err(EngineError::WouldBlock) => {
            defer_append(ctx, parts, signature, reply, here, kind, validate);
            None
        }
        Err(e) => {
            here.error(reply, engine_error(&e));
            None
        }
        Ok(handle) if handle.is_done() => {
            let (reply, resp) = ack_response(
                &ctx.visible,
                &ctx.log,
                Ack {
                    handle,
                    reply,
                    kind,
                },
            );
            here.send(reply, &resp);
            None
        }
        Ok(handle) => Some(Ack {
            handle,
            reply,
            kind,
        }),
    }
}

/// The engine's view of an append's parts.
fn requests(parts: &[AppendPart]) -> Vec<AppendRequest<'_>> {
    parts
        .iter()
        .map(|p| AppendRequest {
            stream: &p.stream,
            expected: p.expected,
            events: &p.events,
        })
        .collect()
}

/// Makes an append that would have blocked a runtime worker on the blocking pool, where it
/// may wait, and has the connection wait for it before its next request.
fn defer_append(
    ctx: &Arc<Ctx>,
    parts: &[AppendPart],
    signature: Option<&tally_engine::format::producer::ProducerSignature>,
    reply: Reply,
    here: &mut Here<'_>,
    kind: AckKind,
    validate: Validate,
) {
    let ctx = Arc::clone(ctx);
    let parts = parts.to_vec();
    let signature = signature.copied();
    let task = tokio::task::spawn_blocking(move || {
        let registry =
            (validate == Validate::Yes && ctx.validating.load(Ordering::Acquire)).then(|| {
                ctx.schemas
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            });
        let mut parts = parts;
        if let Some(registry) = &registry {
            match check_schemas(registry, &parts) {
                Err(e) => return reply.error(e),
                Ok(Some(marked)) => parts = marked,
                Ok(None) => {}
            }
        }
        let reqs = requests(&parts);
        let submitted = match &signature {
            Some(sig) => ctx.log.append_deferred_multi_signed(&reqs, sig),
            None => ctx.log.append_deferred_multi(&reqs),
        };
        drop(registry);
        match submitted.and_then(AppendHandle::wait) {
            Ok(results) => {
                publish_visible(&ctx.visible, &ctx.log);
                reply.send(&append_response(kind, results));
            }
            Err(e) => reply.error(engine_error(&e)),
        }
    });
    *here.deferred = Some(task);
}

/// How often the server looks whether a burst of response memory ended.
const TRIM_POLL: Duration = Duration::from_secs(1);

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Events read from the log at a time while a read response is built.
const READ_CHUNK: usize = 64;

/// Requests that read files: run on the blocking pool.
fn blocking_request(ctx: &Ctx, req: Request, reply: Reply) {
    let log = &ctx.log;
    let max_frame = ctx.cfg.frame_bytes_max as usize;
    match req {
        Request::ReadStream {
            stream,
            from_version,
            max,
            direction,
        } => {
            let max = max.min(READ_EVENTS_MAX) as usize;
            let mut out = Vec::with_capacity(256 + max.min(READ_CHUNK) * 400);
            let start = protocol::start_frame(
                &mut out,
                op::READ_STREAM | op::RESPONSE_BIT,
                reply.request_id,
            );
            let header_at = out.len();
            out.extend_from_slice(&[0; 8 + 1 + 4]);
            let mut count = 0u32;
            let mut last: Option<u64> = None;
            // Read a chunk at a time, so that no more than about a frame's worth of events
            // is in memory: events may be 1 MiB each.
            let (mut truncated, mut exhausted) = (false, false);
            let mut at = from_version;
            while (count as usize) < max && !truncated && !exhausted {
                let want = (max - count as usize).min(READ_CHUNK);
                let chunk = match log.read_stream(&stream, at, want, direction) {
                    Ok(c) => c,
                    Err(e) => return reply.error(engine_error(&e)),
                };
                exhausted = chunk.len() < want;
                for e in &chunk {
                    let before = out.len();
                    protocol::put_recorded(&mut out, e);
                    if out.len() - start > max_frame && count > 0 {
                        out.truncate(before);
                        truncated = true;
                        break;
                    }
                    count += 1;
                    last = Some(e.version);
                }
                match (direction, last) {
                    (Direction::Forward, Some(v)) => at = v + 1,
                    (Direction::Backward, Some(0)) | (_, None) => exhausted = true,
                    (Direction::Backward, Some(v)) => at = v - 1,
                }
            }
            let (next, end) = match (direction, last) {
                (Direction::Forward, Some(v)) => (v + 1, !truncated && exhausted),
                (Direction::Forward, None) => (from_version, true),
                (Direction::Backward, Some(0)) => (0, true),
                (Direction::Backward, Some(v)) => (v - 1, !truncated && exhausted),
                (Direction::Backward, None) => (0, true),
            };
            out[header_at..header_at + 8].copy_from_slice(&next.to_le_bytes());
            out[header_at + 8] = u8::from(end);
            out[header_at + 9..header_at + 13].copy_from_slice(&count.to_le_bytes());
            protocol::finish_frame(&mut out, start);
            reply.send_frame(out);
        }
        Request::ReadAll {
            from,
            max,
            direction,
            filter,
        } => {
            let max = u64::from(max.min(READ_EVENTS_MAX));
            let r = match direction {
                Direction::Forward => read_all_forward(
                    log,
                    Position(from),
                    max,
                    &filter,
                    max_frame,
                    reply.request_id,
                    op::READ_ALL | op::RESPONSE_BIT,
                )
                .map(|b| b.into_response_frame()),
                Direction::Backward => {
                    read_all_backward(log, from, max, &filter, max_frame, reply.request_id)
                }
            };
            match r {
                Ok(frame) => reply.send_frame(frame),
                Err(e) => reply.error(engine_error(&e)),
            }
        }
        Request::Find(q) => {
            let max = q.max.min(READ_EVENTS_MAX);
            // Only events visible now: `next` is then exact, and a later FIND from it
            // returns what was appended since.
            let visible = log.next_position();
            let time = |w: Option<(u64, u64)>| {
                w.map(|(a, b)| tally_engine::Timestamp(a)..tally_engine::Timestamp(b))
            };
            let query = tally_engine::Query {
                field: q.field.as_ref().map(|(f, v)| (*f, v.as_str())),
                record_time: time(q.record_time),
                event_time: time(q.event_time),
                positions: Position(q.from)..visible,
                limit: max as usize,
                // The events go into one frame: no more than a frame's worth is read.
                max_bytes: max_frame,
            };
            match log.find(&query) {
                Ok(events) => {
                    let mut b = Batch::new(
                        op::FIND | op::RESPONSE_BIT,
                        reply.request_id,
                        true,
                        frame_capacity(u64::from(max), max_frame),
                    );
                    b.next = visible.0.max(q.from);
                    b.end = true;
                    let bytes: usize = events.iter().map(|e| e.body().len()).sum();
                    if (events.len() == max as usize || bytes >= max_frame)
                        && let Some(last) = events.last()
                    {
                        b.next = last.position.0 + 1;
                        b.end = false;
                    }
                    for e in &events {
                        let before = b.out.len();
                        protocol::put_recorded(&mut b.out, e);
                        if b.count > 0 && b.out.len() - b.start > max_frame {
                            b.out.truncate(before);
                            b.next = e.position.0;
                            b.end = false;
                            break;
                        }
                        b.count += 1;
                    }
                    reply.send_frame(b.into_response_frame());
                }
                Err(EngineError::InvalidOptions { reason }) => {
                    reply.error(WireError::new(ErrorCode::MalformedRequest, reason));
                }
                Err(e) => reply.error(engine_error(&e)),
            }
        }
        Request::RegisterSchema { schema } => {
            let parsed = match tally_engine::schema::Schema::from_json(&schema) {
                Ok(s) => s,
                Err(e) => {
                    return reply.error(WireError::new(
                        ErrorCode::SchemaRefused,
                        format!("not a schema: {e}"),
                    ));
                }
            };
            let _one_at_a_time = ctx
                .registering
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let current = Arc::clone(
                &ctx.schemas
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            // A retry of a registration that succeeded (its answer lost with the
            // connection) is answered as a success.
            if current.get(&parsed.event_type, parsed.version) == Some(&parsed) {
                return reply.send(&Response::CheckpointStored);
            }
            let (expect, event) = match current.prepare(&parsed) {
                Ok(p) => p,
                Err(e) => {
                    return reply.error(WireError::new(ErrorCode::SchemaRefused, e.to_string()));
                }
            };
            let mut next = (*current).clone();
            next.commit(parsed);
            let validates = next.validates() || next.marks_personal();
            // Under the write lock: no append is between its check and its place in the
            // log, so every append ordered after the registration is checked against it.
            // The sync is waited for after the lock is let go.
            let handle = {
                let mut registry = ctx
                    .schemas
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let submitted = log.append_deferred_multi(&[AppendRequest {
                    stream: tally_engine::schema::SCHEMA_STREAM,
                    expected: expect,
                    events: std::slice::from_ref(&event),
                }]);
                if submitted.is_ok() {
                    *registry = Arc::new(next);
                    ctx.validating.store(validates, Ordering::Release);
                }
                submitted
            };
            match handle.and_then(AppendHandle::wait) {
                Ok(_) => {
                    publish_visible(&ctx.visible, log);
                    reply.send(&Response::CheckpointStored);
                }
                // Not written (refused before the log took it), or a failed sync, after
                // which the log refuses writes: either way nothing more is acknowledged.
                Err(e) => reply.error(engine_error(&e)),
            }
        }
        Request::StreamInfo { stream } => match log.stream_info(&stream) {
            Ok(info) => reply.send(&Response::StreamInfo(info)),
            Err(e) => reply.error(engine_error(&e)),
        },
        Request::CheckpointFetch { name } => {
            let Some(stream) = consumer_stream(&name) else {
                return reply.error(WireError::new(
                    ErrorCode::MalformedRequest,
                    format!(
                        "consumer name must be 1 to 200 bytes without control characters, got {} bytes",
                        name.len()
                    ),
                ));
            };
            match log.read_stream(&stream, u64::MAX, 1, Direction::Backward) {
                Ok(events) => {
                    let p = events.first().and_then(|e| {
                        let b: [u8; 8] = e.payload().try_into().ok()?;
                        Some(u64::from_le_bytes(b))
                    });
                    reply.send(&Response::Checkpoint(p));
                }
                Err(e) => reply.error(engine_error(&e)),
            }
        }
        Request::LatestCheckpoint => {
            let latest = log.latest_checkpoint().map(|c| c.encode_entry());
            reply.send(&Response::LatestCheckpoint(latest));
        }
        Request::InclusionProof {
            position,
            tree_size,
        } => {
            let size = if tree_size == 0 {
                match log.latest_checkpoint() {
                    Some(c) => c.statement.tree_size,
                    None => {
                        return reply.error(WireError::new(
                            ErrorCode::ProofUnavailable,
                            "the log has no signed checkpoint yet; give a tree size",
                        ));
                    }
                }
            } else {
                tree_size
            };
            let r = (|| {
                let proof = log.prove_inclusion(Position(position), size)?;
                let root = log.merkle_root(size)?;
                let rec = log.read_all(Position(position), 1, Direction::Forward)?;
                let record_hash = rec
                    .first()
                    .filter(|e| e.position.0 == position)
                    .map(|e| e.record_hash)
                    .ok_or(EngineError::Proof(
                        tally_engine::format::proof::ProofError::OutOfRange {
                            index: position,
                            size,
                        },
                    ))?;
                Ok::<_, EngineError>(ProofResponse {
                    position,
                    tree_size: size,
                    record_hash,
                    root,
                    path: proof.path.clone(),
                })
            })();
            match r {
                Ok(p) => reply.send(&Response::InclusionProof(p)),
                Err(e) => reply.error(engine_error(&e)),
            }
        }
        Request::CheckpointNote { id } => match log.checkpoint_note((id != 0).then_some(id)) {
            Ok(note) => reply.send(&Response::CheckpointNote(note.map(|n| n.encode()))),
            Err(e) => reply.error(engine_error(&e)),
        },
        Request::ConsistencyProof { old_size, new_size } => {
            let r = (|| {
                let proof = log.prove_consistency(old_size, new_size)?;
                Ok::<_, EngineError>(ConsistencyResponse {
                    old_size,
                    new_size,
                    old_root: log.merkle_root(old_size)?,
                    new_root: log.merkle_root(new_size)?,
                    path: proof.path,
                })
            })();
            match r {
                Ok(p) => reply.send(&Response::ConsistencyProof(p)),
                Err(e) => reply.error(engine_error(&e)),
            }
        }
        Request::AddCosignature {
            checkpoint_id,
            cosignature,
        } => match log.add_cosignature(checkpoint_id, &cosignature) {
            Ok(added) => reply.send(&Response::CosignatureAdded(added)),
            Err(EngineError::InvalidOptions { reason }) => {
                reply.error(WireError::new(ErrorCode::CosignatureRefused, reason));
            }
            Err(e) => reply.error(engine_error(&e)),
        },
        Request::BlobRead { blob, offset, max } => {
            if offset >= blob.size {
                return reply.error(WireError::new(
                    ErrorCode::MalformedRequest,
                    format!(
                        "offset {offset} is not inside the blob's {} bytes",
                        blob.size
                    ),
                ));
            }
            // Room for the frame header and the piece's length.
            let room = (max_frame - 64) as u64;
            let end = blob
                .size
                .min(offset.saturating_add(u64::from(max).min(room)));
            match log.read_blob_range(&blob, offset..end) {
                Ok(piece) if piece.len() as u64 == end - offset => {
                    reply.send(&Response::BlobPiece(piece));
                }
                Ok(piece) => reply.error(WireError::new(
                    ErrorCode::BlobUnavailable,
                    format!(
                        "blob {}: the store returned {} bytes for {offset}..{end}",
                        blob.hex(),
                        piece.len()
                    ),
                )),
                Err(e) => reply.error(engine_error(&e)),
            }
        }
        Request::Govern { request } => match govern(log, &request, ctx.cfg.governance_changes) {
            Ok(answer) => reply.send(&Response::Governed(answer)),
            Err(e) => reply.error(e),
        },
        other => reply.error(WireError::new(
            ErrorCode::Internal,
            format!("request 0x{:02x} reached the blocking pool", other.opcode()),
        )),
    }
}

/// A GOVERN request (PROTOCOL.md 4.11d), answered as JSON text. Changes are appended to
/// `$governance` with the request's `actor` and `reason` by the engine's operations, which
/// check them against the rules in force; a retention run rewrites sealed segments beside
/// reads and appends.
fn govern(log: &Log, request: &str, changes: bool) -> Result<String, WireError> {
    use tally_engine::governance::{HoldPlaced, PolicySet};
    let bad = |what: String| WireError::new(ErrorCode::MalformedRequest, what);
    let v: serde_json::Value =
        serde_json::from_str(request).map_err(|e| bad(format!("governance request: {e}")))?;
    let text = |k: &str| -> Result<&str, WireError> {
        v.get(k)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad(format!("governance request: {k:?} must be a string")))
    };
    let time = |k: &str| -> Result<tally_engine::Timestamp, WireError> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(tally_engine::now()),
            Some(t) => t
                .as_u64()
                .map(tally_engine::Timestamp)
                .ok_or_else(|| bad(format!("governance request: {k:?} must be nanoseconds"))),
        }
    };
    let refused = |e: tally_engine::Error| match e {
        tally_engine::Error::InvalidOptions { reason } => {
            WireError::new(ErrorCode::MalformedRequest, reason)
        }
        e => engine_error(&e),
    };
    let changed = |r: tally_engine::AppendResult| {
        serde_json::json!({ "position": r.first_position.0 }).to_string()
    };
    let field = |k: &str| {
        v.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("governance request: {k:?} is missing")))
    };
    let op = text("op")?;
    if !changes && !matches!(op, "list" | "retention_plan") {
        return Err(WireError::new(
            ErrorCode::ReadOnly,
            format!(
                "governance changes ({op}) are off on this server: start tallyd with \
                 governance_changes = true (or change them with tally on the stopped log)"
            ),
        ));
    }
    match op {
        "list" => {
            // The runs as a summary (their ranges can be long): where, as of when, how many
            // events, why.
            let g = log.governance().map_err(|e| engine_error(&e))?;
            let runs: Vec<serde_json::Value> = g
                .runs
                .iter()
                .map(|(at, run)| {
                    serde_json::json!({
                        "position": at.0,
                        "as_of": run.as_of,
                        "removed": run.removed.iter().map(|r| r.to - r.from).sum::<u64>(),
                        "held": run.held,
                        "reason": run.reason,
                    })
                })
                .collect();
            Ok(serde_json::json!({
                "policies": g.policies,
                "holds": g.holds,
                "run_summaries": runs,
            })
            .to_string())
        }
        "policy_set" => {
            let p: PolicySet = serde_json::from_value(field("policy")?)
                .map_err(|e| bad(format!("policy: {e}")))?;
            log.set_retention_policy(&p, text("actor")?)
                .map(changed)
                .map_err(refused)
        }
        "policy_remove" => log
            .remove_retention_policy(text("name")?, text("actor")?, text("reason")?)
            .map(changed)
            .map_err(refused),
        "hold_place" => {
            let h: HoldPlaced =
                serde_json::from_value(field("hold")?).map_err(|e| bad(format!("hold: {e}")))?;
            log.place_legal_hold(&h, text("actor")?)
                .map(changed)
                .map_err(refused)
        }
        "hold_release" => log
            .release_legal_hold(text("id")?, text("actor")?, text("reason")?)
            .map(changed)
            .map_err(refused),
        "retention_plan" => {
            let plan = log.retention_plan(time("as_of")?).map_err(refused)?;
            serde_json::to_string(&plan.summary()).map_err(|e| bad(e.to_string()))
        }
        "retention_apply" => {
            let done = log
                .apply_retention(time("as_of")?, text("actor")?, text("reason")?)
                .map_err(refused)?;
            Ok(serde_json::json!({
                "removed": done.removed,
                "pending": done.pending,
                "held_events": done.plan.held_events(),
                "segments_rewritten": done.segments_rewritten,
                "recorded_at": done.recorded_at.map(|p| p.0),
                "run_events": done.run_events,
            })
            .to_string())
        }
        "forget" => {
            let reason = text("reason")?;
            let actor = text("actor")?;
            let done = match (v.get("subject"), v.get("subject_hash")) {
                (Some(_), None) => log.forget(text("subject")?, actor, reason),
                (None, Some(_)) => {
                    let h =
                        tally_engine::format::sealed::SubjectHash::from_hex(text("subject_hash")?)
                            .map_err(|e| bad(format!("subject_hash: {e}")))?;
                    log.forget_hash(h, actor, reason)
                }
                _ => {
                    return Err(bad(
                        "governance request: give one of \"subject\" and \"subject_hash\"".into(),
                    ));
                }
            }
            .map_err(refused)?;
            serde_json::to_string(&done).map_err(|e| bad(e.to_string()))
        }
        other => Err(bad(format!("governance request: unknown op {other:?}"))),
    }
}

/// A first guess at a frame of `events` events: typical events (a few hundred bytes) fit,
/// and untouched capacity costs no memory.
fn frame_capacity(events: u64, max_frame: usize) -> usize {
    (64 + events as usize * 512).min(max_frame + 1024)
}

/// Events gathered for one frame.
struct Batch {
    out: Vec<u8>,
    start: usize,
    header_at: usize,
    count: u32,
    next: u64,
    end: bool,
    with_header: bool,
}

impl Batch {
    fn new(opcode: u8, request_id: u32, with_next: bool, capacity: usize) -> Batch {
        // Sized up front: growing a megabyte frame by doubling copies it several times.
        let mut out = Vec::with_capacity(capacity);
        let start = protocol::start_frame(&mut out, opcode, request_id);
        let header_at = out.len();
        if with_next {
            out.extend_from_slice(&[0; 9]);
        }
        out.extend_from_slice(&[0; 4]);
        Batch {
            out,
            start,
            header_at,
            count: 0,
            next: 0,
            end: false,
            with_header: with_next,
        }
    }

    fn into_response_frame(mut self) -> Vec<u8> {
        let mut at = self.header_at;
        if self.with_header {
            self.out[at..at + 8].copy_from_slice(&self.next.to_le_bytes());
            self.out[at + 8] = u8::from(self.end);
            at += 9;
        }
        self.out[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        protocol::finish_frame(&mut self.out, self.start);
        self.out
    }
}

/// Reads forward from `from`: at most `max` events passing `filter`, examining at most
/// [`FILTER_SCAN_WINDOW`] records when filtered, within one frame. `next` is where to go
/// on.
fn read_all_forward(
    log: &Log,
    from: Position,
    max: u64,
    filter: &Filter,
    max_frame: usize,
    request_id: u32,
    opcode: u8,
) -> Result<Batch, EngineError> {
    let visible = log.next_position();
    let with_next = opcode != op::SUB_EVENTS;
    let mut b = Batch::new(
        opcode,
        request_id,
        with_next,
        frame_capacity(max, max_frame),
    );
    let window = if filter.is_empty() {
        max
    } else {
        FILTER_SCAN_WINDOW
    };
    let to = Position(from.0.saturating_add(window).min(visible.0));
    b.next = to.0.max(from.0);
    if from < to {
        let mut full = false;
        let mut bad = None;
        log.scan_range(from, to, Verify::Checksums, |v| {
            if full {
                return;
            }
            // An event retention removed is sent as its marker, as every read returns it.
            let removed = match v.removed() {
                Ok(r) => r,
                Err(e) => {
                    bad.get_or_insert((v.position, e));
                    full = true;
                    return;
                }
            };
            let marker_payload =
                removed.map(|p| tally_engine::format::pruned::marker_payload(p.removed_by));
            let env = match (&removed, &marker_payload) {
                (Some(p), Some(payload)) => Ok(tally_engine::format::pruned::marker_with_payload(
                    p,
                    v.record_time,
                    payload.as_bytes(),
                )),
                _ => v.envelope(),
            };
            let env = match env {
                Ok(e) => e,
                Err(e) => {
                    bad.get_or_insert((v.position, e));
                    full = true;
                    return;
                }
            };
            if !filter.matches(env.stream, env.event_type) {
                return;
            }
            // Personal data goes as every read returns it: opened, or markers.
            let opened = log.open_sealed(&env);
            let env = match &opened {
                Some((payload, content_type, _)) => tally_engine::format::envelope::EnvelopeRef {
                    payload,
                    content_type: *content_type,
                    payload_form: tally_engine::format::envelope::PayloadForm::Inline,
                    ..env
                },
                None => env,
            };
            let len = protocol::event_wire_len(&env);
            if u64::from(b.count) == max || (b.count > 0 && b.out.len() - b.start + len > max_frame)
            {
                full = true;
                b.next = v.position.0;
                return;
            }
            put_view(
                &mut b.out,
                v.position,
                v.stream_version,
                v.record_time,
                &env,
            );
            b.count += 1;
        })?;
        if let Some((p, e)) = bad {
            return Err(EngineError::Corrupt {
                file: log.dir().to_path_buf(),
                offset: 0,
                position: Some(p.0),
                detail: "record envelope does not decode".into(),
                source: Some(e),
            });
        }
    }
    b.end = b.next >= visible.0;
    Ok(b)
}

fn put_view(
    out: &mut Vec<u8>,
    position: Position,
    version: u64,
    record_time: tally_engine::Timestamp,
    env: &EnvelopeRef<'_>,
) {
    protocol::put_event(out, position, version, record_time, env);
}

fn read_all_backward(
    log: &Log,
    from: u64,
    max: u64,
    filter: &Filter,
    max_frame: usize,
    request_id: u32,
) -> Result<Vec<u8>, EngineError> {
    let mut b = Batch::new(
        op::READ_ALL | op::RESPONSE_BIT,
        request_id,
        true,
        frame_capacity(max, max_frame),
    );
    let visible = log.next_position().0;
    if visible == 0 {
        b.end = true;
        return Ok(b.into_response_frame());
    }
    let mut top = from.min(visible - 1);
    let mut examined = 0u64;
    loop {
        let chunk = log.read_all(Position(top), 512, Direction::Backward)?;
        let Some(last) = chunk.last().map(|e| e.position.0) else {
            b.end = true;
            break;
        };
        let mut stop = false;
        for e in &chunk {
            examined += 1;
            if !filter.matches(e.stream(), e.event_type()) {
                b.next = e.position.0.saturating_sub(1);
                continue;
            }
            let before = b.out.len();
            protocol::put_recorded(&mut b.out, e);
            if u64::from(b.count) == max || (b.count > 0 && b.out.len() - b.start > max_frame) {
                b.out.truncate(before);
                b.next = e.position.0;
                stop = true;
                break;
            }
            b.count += 1;
            b.next = e.position.0.saturating_sub(1);
        }
        if stop {
            break;
        }
        if last == 0 {
            b.end = true;
            break;
        }
        top = last - 1;
        b.next = top;
        if examined >= FILTER_SCAN_WINDOW.max(max) {
            break;
        }
    }
    Ok(b.into_response_frame())
}

/// A subscription's task: reads from `next`, pushes while it has credit, waits when it
/// has read everything, and answers the SUBSCRIBE first.
async fn subscription(
    ctx: Arc<Ctx>,
    target: SubscribeTarget,
    start: u64,
    shared: Arc<SubShared>,
    reply: Reply,
) {
    let log = Arc::clone(&ctx.log);
    let mut next = start;
    let id = reply.request_id;
    let tx = reply.tx.clone();
    let budget = Arc::clone(&reply.budget);
    reply.send(&Response::Subscribed { start: next });
    let queue = Arc::new(Semaphore::new(SUB_FRAMES_QUEUED));
    let mut visible = ctx.visible.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    let mut caught_up = false;
    let max_frame = ctx.cfg.frame_bytes_max as usize;
    let push_end = |code: ErrorCode, msg: String| {
        let mut out = Vec::new();
        WireError::new(code, msg).encode(op::SUB_ENDED, id, &mut out);
        let _ = tx.send(Outbound {
            frame: out,
            answers_request: false,
            permit: None,
            reserved: None,
        });
    };
    loop {
        if shared.unsubscribe.load(Ordering::SeqCst) != 0 || tx.is_closed() {
            return;
        }
        if shared.ended.load(Ordering::SeqCst) && shared.quiet.load(Ordering::SeqCst) {
            return;
        }
        if *shutdown.borrow() || shared.ended.load(Ordering::SeqCst) {
            return push_end(
                ErrorCode::ShuttingDown,
                "the server is shutting down".into(),
            );
        }
        let credit = shared.credit.load(Ordering::SeqCst);
        if credit == 0 && !caught_up && at_end(&log, &target, next) {
            // The marker carries no event, so it needs no credit.
            caught_up = true;
            let mut out = Vec::new();
            Response::SubCaughtUp(next).encode(op::SUBSCRIBE, id, &mut out);
            let _ = tx.send(Outbound {
                frame: out,
                answers_request: false,
                permit: None,
                reserved: None,
            });
        }
        if credit == 0 {
            tokio::select! {
                () = shared.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        // Room in the connection's queue: a subscriber that does not read its socket
        // holds at most SUB_FRAMES_QUEUED frames here.
        let permit = tokio::select! {
            p = Arc::clone(&queue).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            () = shared.wake.notified() => continue,
            _ = shutdown.changed() => continue,
        };
        // Room in the server's memory budget for the largest batch frame.
        let mut room = match budget.reserve(max_frame + 1024).await {
            Ok(r) => r,
            Err(_exceeded) => {
                return push_end(
                    ErrorCode::LimitExceeded,
                    "this connection holds more than its share of the server's response memory"
                        .into(),
                );
            }
        };
        let n = credit.min(SUB_BATCH_MAX);
        // Seen before the read: an append announced after the read wakes the wait below.
        visible.borrow_and_update();
        let log2 = Arc::clone(&log);
        let target2 = target.clone();
        let read =
            tokio::task::spawn_blocking(move || sub_read(&log2, &target2, next, n, max_frame, id))
                .await;
        let (frame, count, new_next) = match read {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let w = engine_error(&e);
                return push_end(w.code().unwrap_or(ErrorCode::Internal), w.message);
            }
            Err(e) => {
                return push_end(
                    ErrorCode::Internal,
                    format!("subscription read failed: {e}"),
                );
            }
        };
        if count > 0 {
            shared.credit.fetch_sub(u64::from(count), Ordering::SeqCst);
            next = new_next;
            room.shrink_to(frame.len());
            let _ = tx.send(Outbound {
                frame,
                answers_request: false,
                permit: Some(permit),
                reserved: Some(room),
            });
            continue;
        }
        drop(permit);
        if new_next > next {
            // A filtered window with no match: go on from its end.
            next = new_next;
            continue;
        }
        if !caught_up {
            caught_up = true;
            let mut out = Vec::new();
            Response::SubCaughtUp(next).encode(op::SUBSCRIBE, id, &mut out);
            let _ = tx.send(Outbound {
                frame: out,
                answers_request: false,
                permit: None,
                reserved: None,
            });
        }
        // Wait for the log to grow. The watch is published after every acknowledged
        // append; the timer covers appends acknowledged without this server noticing.
        tokio::select! {
            _ = visible.changed() => {}
            () = shared.wake.notified() => {}
            _ = shutdown.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Whether a subscription at `next` has delivered everything visible now.
fn at_end(log: &Log, target: &SubscribeTarget, next: u64) -> bool {
    match target {
        SubscribeTarget::All(_) => next >= log.next_position().0,
        SubscribeTarget::Stream(s) => log
            .stream_info(s)
            .map(|i| i.map_or(0, |i| i.last_version + 1) <= next)
            .unwrap_or(false),
    }
}

/// One subscription read: `(frame, events, next)`.
fn sub_read(
    log: &Log,
    target: &SubscribeTarget,
    next: u64,
    n: u64,
    max_frame: usize,
    id: u32,
) -> Result<(Vec<u8>, u32, u64), EngineError> {
    match target {
        SubscribeTarget::All(filter) => {
            let b = read_all_forward(
                log,
                Position(next),
                n,
                filter,
                max_frame,
                id,
                op::SUB_EVENTS,
            )?;
            let (count, to) = (b.count, b.next);
            Ok((b.into_response_frame(), count, to))
        }
        SubscribeTarget::Stream(stream) => {
            let mut b = Batch::new(op::SUB_EVENTS, id, false, frame_capacity(n, max_frame));
            let mut to = next;
            // A chunk at a time, as READ_STREAM does.
            'read: while u64::from(b.count) < n {
                let want = (n - u64::from(b.count)).min(READ_CHUNK as u64) as usize;
                let events = log.read_stream(stream, to, want, Direction::Forward)?;
                for e in &events {
                    let before = b.out.len();
                    protocol::put_recorded(&mut b.out, e);
                    if b.count > 0 && b.out.len() - b.start > max_frame {
                        b.out.truncate(before);
                        break 'read;
                    }
                    b.count += 1;
                    to = e.version + 1;
                }
                if events.len() < want {
                    break;
                }
            }
            let count = b.count;
            Ok((b.into_response_frame(), count, to))
        }
    }
}

/// The durability a log was opened with, as SERVER_INFO reports it.
#[must_use]
pub fn durability_code(d: Durability) -> u8 {
    match d {
        Durability::Fsync => 0,
        Durability::Batched { .. } => 1,
        Durability::None => 2,
    }
}
