//! An async client for `tallyd` (docs/PROTOCOL.md).
//!
//! One [`Client`] holds one connection, shared by every caller: requests are pipelined
//! (each gets a request id, and responses are matched to callers in whatever order they
//! arrive). [`Client::send`] returns without waiting, so a single task can keep many
//! requests in flight.
//!
//! - Appends are idempotent across retries: events without ids get a v7 id before the
//!   first attempt, and a lost connection is re-established and the same bytes sent
//!   again; the server recognises a retry and returns the first result.
//! - Errors are typed: [`ClientError::WrongExpectedVersion`] carries the stream's actual
//!   version.
//! - A [`Subscription`] grants the server credit as its events are consumed, and after a
//!   lost connection resubscribes from the event after the last one it delivered.
//! - Dropping the last clone of a [`Client`] (a [`Subscription`] holds one) closes its
//!   connection once the requests already sent are answered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tally_engine::{AppendResult, Direction, EventData, ExpectedVersion, StreamInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::protocol::{
    self, AppendPart, ErrorCode, Event, FRAME_BYTES_MAX_DEFAULT, Filter, FindQuery, HelloOk,
    LENGTH_BYTES, PROTOCOL_VERSION, ProofResponse, ProtocolError, Request, Response, ServerInfo,
    SubscribeFrom, SubscribeTarget, WireError,
};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting or talking to the server failed.
    #[error("connection to {addr} failed")]
    Io {
        /// The server's address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection closed before the response arrived. The request may or may not have
    /// been executed (appends are retried safely; see [`ClientOptions::retries`]).
    #[error("the connection closed before the response arrived{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Disconnected {
        /// What the server said when it closed the connection, if anything.
        reason: Option<WireError>,
    },
    /// The stream's version was not the expected one; nothing was written.
    #[error("wrong expected version for stream {stream}: expected {expected:?}, actual {actual:?}")]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's last version (`None`: no such stream).
        actual: Option<u64>,
    },
    /// The server refused the request.
    #[error("server error {code}{}: {message}", ErrorCode::from_u16(*code).map(|c| format!(" ({c:?})")).unwrap_or_default())]
    Server {
        /// The error code's number.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// The request does not fit in a frame of the size the server accepts (split the
    /// append). Nothing was sent.
    #[error("request of {bytes} bytes exceeds the server's frame limit of {max} bytes")]
    TooLarge {
        /// The request's frame size (after the length field).
        bytes: usize,
        /// The server's limit.
        max: usize,
    },
    /// The server sent bytes this client cannot decode.
    #[error("undecodable response")]
    Protocol(#[from] ProtocolError),
    /// The request has a field its wire encoding cannot hold (a string of 64 KiB or more,
    /// say). Nothing was sent.
    #[error("the request cannot be sent: {0}")]
    Invalid(ProtocolError),
    /// The server answered with a response of the wrong kind.
    #[error("unexpected response: {0}")]
    Unexpected(String),
    /// A batch could not be signed (an event breaks an envelope limit). Nothing was sent.
    #[error("the batch cannot be signed: {0}")]
    Unsignable(String),
}

impl ClientError {
    /// The server's error code, for errors the server sent.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::WrongExpectedVersion { .. } => Some(ErrorCode::WrongExpectedVersion),
            ClientError::Server { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }

    /// Whether the request might succeed on a new connection (the connection failed, or
    /// the server was shutting down).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Io { .. } | ClientError::Disconnected { .. }
        ) || self.code() == Some(ErrorCode::ShuttingDown)
    }

    fn from_wire(e: WireError) -> ClientError {
        if let Some((stream, expected, actual)) = e.wrong_version {
            return ClientError::WrongExpectedVersion {
                stream,
                expected: protocol::expected_from_wire(expected),
                actual,
            };
        }
        ClientError::Server {
            code: e.code,
            message: e.message,
        }
    }
}

/// How a client connects and retries.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Name sent in HELLO.
    pub name: String,
    /// Attempts after the first for appends and subscription resumes that failed because
    /// the connection did.
    pub retries: u32,
    /// Wait before the first retry; doubled each time up to one second.
    pub retry_delay: Duration,
    /// Events a subscription lets the server send ahead of the consumer.
    pub subscription_window: u32,
    /// Time to connect and complete the handshake.
    pub connect_timeout: Duration,
    /// The largest frame this client accepts from a server, whatever the server announces
    /// (a frame's buffer is allocated before it arrives).
    pub frame_bytes_max: u32,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            name: concat!("tally-client/", env!("CARGO_PKG_VERSION")).into(),
            retries: 20,
            retry_delay: Duration::from_millis(50),
            subscription_window: 2048,
            connect_timeout: Duration::from_secs(5),
            frame_bytes_max: 64 << 20,
        }
    }
}

enum Waiter {
    Once(oneshot::Sender<Result<Response, ClientError>>),
    Stream(mpsc::UnboundedSender<Result<Response, ClientError>>),
}

struct Conn {
    /// The socket's write half. A sender writes to it directly when nothing is queued
    /// before its frame; otherwise the frame is queued for the writer task.
    wr: OwnedWriteHalf,
    out: parking_lot::Mutex<Outgoing>,
    /// Wakes the writer task when something is queued.
    out_ready: Notify,
    pending: parking_lot::Mutex<Option<HashMap<u32, Waiter>>>,
    hello: HelloOk,
    closed: AtomicBool,
    /// The client was dropped: close once no request waits for its answer.
    close_when_idle: AtomicBool,
    /// The connection's reader and writer tasks, ended when the client is dropped.
    tasks: parking_lot::Mutex<Vec<AbortHandle>>,
}

/// Bytes on their way to the socket.
#[derive(Default)]
struct Outgoing {
    /// Frames (or the rest of one) the socket did not take at once, in order.
    queued: Vec<u8>,
    /// The writer task is writing `queued`: a new frame must queue behind it.
    flushing: bool,
}

impl Conn {
    /// Registers a waiter under a fresh request id (never 0, never one still waiting, even
    /// after the counter wraps) and returns the id, and whether it is the only request
    /// waiting on the connection.
    fn register(&self, ids: &AtomicU32, w: Waiter) -> Result<(u32, bool), ClientError> {
        match &mut *self.pending.lock() {
            Some(map) => loop {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                if id != 0
                    && let std::collections::hash_map::Entry::Vacant(v) = map.entry(id)
                {
                    v.insert(w);
                    return Ok((id, map.len() == 1));
                }
            },
            None => Err(ClientError::Disconnected { reason: None }),
        }
    }

    fn forget(&self, id: u32) {
        if let Some(map) = &mut *self.pending.lock() {
            map.remove(&id);
        }
    }

    /// Sends a frame, refusing one the server would not accept (it would close the
    /// connection, failing every other request on it). `alone`: see [`Conn::write`].
    fn send_frame(&self, id: u32, frame: Vec<u8>, alone: bool) -> Result<(), ClientError> {
        let bytes = frame.len() - LENGTH_BYTES;
        let max = self.hello.limits.frame_bytes_max as usize;
        if bytes > max {
            self.forget(id);
            return Err(ClientError::TooLarge { bytes, max });
        }
        self.write(&frame, alone);
        Ok(())
    }

    /// Writes a frame. A request that is the only one waiting on the connection (`alone`)
    /// goes straight to the socket when nothing is queued before it: no hand-off to the
    /// writer task on its way to the server. Others are queued, and the writer task sends
    /// what has gathered in one write: pipelined requests reach the server together, so
    /// that one sync covers them. A failed write fails every request waiting on the
    /// connection.
    fn write(&self, frame: &[u8], alone: bool) {
        let mut out = self.out.lock();
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut rest = frame;
        if alone && !out.flushing {
            match self.wr.try_write(frame) {
                Ok(n) => rest = &frame[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    drop(out);
                    self.fail_all(None);
                    return;
                }
            }
            if rest.is_empty() {
                return;
            }
        }
        out.queued.extend_from_slice(rest);
        if !out.flushing {
            out.flushing = true;
            self.out_ready.notify_one();
        }
    }

    /// The writer task: writes what `write` queued, until the connection fails or closes.
    async fn write_queued(&self) {
        let mut batch = Vec::new();
        loop {
            self.out_ready.notified().await;
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            loop {
                {
                    let mut out = self.out.lock();
                    if out.queued.is_empty() || self.closed.load(Ordering::SeqCst) {
                        out.flushing = false;
                        break;
                    }
                    std::mem::swap(&mut batch, &mut out.queued);
                }
                let mut at = 0;
                while at < batch.len() {
                    let r = match self.wr.writable().await {
                        Ok(()) => self.wr.try_write(&batch[at..]),
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(n) => at += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            self.fail_all(None);
                            return;
                        }
                    }
                }
                batch.clear();
                if batch.capacity() > (4 << 20) {
                    batch = Vec::new();
                }
            }
        }
    }

    /// No request waits for its answer.
    fn idle(&self) -> bool {
        self.pending.lock().as_ref().is_none_or(HashMap::is_empty)
    }

    /// Closes the connection once no request waits for its answer (now, if none does):
    /// requests sent before the client was dropped still get theirs.
    fn close_when_idle(&self) {
        self.close_when_idle.store(true, Ordering::SeqCst);
        // The reader checks after each answer; whichever of us sees the last one closes.
        if self.idle() {
            self.close();
        }
    }

    /// Ends the reader and writer tasks; dropping their halves closes the socket.
    fn close(&self) {
        self.fail_all(None);
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }

    fn fail_all(&self, reason: Option<WireError>) {
        self.closed.store(true, Ordering::SeqCst);
        // The writer task ends.
        self.out_ready.notify_one();
        let map = self.pending.lock().take();
        for (_, w) in map.into_iter().flatten() {
            let e = ClientError::Disconnected {
                reason: reason.clone(),
            };
            match w {
                Waiter::Once(t) => {
                    let _ = t.send(Err(e));
                }
                Waiter::Stream(t) => {
                    let _ = t.send(Err(e));
                }
            }
        }
    }

    fn dispatch(&self, id: u32, resp: Response) {
        let mut guard = self.pending.lock();
        let Some(map) = guard.as_mut() else { return };
        match map.get(&id) {
            Some(Waiter::Once(_)) => {
                if let Some(Waiter::Once(t)) = map.remove(&id) {
                    let _ = t.send(Ok(resp));
                }
            }
            Some(Waiter::Stream(t)) => {
                let last = matches!(
                    resp,
                    Response::SubEnded(_) | Response::Error(_) | Response::Unsubscribed
                );
                let _ = t.send(Ok(resp));
                if last {
                    map.remove(&id);
                }
            }
            None => {}
        }
    }
}

/// A response not yet received.
#[derive(Debug)]
pub struct PendingResponse {
    rx: oneshot::Receiver<Result<Response, ClientError>>,
}

impl PendingResponse {
    /// Waits for it.
    ///
    /// # Errors
    /// [`ClientError::Disconnected`], or the server's error.
    pub async fn wait(self) -> Result<Response, ClientError> {
        match self.rx.await {
            Ok(Ok(Response::Error(e))) => Err(ClientError::from_wire(e)),
            Ok(r) => r,
            Err(_) => Err(ClientError::Disconnected { reason: None }),
        }
    }
}

/// A connection to a server, shareable between tasks (clone it).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    opts: ClientOptions,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU32,
    /// Held by a blob upload: the server keeps one upload per connection.
    uploading: tokio::sync::Mutex<()>,
}

impl Drop for Inner {
    /// The last clone of a client is gone (subscriptions hold one): close its connection
    /// once the requests already sent are answered, rather than leave it open until the
    /// server's idle timeout.
    fn drop(&mut self) {
        if let Some(c) = self.conn.get_mut().take() {
            c.close_when_idle();
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `addr` (`host:port`) with default options.
    ///
    /// # Errors
    /// [`ClientError::Io`] or a refused handshake.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        Client::connect_with(addr, ClientOptions::default()).await
    }

    /// Connects with `opts`.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with(addr: &str, opts: ClientOptions) -> Result<Client, ClientError> {
        let c = Client {
            inner: Arc::new(Inner {
                addr: addr.to_owned(),
                opts,
                conn: tokio::sync::Mutex::new(None),
                next_id: AtomicU32::new(1),
                uploading: tokio::sync::Mutex::new(()),
            }),
        };
        c.conn().await?;
        Ok(c)
    }

    /// The server's handshake answer on the current connection.
    ///
    /// # Errors
    /// As [`Client::connect`] if a new connection is needed.
    pub async fn hello(&self) -> Result<HelloOk, ClientError> {
        Ok(self.conn().await?.hello.clone())
    }

    async fn conn(&self) -> Result<Arc<Conn>, ClientError> {
        let mut g = self.inner.conn.lock().await;
        if let Some(c) = &*g
            && !c.closed.load(Ordering::SeqCst)
        {
            return Ok(Arc::clone(c));
        }
        let c = tokio::time::timeout(self.inner.opts.connect_timeout, open(&self.inner))
            .await
            .map_err(|_| ClientError::Io {
                addr: self.inner.addr.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })??;
        if let Some(old) = g.replace(Arc::clone(&c)) {
            // Its reader has ended; its writer may still wait for a socket that the server
            // stopped reading.
            old.close();
        }
        Ok(c)
    }

    fn next_id(&self) -> u32 {
        loop {
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    fn ids(&self) -> &AtomicU32 {
        &self.inner.next_id
    }

    /// Sends a request and returns at once; await the result with
    /// [`PendingResponse::wait`]. This is how one task pipelines many requests.
    ///
    /// # Errors
    /// [`ClientError::Io`] if a connection cannot be made.
    pub async fn send(&self, req: &Request) -> Result<PendingResponse, ClientError> {
        req.check_encodable().map_err(ClientError::Invalid)?;
        let conn = self.conn().await?;
        let (t, rx) = oneshot::channel();
        let (id, alone) = conn.register(self.ids(), Waiter::Once(t))?;
        let mut frame = Vec::with_capacity(128);
        req.encode(id, &mut frame);
        conn.send_frame(id, frame, alone)?;
        Ok(PendingResponse { rx })
    }

    /// Sends a request and waits for its response.
    ///
    /// # Errors
    /// As [`PendingResponse::wait`].
    pub async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        self.send(req).await?.wait().await
    }

    /// Sends a request, retrying on a new connection while the failure is the
    /// connection's.
    async fn call_retrying(&self, req: &Request) -> Result<Response, ClientError> {
        let mut delay = self.inner.opts.retry_delay;
        let mut attempt = 0;
        loop {
            match self.call(req).await {
                Err(e) if e.is_retryable() && attempt < self.inner.opts.retries => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "retrying on a new connection");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                r => return r,
            }
        }
    }

    /// Appends `events` to `stream` if its version matches `expected`. Events without an
    /// id are given one first, so that a retry after a lost connection cannot write them
    /// twice.
    ///
    /// # Errors
    /// [`ClientError::WrongExpectedVersion`], [`ClientError::Server`], connection errors
    /// once the retries are spent.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, ClientError> {
        let req = Request::Append(AppendPart {
            stream: stream.to_owned(),
            expected,
            events: with_ids(events),
        });
        match self.call_retrying(&req).await? {
            Response::Appended(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Builds an append request with ids on every event, for [`Client::send`] (pipelined
    /// appends) or for retrying by hand.
    #[must_use]
    pub fn append_request(
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Request {
        Request::Append(AppendPart {
            stream: stream.to_owned(),
            expected,
            events: with_ids(events),
        })
    }

    /// Appends to several streams atomically, each with its own expectation.
    ///
    /// # Errors
    /// As [`Client::append`].
    pub async fn append_multi(
        &self,
        parts: Vec<(String, ExpectedVersion, Vec<EventData>)>,
    ) -> Result<Vec<AppendResult>, ClientError> {
        let req = Request::AppendMulti(
            parts
                .into_iter()
                .map(|(stream, expected, events)| AppendPart {
                    stream,
                    expected,
                    events: with_ids(events),
                })
                .collect(),
        );
        match self.call_retrying(&req).await? {
            Response::AppendedMulti(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Signs a batch with a producer's key and appends it atomically (APPEND_SIGNED): events
    /// without an id or event time get one first, since both are signed. The signature is
    /// over the envelopes the log will store (docs/FORMAT.md, "Producer-signed batches"),
    /// for the server's log.
    ///
    /// # Errors
    /// As [`Client::append_multi`]; the server refuses a signature its policy does not
    /// accept with `SignatureRefused`.
    pub async fn append_signed(
        &self,
        parts: Vec<(String, ExpectedVersion, Vec<EventData>)>,
        key: &tally_engine::format::checkpoint::SigningKey,
    ) -> Result<Vec<AppendResult>, ClientError> {
        let log_id = self.server_info().await?.log_id;
        let time = tally_engine::now();
        let parts: Vec<AppendPart> = parts
            .into_iter()
            .map(|(stream, expected, events)| AppendPart {
                stream,
                expected,
                events: with_ids(events)
                    .into_iter()
                    .map(|e| EventData {
                        event_time: Some(e.event_time.unwrap_or(time)),
                        ..e
                    })
                    .collect(),
            })
            .collect();
        let requests: Vec<tally_engine::AppendRequest<'_>> = parts
            .iter()
            .map(|p| tally_engine::AppendRequest {
                stream: &p.stream,
                expected: p.expected,
                events: &p.events,
            })
            .collect();
        let signature = tally_engine::producer_signature(&log_id, &requests, key)
            .map_err(|e| ClientError::Unsignable(e.to_string()))?;
        drop(requests);
        match self
            .call_retrying(&Request::AppendSigned { parts, signature })
            .await?
        {
            Response::AppendedMulti(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads up to `max` events of `stream` from `from_version` (`u64::MAX` backward: the
    /// newest). Returns the events, where to continue, and whether the end was reached.
    ///
    /// # Errors
    /// The server's error; connection errors.
    pub async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        max: u32,
        direction: Direction,
    ) -> Result<(Vec<Event>, u64, bool), ClientError> {
        let req = Request::ReadStream {
            stream: stream.to_owned(),
            from_version,
            max,
            direction,
        };
        events_of(self.call_retrying(&req).await?)
    }

    /// Reads up to `max` events of the whole log from position `from` (`u64::MAX`
    /// backward: the newest) that pass `filter`. Returns the events, where to continue,
    /// and whether the end was reached.
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn read_all(
        &self,
        from: u64,
        max: u32,
        direction: Direction,
        filter: &Filter,
    ) -> Result<(Vec<Event>, u64, bool), ClientError> {
        let req = Request::ReadAll {
            from,
            max,
            direction,
            filter: filter.clone(),
        };
        events_of(self.call_retrying(&req).await?)
    }

    /// The events `query` selects through the server's attribute indexes (by event type,
    /// correlation id, causation id, actor or event id, in record-time and event-time
    /// windows), in position order from `query.from`. Returns the events, where to continue
    /// (pass it as the next `from`), and whether nothing is left now.
    ///
    /// # Errors
    /// As [`Client::read_stream`]; `MalformedRequest` for an event id that is not a UUID.
    pub async fn find(&self, query: &FindQuery) -> Result<(Vec<Event>, u64, bool), ClientError> {
        events_of(self.call_retrying(&Request::Find(query.clone())).await?)
    }

    /// Registers a schema version (its JSON form, docs/FORMAT.md "Schema registrations";
    /// [`tally_engine::schema::Schema::to_json`] makes one). Once a version with
    /// `"validate": true` is registered, the server refuses appends of that type and
    /// version whose payload does not match it (`SchemaViolation`, naming the field).
    ///
    /// # Errors
    /// `SchemaRefused` (not a schema, not the next version, a breaking change) as
    /// [`ClientError::Server`]; as [`Client::read_stream`] otherwise.
    pub async fn register_schema(&self, schema_json: &str) -> Result<(), ClientError> {
        let req = Request::RegisterSchema {
            schema: schema_json.to_owned(),
        };
        match self.call_retrying(&req).await? {
            Response::CheckpointStored => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// A governance operation (PROTOCOL.md 4.11d): `request` is the JSON request (its
    /// `op` and fields), the answer the server's JSON text. Reads (`list`,
    /// `retention_plan`) are retried on a new connection like other reads; changes are sent
    /// once (a change whose answer was lost is seen in `list`).
    ///
    /// # Errors
    /// `MalformedRequest` for a request the server cannot read or a change the rules refuse
    /// (a hold that stands, a policy that does not exist), as [`ClientError::Server`]; as
    /// [`Client::read_stream`] otherwise.
    pub async fn govern(&self, request: &str) -> Result<String, ClientError> {
        let req = Request::Govern {
            request: request.to_owned(),
        };
        let read_only = serde_json::from_str::<serde_json::Value>(request)
            .ok()
            .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_owned))
            .is_some_and(|op| op == "list" || op == "retention_plan");
        let answer = if read_only {
            self.call_retrying(&req).await?
        } else {
            self.call(&req).await?
        };
        match answer {
            Response::Governed(text) => Ok(text),
            other => Err(unexpected(&other)),
        }
    }

    /// A stream's facts (`None`: no such stream).
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>, ClientError> {
        match self
            .call_retrying(&Request::StreamInfo {
                stream: stream.to_owned(),
            })
            .await?
        {
            Response::StreamInfo(i) => Ok(i),
            other => Err(unexpected(&other)),
        }
    }

    /// Stores `bytes` as a blob in the server's log store (BLOB_PUT, in pieces that fit
    /// its frames) and returns the reference an event gives to hold it as its payload
    /// ([`EventData::with_blob`]). An upload cut by a lost connection starts again from its
    /// first piece on a new one (up to [`ClientOptions::retries`] times).
    ///
    /// # Errors
    /// [`ClientError::Invalid`] for an empty blob or one above the format's limit (nothing
    /// is sent); `LimitExceeded` when the server's upload memory cannot take it now;
    /// `BlobUnavailable` when the log has no store or it
    /// fails; [`ClientError::Unexpected`] when the server's reference is not the hash of
    /// `bytes`.
    pub async fn put_blob(
        &self,
        bytes: &[u8],
    ) -> Result<tally_engine::format::blob::BlobRef, ClientError> {
        let _one = self.inner.uploading.lock().await;
        let expected = tally_engine::format::blob::BlobRef::of(bytes).map_err(|_| {
            ClientError::Invalid(ProtocolError::Limit {
                what: "blob bytes (at least 1)",
                value: bytes.len() as u64,
                max: tally_engine::format::blob::BLOB_BYTES_MAX,
            })
        })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.upload(bytes).await {
                Ok(b) if b == expected => return Ok(b),
                Ok(b) => {
                    return Err(ClientError::Unexpected(format!(
                        "the server stored {b:?} for a blob whose reference is {expected:?}"
                    )));
                }
                // The server keeps an upload per connection: on a new one it starts over.
                Err(e) if e.is_retryable() && attempt <= self.inner.opts.retries => {
                    tokio::time::sleep(self.inner.opts.retry_delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn upload(
        &self,
        bytes: &[u8],
    ) -> Result<tally_engine::format::blob::BlobRef, ClientError> {
        let piece = (self.hello().await?.limits.frame_bytes_max as usize)
            .saturating_sub(1024)
            .max(1024);
        let total = bytes.len() as u64;
        let mut offset = 0usize;
        let conn = self.conn().await?;
        loop {
            if offset > 0 && !Arc::ptr_eq(&self.conn().await?, &conn) {
                // The connection that holds the upload is gone.
                return Err(ClientError::Disconnected { reason: None });
            }
            let end = bytes.len().min(offset + piece);
            let r = match self
                .call(&Request::BlobPut {
                    offset: offset as u64,
                    total,
                    chunk: bytes[offset..end].to_vec(),
                })
                .await
            {
                // The piece went out on a new connection, which has no upload.
                Err(e)
                    if offset > 0
                        && e.code() == Some(ErrorCode::MalformedRequest)
                        && !Arc::ptr_eq(&self.conn().await?, &conn) =>
                {
                    return Err(ClientError::Disconnected { reason: None });
                }
                r => r?,
            };
            match r {
                Response::BlobPut {
                    blob: Some(b),
                    received,
                } if received == total && end == bytes.len() => return Ok(b),
                Response::BlobPut {
                    blob: None,
                    received,
                } if received == end as u64 && end < bytes.len() => offset = end,
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Reads a blob (BLOB_READ, in pieces) and checks it against its reference.
    ///
    /// # Errors
    /// `BlobUnavailable` when the server's store has no such blob or fails;
    /// [`ClientError::Unexpected`] when the bytes do not match the reference.
    pub async fn read_blob(
        &self,
        blob: &tally_engine::format::blob::BlobRef,
    ) -> Result<Vec<u8>, ClientError> {
        let size = usize::try_from(blob.size)
            .map_err(|_| ClientError::Unexpected(format!("a blob of {} bytes", blob.size)))?;
        let mut out = Vec::with_capacity(size.min(64 << 20));
        while out.len() < size {
            let r = self
                .call_retrying(&Request::BlobRead {
                    blob: *blob,
                    offset: out.len() as u64,
                    max: u32::MAX,
                })
                .await?;
            match r {
                Response::BlobPiece(p) if !p.is_empty() && p.len() <= size - out.len() => {
                    out.extend_from_slice(&p);
                }
                other => return Err(unexpected(&other)),
            }
        }
        if !blob.matches(&out) {
            return Err(ClientError::Unexpected(format!(
                "the server's bytes for {blob:?} do not match its hash"
            )));
        }
        Ok(out)
    }

    /// Server and log facts.
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn server_info(&self) -> Result<ServerInfo, ClientError> {
        match self.call_retrying(&Request::ServerInfo).await? {
            Response::ServerInfo(i) => Ok(i),
            other => Err(unexpected(&other)),
        }
    }

    /// Round trip.
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.call(&Request::Ping(b"tally".to_vec())).await? {
            Response::Pong(b) if b == b"tally" => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Stores a named consumer's position durably (in the log).
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn store_checkpoint(&self, name: &str, position: u64) -> Result<(), ClientError> {
        match self
            .call_retrying(&Request::CheckpointStore {
                name: name.to_owned(),
                position,
            })
            .await?
        {
            Response::CheckpointStored => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// A named consumer's stored position (`None`: never stored).
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn fetch_checkpoint(&self, name: &str) -> Result<Option<u64>, ClientError> {
        match self
            .call_retrying(&Request::CheckpointFetch {
                name: name.to_owned(),
            })
            .await?
        {
            Response::Checkpoint(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// The latest signed checkpoint, as its 224-byte entry (FORMAT.md §17).
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn latest_checkpoint(
        &self,
    ) -> Result<Option<tally_engine::format::checkpoint::SignedCheckpoint>, ClientError> {
        match self.call_retrying(&Request::LatestCheckpoint).await? {
            Response::LatestCheckpoint(None) => Ok(None),
            Response::LatestCheckpoint(Some(entry)) => {
                tally_engine::format::checkpoint::SignedCheckpoint::decode_entry(&entry[..])
                    .map(Some)
                    .map_err(|e| {
                        ClientError::Unexpected(format!("checkpoint does not decode: {e}"))
                    })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Checkpoint `id` (0: the latest) as a signed note with its cosignatures; `None` when
    /// the log has no such checkpoint. Parse it with
    /// [`tally_engine::format::note::Note::parse`] and trust it only through its signatures.
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn checkpoint_note_of(&self, id: u64) -> Result<Option<String>, ClientError> {
        match self.call_retrying(&Request::CheckpointNote { id }).await? {
            Response::CheckpointNote(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    /// The latest checkpoint as a signed note ([`Client::checkpoint_note_of`]).
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn checkpoint_note(&self) -> Result<Option<String>, ClientError> {
        self.checkpoint_note_of(0).await
    }

    /// A consistency proof from the tree of `old_size` records to that of `new_size`. The
    /// roots that come with it are the server's; a verifier checks the proof against roots
    /// of checkpoints it verified itself.
    ///
    /// # Errors
    /// As [`Client::read_stream`]; `ProofUnavailable` for sizes out of order or range.
    pub async fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<tally_engine::format::proof::ConsistencyProof, ClientError> {
        match self
            .call_retrying(&Request::ConsistencyProof { old_size, new_size })
            .await?
        {
            Response::ConsistencyProof(p) if p.old_size == old_size && p.new_size == new_size => {
                Ok(tally_engine::format::proof::ConsistencyProof {
                    old_size,
                    new_size,
                    path: p.path,
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Hands a witness's cosignature of checkpoint `checkpoint_id` to the log, which keeps
    /// it with the checkpoint. Returns `false` when that witness had cosigned it already.
    ///
    /// # Errors
    /// As [`Client::read_stream`]; `CosignatureRefused` when it names no checkpoint of the
    /// log or does not verify over it.
    pub async fn add_cosignature(
        &self,
        checkpoint_id: u64,
        cosignature: &tally_engine::format::note::Cosignature,
    ) -> Result<bool, ClientError> {
        match self
            .call_retrying(&Request::AddCosignature {
                checkpoint_id,
                cosignature: cosignature.clone(),
            })
            .await?
        {
            Response::CosignatureAdded(added) => Ok(added),
            other => Err(unexpected(&other)),
        }
    }

    /// An inclusion proof of the record at `position` in the tree of `tree_size` records
    /// (0: the latest checkpoint's size).
    ///
    /// # Errors
    /// As [`Client::read_stream`].
    pub async fn inclusion_proof(
        &self,
        position: u64,
        tree_size: u64,
    ) -> Result<ProofResponse, ClientError> {
        match self
            .call_retrying(&Request::InclusionProof {
                position,
                tree_size,
            })
            .await?
        {
            Response::InclusionProof(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// Subscribes to the whole log (filtered) or one stream, from a position (or version)
    /// or from now.
    ///
    /// # Errors
    /// The server's refusal; connection errors.
    pub async fn subscribe(
        &self,
        target: SubscribeTarget,
        from: SubscribeFrom,
    ) -> Result<Subscription, ClientError> {
        let mut s = Subscription {
            client: self.clone(),
            target,
            from,
            rx: None,
            id: 0,
            buf: VecDeque::new(),
            unacked: 0,
            conn: None,
        };
        s.start().await?;
        Ok(s)
    }
}

fn with_ids(mut events: Vec<EventData>) -> Vec<EventData> {
    for e in &mut events {
        if e.event_id.is_none() {
            e.event_id = Some(tally_engine::new_event_id());
        }
    }
    events
}

fn unexpected(r: &Response) -> ClientError {
    ClientError::Unexpected(format!("{r:?}"))
}

fn events_of(r: Response) -> Result<(Vec<Event>, u64, bool), ClientError> {
    match r {
        Response::Events { next, end, events } => Ok((events, next, end)),
        other => Err(unexpected(&other)),
    }
}

async fn open(inner: &Inner) -> Result<Arc<Conn>, ClientError> {
    let io = |source| ClientError::Io {
        addr: inner.addr.clone(),
        source,
    };
    let stream = TcpStream::connect(&inner.addr).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut hello = Vec::new();
    Request::Hello {
        min_version: 1,
        max_version: PROTOCOL_VERSION,
        client: inner.opts.name.clone(),
    }
    .encode(0, &mut hello);
    wr.write_all(&hello).await.map_err(io)?;
    let mut buf = BytesMut::with_capacity(64 << 10);
    let frame = read_frame(&mut rd, &mut buf, FRAME_BYTES_MAX_DEFAULT)
        .await
        .map_err(|e| match e {
            FrameError::Io(e) => io(e),
            FrameError::Protocol(p) => ClientError::Protocol(p),
        })?
        .ok_or(ClientError::Disconnected { reason: None })?;
    let hello = match Response::decode(&frame)?.1 {
        Response::Hello(h) => h,
        Response::Error(e) => return Err(ClientError::from_wire(e)),
        other => return Err(unexpected(&other)),
    };
    let conn = Arc::new(Conn {
        wr,
        out: parking_lot::Mutex::new(Outgoing::default()),
        out_ready: Notify::new(),
        pending: parking_lot::Mutex::new(Some(HashMap::new())),
        hello,
        closed: AtomicBool::new(false),
        close_when_idle: AtomicBool::new(false),
        tasks: parking_lot::Mutex::new(Vec::new()),
    });
    let writer_conn = Arc::clone(&conn);
    let writer = tokio::spawn(async move { writer_conn.write_queued().await });
    let reader_conn = Arc::clone(&conn);
    // The server's frames are at most what it announced, and never more than this client
    // accepts.
    let max = conn.hello.limits.frame_bytes_max.clamp(
        FRAME_BYTES_MAX_DEFAULT,
        inner.opts.frame_bytes_max.max(FRAME_BYTES_MAX_DEFAULT),
    );
    let reader = tokio::spawn(async move {
        let conn = reader_conn;
        let mut reason = None;
        while let Ok(Some(frame)) = read_frame(&mut rd, &mut buf, max).await {
            match Response::decode(&frame) {
                Ok((h, Response::Error(e))) if h.request_id == 0 => {
                    // A connection-level error: the server closes the connection.
                    reason = Some(e);
                }
                Ok((h, resp)) => {
                    conn.dispatch(h.request_id, resp);
                    if conn.close_when_idle.load(Ordering::SeqCst) && conn.idle() {
                        conn.close();
                        break;
                    }
                }
                Err(e) => {
                    reason = Some(WireError::new(
                        ErrorCode::MalformedRequest,
                        format!("client could not decode a frame: {e}"),
                    ));
                    break;
                }
            }
        }
        conn.fail_all(reason);
    });
    conn.tasks
        .lock()
        .extend([writer.abort_handle(), reader.abort_handle()]);
    Ok(conn)
}

enum FrameError {
    Io(std::io::Error),
    Protocol(ProtocolError),
}

async fn read_frame(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    max: u32,
) -> Result<Option<bytes::Bytes>, FrameError> {
    loop {
        if buf.len() >= LENGTH_BYTES {
            let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            protocol::check_frame_len(len, max).map_err(FrameError::Protocol)?;
            let total = LENGTH_BYTES + len as usize;
            if buf.len() >= total {
                buf.advance(LENGTH_BYTES);
                return Ok(Some(buf.split_to(len as usize).freeze()));
            }
            // Room for several large frames at once: once the frames split off earlier are
            // dropped, `reserve` takes the whole allocation back instead of allocating (and
            // page-faulting) a fresh one per frame.
            if total > (64 << 10) {
                buf.reserve(total.max(4 << 20));
            } else {
                buf.reserve(total - buf.len());
            }
        } else {
            buf.reserve(64 << 10);
        }
        match rd.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed inside a frame",
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
}

/// What a subscription yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionItem {
    /// The next event.
    Event(Event),
    /// Everything that existed has been delivered; from here on events are live. The
    /// number is the next position (all) or version (stream).
    CaughtUp(u64),
}

/// A subscription; see [`Client::subscribe`].
pub struct Subscription {
    client: Client,
    target: SubscribeTarget,
    /// Where the next event starts (updated as events are delivered).
    from: SubscribeFrom,
    rx: Option<mpsc::UnboundedReceiver<Result<Response, ClientError>>>,
    id: u32,
    buf: VecDeque<Event>,
    unacked: u32,
    conn: Option<Arc<Conn>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("target", &self.target)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    async fn start(&mut self) -> Result<(), ClientError> {
        let conn = self.client.conn().await?;
        let window = self.client.inner.opts.subscription_window.max(2);
        let (t, mut rx) = mpsc::unbounded_channel();
        let req = Request::Subscribe {
            target: self.target.clone(),
            from: self.from,
            credit: window,
        };
        req.check_encodable().map_err(ClientError::Invalid)?;
        let (id, _) = conn.register(self.client.ids(), Waiter::Stream(t))?;
        let mut frame = Vec::new();
        req.encode(id, &mut frame);
        conn.send_frame(id, frame, false)?;
        match rx.recv().await {
            Some(Ok(Response::Subscribed { start })) => {
                self.from = SubscribeFrom::At(start);
            }
            Some(Ok(Response::Error(e))) => return Err(ClientError::from_wire(e)),
            Some(Ok(other)) => return Err(unexpected(&other)),
            Some(Err(e)) => return Err(e),
            None => return Err(ClientError::Disconnected { reason: None }),
        }
        self.rx = Some(rx);
        self.id = id;
        self.unacked = 0;
        self.conn = Some(conn);
        Ok(())
    }

    /// The position (all) or version (stream) of the next event this subscription yields.
    #[must_use]
    pub fn next_from(&self) -> u64 {
        match (self.buf.front(), self.from, &self.target) {
            (Some(e), _, SubscribeTarget::All(_)) => e.position.0,
            (Some(e), _, SubscribeTarget::Stream(_)) => e.version,
            (None, SubscribeFrom::At(p), _) => p,
            (None, SubscribeFrom::Now, _) => 0,
        }
    }

    /// The next event (or the caught-up marker). After a lost connection it reconnects and
    /// resumes after the last event it yielded, so nothing is skipped or repeated.
    ///
    /// # Errors
    /// The server ended the subscription for a reason other than a shutdown, or the
    /// retries to reconnect are spent.
    pub async fn next(&mut self) -> Result<SubscriptionItem, ClientError> {
        let mut attempt = 0;
        let mut delay = self.client.inner.opts.retry_delay;
        loop {
            if let Some(e) = self.buf.pop_front() {
                self.from = SubscribeFrom::At(match self.target {
                    SubscribeTarget::All(_) => e.position.0 + 1,
                    SubscribeTarget::Stream(_) => e.version + 1,
                });
                self.consumed();
                return Ok(SubscriptionItem::Event(e));
            }
            let got = match &mut self.rx {
                Some(rx) => rx.recv().await,
                None => Some(Err(ClientError::Disconnected { reason: None })),
            };
            let err = match got {
                Some(Ok(Response::SubEvents(events))) => {
                    self.buf.extend(events);
                    continue;
                }
                Some(Ok(Response::SubCaughtUp(p))) => return Ok(SubscriptionItem::CaughtUp(p)),
                Some(Ok(Response::SubEnded(e) | Response::Error(e))) => ClientError::from_wire(e),
                Some(Ok(other)) => return Err(unexpected(&other)),
                Some(Err(e)) => e,
                None => ClientError::Disconnected { reason: None },
            };
            if !err.is_retryable() || attempt >= self.client.inner.opts.retries {
                return Err(err);
            }
            attempt += 1;
            tracing::debug!(error = %err, attempt, "subscription resuming on a new connection");
            self.rx = None;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
            match self.start().await {
                Ok(()) => {}
                Err(e) if e.is_retryable() => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Grants more credit once half the window has been consumed.
    fn consumed(&mut self) {
        self.unacked += 1;
        let window = self.client.inner.opts.subscription_window.max(2);
        if self.unacked >= window / 2
            && let Some(conn) = &self.conn
        {
            let mut frame = Vec::new();
            Request::Credit {
                subscription: self.id,
                credit: self.unacked,
            }
            .encode(self.client.next_id(), &mut frame);
            conn.write(&frame, false);
            self.unacked = 0;
        }
    }

    /// Ends the subscription; events already received are dropped.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn unsubscribe(mut self) -> Result<(), ClientError> {
        let Some(conn) = self.conn.take() else {
            return Ok(());
        };
        let id = self.id;
        let req = Request::Unsubscribe { subscription: id };
        let (t, rx) = oneshot::channel();
        let (rid, _) = conn.register(self.client.ids(), Waiter::Once(t))?;
        let mut frame = Vec::new();
        req.encode(rid, &mut frame);
        conn.send_frame(rid, frame, false)?;
        let r = (PendingResponse { rx }).wait().await;
        // No push follows the answer: the subscription's waiter goes.
        conn.forget(id);
        match r? {
            Response::Unsubscribed => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

impl Drop for Subscription {
    /// A subscription dropped without [`Subscription::unsubscribe`] is ended on the server
    /// (without waiting for the answer), so that it stops counting against the
    /// connection's subscriptions and keeping it busy.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.forget(self.id);
            if !conn.closed.load(Ordering::SeqCst) {
                let mut frame = Vec::new();
                Request::Unsubscribe {
                    subscription: self.id,
                }
                .encode(self.client.next_id(), &mut frame);
                conn.write(&frame, false);
            }
        }
    }
}
