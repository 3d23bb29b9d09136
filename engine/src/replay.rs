//! Replay validation: rebuild a projection from the log, and prove that it computes what
//! an archived run computed, or show the first aggregate and event where it does not.
//!
//! A run of a [`Traced`] projection records, for every event it folds, the aggregate the
//! event belongs to and a hash of that aggregate's part of the state after the event: a
//! [`Trace`]. An [`Archive`] keeps the trace's digest, the final state's hash, the
//! position, and the code and schema versions used, signed with Ed25519. A later
//! validation replays the same events with the current code and compares step by step:
//! equal digests prove the same computation; otherwise the first differing step names the
//! aggregate and the event.
//!
//! Hashes are BLAKE3 over the projection's own encodings, which must be canonical (the same
//! state always encodes to the same bytes: ordered maps, normalised decimals, no floats).
//!
//! This module uses only the log's public API.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::format::checkpoint::SignatureError;
use crate::log::{EventView, Log};
use crate::projection::{Projection, ProjectionError, apply_to, each_projected_event, with_view};

/// A projection whose state splits into per-aggregate parts, so that a replay can say
/// which aggregate diverged.
pub trait Traced: Projection {
    /// The aggregate `event` contributes to (`None`: it changes no aggregate's part).
    fn key_of(event: &dyn EventView) -> Option<String>;

    /// The canonical encoding of one aggregate's part of the state.
    fn encode_part(&self, key: &str) -> Vec<u8>;
}

/// One folded event in a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The event's position.
    pub position: u64,
    /// The aggregate it changed.
    pub key: String,
    /// BLAKE3 of that aggregate's part after the event.
    pub part_hash: [u8; 32],
}

/// What a run computed, step by step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// The steps, in fold order.
    pub steps: Vec<Step>,
    /// The first position not folded.
    pub next: u64,
    /// BLAKE3 of the final state's encoding.
    pub state_hash: [u8; 32],
}

impl Trace {
    /// BLAKE3 over every step (position, key length and key, part hash), the next position
    /// and the state hash: equal digests mean equal traces.
    #[must_use]
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"tally-trace-v1");
        for s in &self.steps {
            h.update(&s.position.to_le_bytes());
            h.update(&(s.key.len() as u64).to_le_bytes());
            h.update(s.key.as_bytes());
            h.update(&s.part_hash);
        }
        h.update(&self.next.to_le_bytes());
        h.update(&self.state_hash);
        *h.finalize().as_bytes()
    }
}

/// Folds positions `0..to` of the log (`$` streams excepted) into a fresh state, recording
/// the trace.
///
/// # Errors
/// [`ProjectionError`].
pub fn trace<P: Traced>(
    log: &Log,
    name: &str,
    to: u64,
) -> std::result::Result<(P, Trace), ProjectionError> {
    trace_with(log, name, to, None)
}

/// [`trace`], showing every event to the projection as its newest schema version through
/// `registry` when there is one, as a [`crate::projection::Projector`] with that registry
/// does.
///
/// # Errors
/// [`ProjectionError`].
pub fn trace_with<P: Traced>(
    log: &Log,
    name: &str,
    to: u64,
    registry: Option<&crate::schema::Registry>,
) -> std::result::Result<(P, Trace), ProjectionError> {
    trace_window(log, name, P::initial(), 0, to, registry)
}

/// Folds positions `from..to` into `start`, the state at `from` (for example an earlier
/// archive's), recording the trace of that window only.
///
/// # Errors
/// [`ProjectionError`].
pub fn trace_window<P: Traced>(
    log: &Log,
    name: &str,
    start: P,
    from: u64,
    to: u64,
    registry: Option<&crate::schema::Registry>,
) -> std::result::Result<(P, Trace), ProjectionError> {
    let end = log.next_position().0;
    if to > end {
        // A trace must not claim positions the log does not have (a log that lost its
        // tail would otherwise replay "identically" when the lost events left no step).
        return Err(ProjectionError::PastTheEnd { to, end });
    }
    let mut state = start;
    let mut steps = Vec::new();
    each_projected_event(log, from, to, |e| {
        // The aggregate key is read from the same (upcast) event the projection folds.
        with_view(&e, name, registry, |shown| {
            apply_to(&mut state, shown, name)?;
            if let Some(key) = P::key_of(shown) {
                let part_hash = *blake3::hash(&state.encode_part(&key)).as_bytes();
                steps.push(Step {
                    position: e.position.0,
                    key,
                    part_hash,
                });
            }
            Ok(())
        })
    })?;
    let state_hash = *blake3::hash(&state.encode_state()).as_bytes();
    Ok((
        state,
        Trace {
            steps,
            next: to,
            state_hash,
        },
    ))
}

/// Where a replay first differs from an archived trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Divergence {
    /// At this step the aggregate's part (or the aggregate, or the position) differs.
    Step {
        /// Index of the step.
        index: usize,
        /// The archived step.
        archived: Option<Step>,
        /// The replayed step.
        replayed: Option<Step>,
    },
    /// Every step agrees but the final states differ (a part of the state outside
    /// every aggregate).
    FinalState,
}

impl Divergence {
    /// The aggregate and the event position to look at first.
    #[must_use]
    pub fn first(&self) -> Option<(&str, u64)> {
        match self {
            Divergence::Step {
                archived, replayed, ..
            } => archived
                .as_ref()
                .or(replayed.as_ref())
                .map(|s| (s.key.as_str(), s.position)),
            Divergence::FinalState => None,
        }
    }
}

/// Compares a replayed trace with the archived one.
#[must_use]
pub fn compare(archived: &Trace, replayed: &Trace) -> Option<Divergence> {
    let n = archived.steps.len().max(replayed.steps.len());
    for i in 0..n {
        let (a, r) = (archived.steps.get(i), replayed.steps.get(i));
        if a != r {
            return Some(Divergence::Step {
                index: i,
                archived: a.cloned(),
                replayed: r.cloned(),
            });
        }
    }
    (archived.state_hash != replayed.state_hash).then_some(Divergence::FinalState)
}

/// A signed record of what a projection computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archive {
    /// The projection's name.
    pub projection: String,
    /// The log's id.
    pub log_id: [u8; 16],
    /// The first position not folded.
    pub next: u64,
    /// The projection's state version.
    pub state_version: u32,
    /// The version of the code that computed it (the operator's label, such as a git
    /// commit).
    pub code_version: String,
    /// The schema versions it read (the operator's label).
    pub schema_versions: String,
    /// BLAKE3 of the final state's encoding.
    pub state_hash: [u8; 32],
    /// [`Trace::digest`] of the run.
    pub trace_digest: [u8; 32],
    /// The state's encoding, so that the archived numbers can be shown and reloaded.
    pub state: Vec<u8>,
    /// The trace.
    pub trace: Trace,
    /// The signer's Ed25519 public key.
    pub public_key: [u8; 32],
    /// The signature over [`Archive::signed_bytes`].
    pub signature: [u8; 64],
}

impl Archive {
    /// Builds and signs the archive of a run.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        projection: &str,
        log_id: [u8; 16],
        state_version: u32,
        code_version: &str,
        schema_versions: &str,
        state: Vec<u8>,
        trace: Trace,
        key: &SigningKey,
    ) -> Archive {
        let mut a = Archive {
            projection: projection.to_owned(),
            log_id,
            next: trace.next,
            state_version,
            code_version: code_version.to_owned(),
            schema_versions: schema_versions.to_owned(),
            state_hash: trace.state_hash,
            trace_digest: trace.digest(),
            state,
            trace,
            public_key: key.verifying_key().to_bytes(),
            signature: [0; 64],
        };
        a.signature = key.sign(&a.signed_bytes()).to_bytes();
        a
    }

    /// The bytes the signature covers: a domain tag, then each field length-prefixed
    /// (`u64` LE) or fixed, in declaration order, ending with the trace digest.
    #[must_use]
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut b = b"tally-projection-archive-v1".to_vec();
        let mut field = |x: &[u8]| {
            b.extend_from_slice(&(x.len() as u64).to_le_bytes());
            b.extend_from_slice(x);
        };
        field(self.projection.as_bytes());
        field(&self.log_id);
        field(&self.next.to_le_bytes());
        field(&self.state_version.to_le_bytes());
        field(self.code_version.as_bytes());
        field(self.schema_versions.as_bytes());
        field(&self.state_hash);
        field(&self.trace_digest);
        b
    }

    /// Checks the signature, that the key is one of `trusted` (any, when empty), and
    /// that the stored state and trace match their signed hashes.
    ///
    /// # Errors
    /// [`SignatureError`]; a state or trace that does not match its hash is a
    /// [`SignatureError::BadSignature`] too (the signed content was altered).
    pub fn verify(&self, trusted: &[[u8; 32]]) -> std::result::Result<(), SignatureError> {
        let fingerprint = crate::format::checkpoint::fingerprint(&self.public_key);
        if !trusted.is_empty() && !trusted.contains(&self.public_key) {
            return Err(SignatureError::UntrustedKey { fingerprint });
        }
        let key = VerifyingKey::from_bytes(&self.public_key).map_err(|_| SignatureError::BadKey)?;
        let bad = || SignatureError::BadSignature {
            fingerprint: fingerprint.clone(),
        };
        key.verify(
            &self.signed_bytes(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| bad())?;
        if *blake3::hash(&self.state).as_bytes() != self.state_hash
            || self.trace.digest() != self.trace_digest
            || self.trace.state_hash != self.state_hash
            || self.trace.next != self.next
        {
            return Err(bad());
        }
        Ok(())
    }
}

/// The tag of an archive file's `format` field.
pub const ARCHIVE_FORMAT: &str = "tally-projection-archive-v1";

impl Archive {
    /// The archive as a JSON document (docs/EXTRACT.md, "Projection archive"): every
    /// field, the state in base64 and the whole trace, so that [`Archive::from_json`] gives
    /// back an archive that [`validate`] can check later, on another machine.
    #[must_use]
    pub fn to_json(&self) -> String {
        use crate::format::proof::hex;
        use base64::Engine as _;
        let steps: Vec<serde_json::Value> = self
            .trace
            .steps
            .iter()
            .map(|s| serde_json::json!([s.position, s.key, hex(&s.part_hash)]))
            .collect();
        serde_json::json!({
            "format": ARCHIVE_FORMAT,
            "projection": self.projection,
            "log_id": hex(&self.log_id),
            "next": self.next,
            "state_version": self.state_version,
            "code_version": self.code_version,
            "schema_versions": self.schema_versions,
            "state_hash": hex(&self.state_hash),
            "trace_digest": hex(&self.trace_digest),
            "state_base64": base64::engine::general_purpose::STANDARD.encode(&self.state),
            "trace": {
                "next": self.trace.next,
                "state_hash": hex(&self.trace.state_hash),
                "steps": steps,
            },
            "public_key": hex(&self.public_key),
            "signature": hex(&self.signature),
        })
        .to_string()
    }

    /// Reads an archive written by [`Archive::to_json`]. It is not verified: call
    /// [`Archive::verify`] (or [`validate`], which does) before trusting it.
    ///
    /// # Errors
    /// A message naming the first field that is missing or malformed.
    pub fn from_json(text: &str) -> std::result::Result<Archive, String> {
        use crate::format::proof::parse_hex;
        use base64::Engine as _;
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let s = |k: &str| {
            v[k].as_str()
                .ok_or_else(|| format!("missing or not a string: {k}"))
        };
        let n = |x: &serde_json::Value, k: &str| {
            x[k].as_u64()
                .ok_or_else(|| format!("missing or not a number: {k}"))
        };
        fn h<const N: usize>(
            x: &serde_json::Value,
            k: &str,
        ) -> std::result::Result<[u8; N], String> {
            x[k].as_str()
                .and_then(parse_hex::<N>)
                .ok_or_else(|| format!("missing or not {} hex digits: {k}", 2 * N))
        }
        if s("format")? != ARCHIVE_FORMAT {
            return Err(format!("not a {ARCHIVE_FORMAT} document"));
        }
        let t = &v["trace"];
        let steps = t["steps"]
            .as_array()
            .ok_or("missing or not an array: trace.steps")?
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let bad = || format!("trace.steps[{i}] is not [position, key, part hash]");
                let a = step.as_array().filter(|a| a.len() == 3).ok_or_else(bad)?;
                Ok(Step {
                    position: a[0].as_u64().ok_or_else(bad)?,
                    key: a[1].as_str().ok_or_else(bad)?.to_owned(),
                    part_hash: a[2].as_str().and_then(parse_hex::<32>).ok_or_else(bad)?,
                })
            })
            .collect::<std::result::Result<Vec<Step>, String>>()?;
        Ok(Archive {
            projection: s("projection")?.to_owned(),
            log_id: h(&v, "log_id")?,
            next: n(&v, "next")?,
            state_version: u32::try_from(n(&v, "state_version")?)
                .map_err(|_| "state_version is not a u32".to_owned())?,
            code_version: s("code_version")?.to_owned(),
            schema_versions: s("schema_versions")?.to_owned(),
            state_hash: h(&v, "state_hash")?,
            trace_digest: h(&v, "trace_digest")?,
            state: base64::engine::general_purpose::STANDARD
                .decode(s("state_base64")?)
                .map_err(|e| format!("state_base64: {e}"))?,
            trace: Trace {
                steps,
                next: n(t, "next")?,
                state_hash: h(t, "state_hash")?,
            },
            public_key: h(&v, "public_key")?,
            signature: h(&v, "signature")?,
        })
    }
}

/// The outcome of validating an archive against the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validation {
    /// The replay computed exactly what the archive records.
    Identical {
        /// The state hash both agree on.
        state_hash: [u8; 32],
        /// Events folded.
        steps: usize,
    },
    /// The replay differs; the first difference.
    Diverged(Divergence),
}

/// Replays the log up to the archive's position with the current code of `P` and compares.
/// The archive's signature is checked first (against `trusted`, any key when empty).
///
/// # Errors
/// [`ValidationError`].
pub fn validate<P: Traced>(
    log: &Log,
    archive: &Archive,
    trusted: &[[u8; 32]],
) -> std::result::Result<Validation, ValidationError> {
    validate_with::<P>(log, archive, trusted, None)
}

/// [`validate`], replaying through `registry` when there is one (as the run that made the
/// archive did, if it read upcast events).
///
/// # Errors
/// [`ValidationError`].
pub fn validate_with<P: Traced>(
    log: &Log,
    archive: &Archive,
    trusted: &[[u8; 32]],
    registry: Option<&crate::schema::Registry>,
) -> std::result::Result<Validation, ValidationError> {
    archive.verify(trusted)?;
    if archive.log_id != log.log_id() {
        return Err(ValidationError::OtherLog);
    }
    let (_, replayed) = trace_with::<P>(log, &archive.projection, archive.next, registry)?;
    Ok(match compare(&archive.trace, &replayed) {
        None => Validation::Identical {
            state_hash: replayed.state_hash,
            steps: replayed.steps.len(),
        },
        Some(d) => Validation::Diverged(d),
    })
}

/// Validates the window between two archives of one projection: replays positions
/// `earlier.next..later.next` with the current code of `P`, starting from the state
/// `earlier` archived, and compares with `later`'s steps in that window and its final
/// state. Both archives are verified first. A change made at a known date is checked over
/// the events after it only, without replaying the whole history. A divergence's step
/// index counts from the window's first step.
///
/// # Errors
/// [`ValidationError`]; [`ValidationError::Window`] when the two archives are not of one
/// projection, or the earlier one ends after the later one, or its state does not decode.
pub fn validate_window<P: Traced>(
    log: &Log,
    earlier: &Archive,
    later: &Archive,
    trusted: &[[u8; 32]],
    registry: Option<&crate::schema::Registry>,
) -> std::result::Result<Validation, ValidationError> {
    earlier.verify(trusted)?;
    later.verify(trusted)?;
    if earlier.log_id != log.log_id() || later.log_id != log.log_id() {
        return Err(ValidationError::OtherLog);
    }
    let window = |why: &str| ValidationError::Window(why.to_owned());
    if earlier.projection != later.projection || earlier.state_version != later.state_version {
        return Err(window(
            "the archives are of different projections or state versions",
        ));
    }
    if earlier.next > later.next {
        return Err(window("the earlier archive ends after the later one"));
    }
    if earlier.state_version != P::STATE_VERSION {
        return Err(window(
            "the archived state is of another state version than this code's",
        ));
    }
    let start = P::decode_state(&earlier.state)
        .ok_or_else(|| window("the earlier archive's state does not decode"))?;
    let (_, replayed) = trace_window::<P>(
        log,
        &later.projection,
        start,
        earlier.next,
        later.next,
        registry,
    )?;
    let archived = Trace {
        steps: later
            .trace
            .steps
            .iter()
            .filter(|s| s.position >= earlier.next)
            .cloned()
            .collect(),
        next: later.next,
        state_hash: later.state_hash,
    };
    Ok(match compare(&archived, &replayed) {
        None => Validation::Identical {
            state_hash: replayed.state_hash,
            steps: replayed.steps.len(),
        },
        Some(d) => Validation::Diverged(d),
    })
}

/// Why a validation could not be carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The archive's signature or content does not verify.
    #[error("the archive does not verify")]
    Signature(#[from] SignatureError),
    /// The archive was made from another log.
    #[error("the archive belongs to another log")]
    OtherLog,
    /// The replay failed.
    #[error(transparent)]
    Replay(#[from] ProjectionError),
    /// Two archives do not make a window.
    #[error("not a window: {0}")]
    Window(String),
}
