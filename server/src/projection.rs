//! Projections through a server: the same [`Projection`] code as embedded
//! (`tally_engine::projection`), fed by a subscription instead of the engine's tail, with
//! checkpoints stored through PROJECTION_STORE in the same stream and format
//! (`$projection-NAME`), so a projection can move between the two and resume.

use std::time::Duration;

use tally_engine::Direction;
use tally_engine::EventView;
use tally_engine::projection::{
    Projection, ProjectionState, ProjectionStatus, ProjectorOptions, SharedState,
    search_checkpoints,
};
use tally_engine::state_store::{StateError, StateSource, StreamEvent};

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
}

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
            .map_err(|e| StateError::Io(std::io::Error::other(e)))
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

impl<P: Projection + Send + 'static> RemoteProjector<P> {
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
        let (next, state, checkpoint) = match search.found {
            Some(c) => (c.next, c.state, Some(c.next)),
            None => (0, P::initial(), None),
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
        })
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
        let state = self.state.read().encode_state();
        let req = Request::ProjectionStore {
            name: self.name.clone(),
            next: self.next,
            state_version: P::STATE_VERSION,
            state,
        };
        match self.client.call(&req).await? {
            Response::CheckpointStored => {}
            other => {
                return Err(ClientError::Unexpected(format!("{other:?}")).into());
            }
        }
        self.since_checkpoint = 0;
        self.status.checkpoint = Some(self.next);
        Ok(())
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
