//! Projections through a server: the same [`Projection`] code as embedded
//! (`tally_engine::projection`), fed by a subscription instead of the engine's tail, with
//! checkpoints stored through PROJECTION_APPEND in the same stream and format
//! (`$projection-NAME`, parts under a manifest, FORMAT.md 18.4), so a projection can move
//! between the two and resume. A state of any size is sent a part (at most 1 MiB) per
//! request, encoded on a blocking thread a few parts ahead of the sends, so neither side
//! holds it whole and no frame needs to hold it.

use std::time::Duration;

use tally_engine::Direction;
use tally_engine::EventView;
use tally_engine::projection::{
    ChainHead, Projection, ProjectionState, ProjectionStatus, ProjectorOptions, SharedState,
    plan_checkpoint, search_checkpoints, write_checkpoint_content,
};
use tally_engine::state_store::{
    self, INLINE_BYTES_MAX, Manifest, PartCutter, PartRef, StateError, StateSource, Stored,
    StreamEvent,
};

use crate::client::{Client, ClientError, Subscription, SubscriptionItem};
use crate::protocol::{Filter, Request, Response, SubscribeFrom, SubscribeTarget};

/// Why a remote projection stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteProjectionError {
    /// The server or the connection failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A checkpoint could not be read or written.
    #[error("projection {name}: checkpoint: {source}")]
    Checkpoint {
        /// The projection.
        name: String,
        /// Why.
        source: StateError,
    },
    /// The projection refused an event; it stays at that event.
    #[error("projection {name}: the event at position {position} was refused: {reason}")]
    Apply {
        /// The projection.
        name: String,
        /// The event's position.
        position: u64,
        /// The projection's reason.
        reason: String,
    },
}

/// Runs one projection against a server.
pub struct RemoteProjector<P> {
    client: Client,
    name: String,
    state: SharedState<P>,
    next: u64,
    opts: ProjectorOptions,
    since_checkpoint: u64,
    status: ProjectionStatus,
    sub: Option<Subscription>,
    registry: Option<tally_engine::schema::Registry>,
    head: Option<ChainHead>,
    force_full: bool,
    refused: Vec<(u64, StateError)>,
}

/// Parts cut from a checkpoint's content on a blocking thread, handed to the sender a few
/// at a time.
struct ChannelParts {
    cutter: PartCutter,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    sent: usize,
}

impl ChannelParts {
    fn send_ready(&mut self) -> std::io::Result<()> {
        for part in self.cutter.take_ready() {
            self.tx
                .blocking_send(part)
                .map_err(|_| std::io::Error::other("the checkpoint's sender stopped"))?;
            self.sent += 1;
        }
        Ok(())
    }
}

impl std::io::Write for ChannelParts {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.cutter.write(buf)?;
        self.send_ready()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A checkpoint's content as the encoder thread ends it: length, hash, each part's length
/// and hash, and the content itself when it is carried inline.
type Encoded = (
    u64,
    tally_engine::Hash32,
    Vec<(u32, tally_engine::Hash32)>,
    Vec<u8>,
);

/// Reads the server's schema registry (`$schemas`), for [`RemoteProjector::set_registry`].
/// Upcasters are code: set them on the registry returned.
///
/// # Errors
/// [`RemoteProjectionError::Client`]; a registration that does not decode is a
/// [`RemoteProjectionError::Apply`] naming it.
pub async fn load_registry(
    client: &Client,
) -> Result<tally_engine::schema::Registry, RemoteProjectionError> {
    let mut registry = tally_engine::schema::Registry::default();
    loop {
        let (page, _, end) = client
            .read_stream(
                tally_engine::schema::SCHEMA_STREAM,
                registry.loaded(),
                256,
                Direction::Forward,
            )
            .await?;
        for e in &page {
            registry
                .add_registration(e.version, e.payload())
                .map_err(|err| RemoteProjectionError::Apply {
                    name: tally_engine::schema::SCHEMA_STREAM.to_owned(),
                    position: e.position.0,
                    reason: err.to_string(),
                })?;
        }
        if end || page.is_empty() {
            return Ok(registry);
        }
    }
}

/// A checkpoint stream read through a server, from a blocking thread.
struct ServerSource {
    client: Client,
    stream: String,
    runtime: tokio::runtime::Handle,
}

impl ServerSource {
    fn read(
        &self,
        version: u64,
        direction: Direction,
    ) -> Result<Vec<crate::protocol::Event>, StateError> {
        self.runtime
            .block_on(self.client.read_stream(&self.stream, version, 1, direction))
            .map(|(page, _, _)| page)
            .map_err(|e| StateError::Unavailable(std::io::Error::other(e)))
    }
}

impl StateSource for ServerSource {
    fn at_or_before(&mut self, version: u64) -> Result<Option<StreamEvent>, StateError> {
        Ok(self
            .read(version, Direction::Backward)?
            .into_iter()
            .next()
            .map(|e| (e.version, e.event_type().to_owned(), e.payload().to_vec())))
    }

    fn at(&mut self, version: u64) -> Result<Option<(String, Vec<u8>)>, StateError> {
        Ok(self
            .read(version, Direction::Forward)?
            .into_iter()
            .find(|e| e.version == version)
            .map(|e| (e.event_type().to_owned(), e.payload().to_vec())))
    }
}

impl<P> std::fmt::Debug for RemoteProjector<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteProjector")
            .field("name", &self.name)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl<P: Projection + Send + Sync + 'static> RemoteProjector<P> {
    /// Opens projection `name` from its latest usable checkpoint on the server, or from
    /// the start. Checkpoints are found and checked as the embedded projector does
    /// (`tally_engine::projection::search_checkpoints`), one event at a time, on a
    /// blocking thread.
    ///
    /// # Errors
    /// [`RemoteProjectionError::Client`], or [`RemoteProjectionError::Checkpoint`] when
    /// the server fails while checkpoints are read (a refused checkpoint is passed over).
    pub async fn open(
        client: &Client,
        name: &str,
        opts: ProjectorOptions,
    ) -> Result<RemoteProjector<P>, RemoteProjectionError> {
        let mut source = ServerSource {
            client: client.clone(),
            stream: tally_engine::projection::checkpoint_stream(name),
            runtime: tokio::runtime::Handle::current(),
        };
        let search = tokio::task::spawn_blocking(move || search_checkpoints::<P>(&mut source))
            .await
            .map_err(|e| ClientError::Unexpected(format!("the checkpoint search stopped: {e}")))?
            .map_err(|source| RemoteProjectionError::Checkpoint {
                name: name.to_owned(),
                source,
            })?;
        let (next, state, checkpoint, head) = match search.found {
            Some(c) => (c.next, c.state, Some(c.next), c.head),
            None => (0, P::initial(), None, None),
        };
        Ok(RemoteProjector {
            client: client.clone(),
            name: name.to_owned(),
            state: std::sync::Arc::new(parking_lot::RwLock::new(state)),
            next,
            opts,
            since_checkpoint: 0,
            status: ProjectionStatus::opened(next, checkpoint),
            sub: None,
            registry: None,
            head,
            force_full: false,
            refused: search.refused,
        })
    }

    /// The checkpoints [`RemoteProjector::open`] passed over because they did not load (a
    /// damaged, missing or misnamed part), newest first: the stream version of each
    /// manifest and why.
    #[must_use]
    pub fn refused_checkpoints(&self) -> &[(u64, StateError)] {
        &self.refused
    }

    /// Shows every event to the projection as its newest schema version, as the embedded
    /// `Projector::set_registry` does ([`load_registry`] reads the server's).
    pub fn set_registry(&mut self, registry: tally_engine::schema::Registry) {
        self.registry = Some(registry);
    }

    /// Folds one event into `state`, through the registry when there is one.
    fn apply_to(&self, state: &mut P, e: &dyn EventView) -> Result<(), String> {
        tally_engine::schema::with_newest(self.registry.as_ref(), e, |shown| state.apply(shown))
    }

    fn refused(&mut self, position: u64, reason: String) -> RemoteProjectionError {
        self.status.state = ProjectionState::Failed;
        self.status.errors += 1;
        self.status.last_error = Some(reason.clone());
        RemoteProjectionError::Apply {
            name: self.name.clone(),
            position,
            reason,
        }
    }

    /// Rebuilds the state from the first event into a new state, read from the server
    /// while the current one keeps serving readers, then replaces it and checkpoints; the
    /// next [`RemoteProjector::run_until`] goes on from there. For a changed handler, or a
    /// state in doubt.
    ///
    /// # Errors
    /// [`RemoteProjectionError`]; on an error the old state keeps serving.
    pub async fn rebuild(&mut self) -> Result<(), RemoteProjectionError> {
        self.status.state = ProjectionState::Rebuilding;
        let rebuilt = self.rebuild_inner().await;
        if let Err(e) = &rebuilt
            && self.status.state == ProjectionState::Rebuilding
        {
            // A failure of the server or the connection (a refusal is recorded already).
            self.status.state = ProjectionState::Failed;
            self.status.errors += 1;
            self.status.last_error = Some(e.to_string());
        }
        rebuilt
    }

    async fn rebuild_inner(&mut self) -> Result<(), RemoteProjectionError> {
        let upto = self.client.server_info().await?.next_position;
        let mut fresh = P::initial();
        let mut from = 0;
        while from < upto {
            let (page, next, end) = self
                .client
                .read_all(from, 4096, Direction::Forward, &Filter::default())
                .await?;
            for e in page.iter().filter(|e| e.position.0 < upto) {
                if e.stream().starts_with('$') {
                    continue;
                }
                if let Err(reason) = self.apply_to(&mut fresh, e as &dyn EventView) {
                    return Err(self.refused(e.position.0, reason));
                }
            }
            if end {
                break;
            }
            if next <= from {
                return Err(ClientError::Unexpected(format!(
                    "the server's read did not advance from position {from}"
                ))
                .into());
            }
            from = next;
        }
        *self.state.write() = fresh;
        self.next = upto;
        self.sub = None;
        self.force_full = true;
        self.checkpoint().await?;
        self.status.state = ProjectionState::Stopped;
        Ok(())
    }

    /// The state, for readers on any thread.
    #[must_use]
    pub fn shared_state(&self) -> SharedState<P> {
        std::sync::Arc::clone(&self.state)
    }

    /// The status.
    #[must_use]
    pub fn status(&self) -> ProjectionStatus {
        let mut s = self.status.clone();
        s.position = self.next;
        s
    }

    /// Writes a checkpoint of the state and position now.
    ///
    /// # Errors
    /// [`RemoteProjectionError::Client`].
    pub async fn checkpoint(&mut self) -> Result<(), RemoteProjectionError> {
        match self.store_checkpoint().await {
            Ok(head) => {
                self.head = Some(head);
                self.force_full = false;
            }
            Err(e) => {
                // The changed keys were taken: only a full checkpoint is whole now.
                self.force_full = true;
                return Err(e);
            }
        }
        self.since_checkpoint = 0;
        self.status.checkpoint = Some(self.next);
        Ok(())
    }

    /// Sends a checkpoint's parts, then its manifest (the commit point).
    async fn store_checkpoint(&mut self) -> Result<ChainHead, RemoteProjectionError> {
        let force_full = self.force_full;
        // From here the changed keys are taken: until this checkpoint is stored and the head
        // moved to it, only a full checkpoint is whole, even if this future is dropped
        // (a timeout or a shutdown around `run_until`).
        self.force_full = true;
        let plan = plan_checkpoint(&self.state, self.next, self.head, force_full, &self.opts);
        let part_bytes = self
            .opts
            .parts
            .part_bytes
            .clamp(1, state_store::PART_BYTES_MAX);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let state = std::sync::Arc::clone(&self.state);
        let encoding = plan.clone();
        let encoder = tokio::task::spawn_blocking(move || -> std::io::Result<Encoded> {
            let mut w = ChannelParts {
                cutter: PartCutter::new(part_bytes),
                tx,
                sent: 0,
            };
            write_checkpoint_content(&*state.read(), &encoding, &mut w)?;
            let (len, hash, refs) = w.cutter.finish();
            if w.sent == 0 && len <= INLINE_BYTES_MAX.min(part_bytes) as u64 {
                return Ok((len, hash, refs, w.cutter.take_ready().concat()));
            }
            w.send_ready()?;
            Ok((len, hash, refs, Vec::new()))
        });
        let refused = |source: StateError| RemoteProjectionError::Checkpoint {
            name: self.name.clone(),
            source,
        };
        let mut versions = Vec::new();
        while let Some(payload) = rx.recv().await {
            versions.push(self.projection_append(false, payload).await?);
        }
        let (content_bytes, content_hash, refs, inline) = encoder
            .await
            .map_err(|e| ClientError::Unexpected(format!("the checkpoint's encoder stopped: {e}")))?
            .map_err(|e| refused(StateError::from_io(e)))?;
        let parts: Vec<PartRef> = versions
            .iter()
            .zip(&refs)
            .map(|(&version, &(len, hash))| PartRef { version, len, hash })
            .collect();
        if inline.is_empty() && parts.len() != refs.len() {
            return Err(refused(StateError::ContentMismatch(
                "fewer parts were stored than the content was cut into",
            )));
        }
        let manifest = Manifest {
            at: plan.head.at,
            state_version: plan.head.state_version,
            kind: plan.head.kind,
            depth: plan.head.depth,
            content_bytes,
            content_hash,
            base: plan.head.base,
            previous: plan.head.previous,
            parts,
            inline,
        };
        let payload = manifest.encode();
        let hash = state_store::manifest_hash(&payload);
        let version = self.projection_append(true, payload).await?;
        let stored = Stored {
            version,
            hash,
            content_bytes,
            parts: manifest.parts.len(),
        };
        Ok(ChainHead::after(self.head, plan.head.kind, &stored))
    }

    /// Appends one part or the manifest; returns its version in the checkpoint stream.
    async fn projection_append(
        &self,
        manifest: bool,
        payload: Vec<u8>,
    ) -> Result<u64, RemoteProjectionError> {
        let req = Request::ProjectionAppend {
            name: self.name.clone(),
            manifest,
            payload,
        };
        match self.client.call(&req).await? {
            Response::Appended(r) => Ok(r.last_version),
            other => Err(ClientError::Unexpected(format!("{other:?}")).into()),
        }
    }

    /// Folds events, catching up and then live, until the next position to fold is at
    /// least `target` or `idle` passes with no event; then checkpoints. Returns the next
    /// position.
    ///
    /// # Errors
    /// [`RemoteProjectionError`]; after a refusal the projection stays at that event.
    pub async fn run_until(
        &mut self,
        target: u64,
        idle: Duration,
    ) -> Result<u64, RemoteProjectionError> {
        self.status.state = ProjectionState::Running;
        if self.sub.is_none() {
            let sub = self
                .client
                .subscribe(
                    SubscribeTarget::All(Filter::default()),
                    SubscribeFrom::At(self.next),
                )
                .await?;
            self.sub = Some(sub);
        }
        while self.next < target {
            let Some(sub) = self.sub.as_mut() else { break };
            let item = match tokio::time::timeout(idle, sub.next()).await {
                Err(_) => break,
                Ok(item) => item?,
            };
            let SubscriptionItem::Event(e) = item else {
                continue;
            };
            let position = e.position.0;
            if !e.stream().starts_with('$') {
                let state = std::sync::Arc::clone(&self.state);
                let applied = self.apply_to(&mut state.write(), &e as &dyn EventView);
                if let Err(reason) = applied {
                    self.sub = None;
                    return Err(self.refused(position, reason));
                }
                self.status.events_applied += 1;
                self.since_checkpoint += 1;
            }
            self.next = position + 1;
            if self.since_checkpoint >= self.opts.checkpoint_every.max(1) {
                self.checkpoint().await?;
            }
        }
        if self.since_checkpoint > 0 {
            self.checkpoint().await?;
        }
        self.status.state = ProjectionState::Stopped;
        Ok(self.next)
    }
}
