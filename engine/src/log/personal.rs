//! Personal data: sealed at append with a key of its data subject, opened at read, and
//! erased by destroying the key (docs/FORMAT.md 6.6, 18.7 and 22, ADR 0012).
//!
//! - **Append.** An event that marks personal data ([`EventData::personal`]) has the marked
//!   fields (or its whole payload) encrypted under its subject's current key, taken from the
//!   log's [`KeyStore`]; fields marked for tokenisation become stable tokens. The record
//!   then holds only ciphertext, and its hash, the chain and every proof cover that.
//! - **Read.** Every read of the log's API opens sealed events: the fields come back when
//!   the key is live; after an erasure, each erased field (or the payload) reads as a marker
//!   `{"$erased": {"subject": S, "by": P}}` naming the erasure event.
//! - **Erasure.** [`Log::forget`] refuses while a legal hold covers any event of the subject,
//!   then appends a signed `$SubjectErased` event to `$erasures`, makes it durable, and
//!   destroys the key. An open redoes the destruction of every recorded erasure (a crash
//!   between the event and the destruction), and reads consult the recorded erasures
//!   before the key store, so an erasure holds from the moment its event is durable.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::format::envelope::{ContentType, EnvelopeRef, PayloadForm};
use crate::format::proof::hex;
use crate::format::record::BodyForm;
use crate::format::sealed::{self, SealScope, SealedRef, SubjectHash, subject_hash};
use crate::format::{EventId, Position};
use crate::keys::{self, KeyLookup, KeyStore, SecretKey};
use crate::log::read::Verify;
use crate::log::shared::Shared;
use crate::log::{
    AppendRequest, Direction, EventData, ExpectedVersion, Log, RecordedEvent, append, new_event_id,
    read,
};

/// The system stream of erasure events.
pub const ERASURE_STREAM: &str = "$erasures";
/// The event type of an erasure.
pub const SUBJECT_ERASED: &str = "$SubjectErased";
/// The key of the marker an erased field or payload reads as.
pub const ERASED_MARKER: &str = "$erased";
/// The key of the marker a sealed field reads as when its key cannot be had (no key store,
/// or a store that does not hold it).
pub const SEALED_MARKER: &str = "$sealed";
/// The context of the statement an erasure event's signature covers.
pub const ERASURE_STATEMENT: &str = "tally erasure v1";

/// Personal data in an event: whose it is, and what of the payload is theirs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Personal {
    /// The data subject's id (a client id, a trader id): what `forget` names. Segments keep
    /// only its hash.
    pub subject: String,
    /// What is sealed.
    pub scope: PersonalScope,
    /// Top-level fields of the JSON payload stored as stable tokens ([`keys::token`])
    /// instead of their values: projections can join on them without seeing them. A forget
    /// does not change them.
    pub tokens: Vec<String>,
    /// Set on the copy the append makes once the payload is sealed.
    sealed: bool,
}

/// What of a payload is personal data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PersonalScope {
    /// The whole payload (any content type).
    Payload,
    /// These top-level fields of a JSON object payload (a field the payload does not have is
    /// skipped).
    Fields(Vec<String>),
}

impl Personal {
    /// The fields `fields` of a JSON payload belong to `subject`.
    #[must_use]
    pub fn fields<S: Into<String>>(
        subject: impl Into<String>,
        fields: impl IntoIterator<Item = S>,
    ) -> Personal {
        Personal {
            subject: subject.into(),
            scope: PersonalScope::Fields(fields.into_iter().map(Into::into).collect()),
            tokens: Vec::new(),
            sealed: false,
        }
    }

    /// The whole payload belongs to `subject`.
    #[must_use]
    pub fn payload(subject: impl Into<String>) -> Personal {
        Personal {
            subject: subject.into(),
            scope: PersonalScope::Payload,
            tokens: Vec::new(),
            sealed: false,
        }
    }

    /// Also stores these fields as tokens.
    #[must_use]
    pub fn with_tokens<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Personal {
        self.tokens = fields.into_iter().map(Into::into).collect();
        self
    }

    /// Whether the append sealed this copy's payload.
    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed
    }
}

/// A recorded erasure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Erasure {
    /// Every key generation up to this one is erased.
    pub generation: u32,
    /// The `$SubjectErased` event.
    pub position: Position,
}

/// The payload of a `$SubjectErased` event (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectErased {
    /// The subject's id hash, in hexadecimal.
    pub subject: String,
    /// Key generations up to this one are erased.
    pub generation: u32,
    /// Why (a request's reference, a legal basis).
    pub reason: String,
    /// The log's id, in hexadecimal (what the signature binds it to).
    pub log_id: String,
    /// The log's Ed25519 signature over [`SubjectErased::statement`], in hexadecimal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The public key that signed, in hexadecimal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl SubjectErased {
    /// The bytes the signature covers: [`ERASURE_STATEMENT`], the log id, the subject, the
    /// generation and the reason, one per line.
    #[must_use]
    pub fn statement(&self) -> Vec<u8> {
        format!(
            "{ERASURE_STATEMENT}\n{}\n{}\n{}\n{}\n",
            self.log_id, self.subject, self.generation, self.reason
        )
        .into_bytes()
    }

    /// Whether the signature verifies under `key` (a log's public key).
    #[must_use]
    pub fn signature_verifies(&self, key: &[u8; 32]) -> bool {
        let (Some(sig), Some(k)) = (&self.signature, &self.key) else {
            return false;
        };
        if *k != hex(key) {
            return false;
        }
        let Some(sig) = crate::format::proof::parse_hex::<64>(sig) else {
            return false;
        };
        ed25519_dalek::VerifyingKey::from_bytes(key).is_ok_and(|vk| {
            vk.verify_strict(
                &self.statement(),
                &ed25519_dalek::Signature::from_bytes(&sig),
            )
            .is_ok()
        })
    }
}

/// What became of a sealed event's personal data when it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealing {
    /// The subject.
    pub subject: SubjectHash,
    /// The key generation it was sealed under.
    pub generation: u32,
    /// The sealed fields; `None` for a sealed whole payload.
    pub fields: Option<Vec<String>>,
    /// Opened, erased, or unavailable.
    pub state: SealState,
}

/// See [`Sealing`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SealState {
    /// The key opened it: the payload reads as appended.
    Opened,
    /// The subject was erased: markers stand in its place. `by` is the erasure event
    /// (`None` when the key is gone but no erasure event names it, which only a change to
    /// the key store outside Tally causes).
    Erased {
        /// The `$SubjectErased` event.
        by: Option<Position>,
    },
    /// The key could not be had (no key store, one that does not hold it, or one that
    /// fails): markers stand in its place, and nothing is erased.
    Unavailable {
        /// Why.
        reason: String,
    },
}

fn invalid(reason: String) -> Error {
    Error::InvalidAppend { reason }
}

/// Seals the personal data of `requests`: `None` when no event marks any (the common case,
/// one check per event), else a copy of every request's events with each marked event's
/// payload sealed.
pub(crate) fn seal_requests(
    shared: &Shared,
    requests: &[AppendRequest<'_>],
    signed: bool,
    may_block: append::Blocking,
) -> Result<Option<Vec<Vec<EventData>>>> {
    if !requests
        .iter()
        .any(|r| r.events.iter().any(|e| e.personal.is_some()))
    {
        return Ok(None);
    }
    let Some(store) = shared.opts.keys.as_deref() else {
        return Err(invalid(
            "an event marks personal data, and this log has no key store".into(),
        ));
    };
    if !shared.meta.layout.allows_sealing() {
        return Err(invalid(format!(
            "an event marks personal data, and a log of format version {} cannot seal it",
            shared.meta.layout.version()
        )));
    }
    if signed {
        return Err(invalid(
            "a producer-signed batch cannot mark personal data: the engine would change what the producer signed".into(),
        ));
    }
    if may_block == append::Blocking::Refused {
        // The key store is I/O (a new subject's key is synced before use).
        return Err(Error::WouldBlock);
    }
    let mut subjects = Vec::new();
    for (index, (stream, ev)) in requests
        .iter()
        .flat_map(|r| r.events.iter().map(move |e| (r.stream, e)))
        .enumerate()
    {
        let Some(p) = &ev.personal else { continue };
        if p.sealed {
            return Err(invalid(format!(
                "event {index} claims an already sealed payload"
            )));
        }
        if stream.starts_with('$') {
            return Err(invalid(format!(
                "event {index}: a system stream ({stream}) holds no personal data"
            )));
        }
        if ev.blob.is_some() {
            return Err(invalid(format!(
                "event {index}: a payload given as a blob reference cannot be sealed"
            )));
        }
        if p.subject.is_empty() || p.subject.len() > 256 {
            return Err(invalid(format!(
                "event {index}: a data subject's id is 1 to 256 bytes"
            )));
        }
        if matches!(p.scope, PersonalScope::Fields(_)) || !p.tokens.is_empty() {
            if ev.content_type != ContentType::Json {
                return Err(invalid(format!(
                    "event {index}: personal fields need a JSON payload"
                )));
            }
            if matches!(p.scope, PersonalScope::Payload) {
                return Err(invalid(format!(
                    "event {index}: tokens are fields of a payload that is not sealed whole"
                )));
            }
        }
        if needs_key(p) {
            subjects.push(subject_hash(&p.subject));
        }
    }
    // A subject erased gets a generation after the erased ones, whatever the store says
    // (a store restored from an older copy, or whose destruction was torn).
    let subjects: Vec<(SubjectHash, u32)> = {
        let erased = shared.erasures.read();
        subjects
            .into_iter()
            .map(|s| {
                let min = erased.get(&s).map_or(1, |e| e.generation.saturating_add(1));
                (s, min)
            })
            .collect()
    };
    let keys = store.keys_at_least(&subjects)?;
    if keys.iter().zip(&subjects).any(|((g, _), (_, min))| g < min) {
        return Err(Error::Keys {
            path: store.location().to_owned(),
            detail: "the key store gave a key of an erased generation".into(),
            source: None,
        });
    }
    let mut keys = keys.into_iter();
    // Each event with the key it is sealed under, in batch order.
    let mut work: Vec<SealWork<'_>> = Vec::new();
    for (index, ev) in requests.iter().flat_map(|r| r.events.iter()).enumerate() {
        let key = match &ev.personal {
            Some(p) if needs_key(p) => Some(
                keys.next()
                    .ok_or_else(|| invalid("the key store gave fewer keys than asked".into()))?,
            ),
            _ => None,
        };
        work.push((index, ev, key));
    }
    let token_key = store.token_key();
    let seal = |chunk: &[SealWork<'_>]| -> Result<Vec<EventData>> {
        chunk
            .iter()
            .map(|(index, ev, key)| match &ev.personal {
                None => Ok((*ev).clone()),
                Some(p) => seal_one(ev, p, key.as_ref(), token_key, *index),
            })
            .collect()
    };
    // A large batch is sealed on every core (an appender uses one): each event on its own.
    let sealed_events = work.iter().filter(|w| w.1.personal.is_some()).count();
    let cores = if sealed_events >= PARALLEL_SEAL_MIN {
        cores()
    } else {
        1
    };
    let mut flat: Vec<EventData> = if cores > 1 {
        let per = work.len().div_ceil(cores.min(PARALLEL_SEAL_THREADS));
        let parts: Vec<Result<Vec<EventData>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = work
                .chunks(per)
                .map(|chunk| scope.spawn(move || seal(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(invalid("a sealing thread panicked".into())))
                })
                .collect()
        });
        let mut flat = Vec::with_capacity(work.len());
        for part in parts {
            flat.extend(part?);
        }
        flat
    } else {
        seal(&work)?
    };
    let mut out = Vec::with_capacity(requests.len());
    for r in requests.iter().rev() {
        let rest = flat.split_off(flat.len() - r.events.len());
        out.push(rest);
    }
    out.reverse();
    Ok(Some(out))
}

/// An event of a batch to seal: its index, the event, and the key it is sealed under.
type SealWork<'e> = (usize, &'e EventData, Option<(u32, SecretKey)>);

/// The cores this process may use, asked once (the question reads cgroup files).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// Sealed events in one append from which the sealing is spread over the cores.
const PARALLEL_SEAL_MIN: usize = 256;
/// The most threads one append seals on.
const PARALLEL_SEAL_THREADS: usize = 4;

/// Whether sealing `p` needs a key: something of the payload is sealed (not tokens only).
fn needs_key(p: &Personal) -> bool {
    match &p.scope {
        PersonalScope::Payload => true,
        PersonalScope::Fields(f) => !f.is_empty(),
    }
}

fn seal_one(
    ev: &EventData,
    p: &Personal,
    key: Option<&(u32, SecretKey)>,
    token_key: &SecretKey,
    index: usize,
) -> Result<EventData> {
    let event_id = ev.event_id.unwrap_or_else(new_event_id);
    let subject = subject_hash(&p.subject);
    let mut out = ev.clone();
    out.event_id = Some(event_id);
    let (clear, names, plaintext) = match &p.scope {
        PersonalScope::Payload => (Vec::new(), Vec::new(), ev.payload.clone()),
        PersonalScope::Fields(fields) => {
            let mut obj: Map<String, Value> = match serde_json::from_slice(&ev.payload) {
                Ok(Value::Object(o)) => o,
                _ => {
                    return Err(invalid(format!(
                        "event {index}: personal fields need a payload that is a JSON object"
                    )));
                }
            };
            for t in &p.tokens {
                if let Some(v) = obj.get_mut(t) {
                    let bytes = serde_json::to_vec(v).unwrap_or_default();
                    *v = Value::String(keys::token(token_key, &bytes));
                }
            }
            let mut secret = Map::new();
            for f in fields {
                if let Some(v) = obj.remove(f) {
                    secret.insert(f.clone(), v);
                }
            }
            let clear = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
            if secret.is_empty() {
                // Nothing of the subject's is in this payload: tokens only.
                out.payload = clear;
                out.personal = None;
                return Ok(out);
            }
            // Sorted: the bytes must not depend on the JSON map's order (which a build
            // with `serde_json/preserve_order` changes).
            let mut names: Vec<&String> = secret.keys().collect();
            names.sort();
            let names = serde_json::to_vec(&names).unwrap_or_default();
            let plaintext = serde_json::to_vec(&Value::Object(secret)).unwrap_or_default();
            (clear, names, plaintext)
        }
    };
    let Some((generation, key)) = key else {
        return Err(invalid(format!("event {index}: no key to seal it with")));
    };
    let generation = *generation;
    let scope = match p.scope {
        PersonalScope::Payload => SealScope::Payload,
        PersonalScope::Fields(_) => SealScope::Fields,
    };
    let nonce = keys::nonce()?;
    let (head, aad) = sealed::head(
        scope, generation, &subject, &nonce, &clear, &names, event_id,
    )
    .map_err(|source| Error::InvalidEvent { index, source })?;
    let ct = keys::encrypt_with(key, &nonce, &aad, &plaintext);
    out.payload = sealed::finish(head, &ct);
    out.personal = Some(Personal {
        sealed: true,
        ..p.clone()
    });
    Ok(out)
}

/// Opens the sealed events among `events` ([`open_event`]).
pub(crate) fn open_events(shared: &Shared, events: &mut [RecordedEvent]) {
    for e in events {
        open_event(shared, e);
    }
}

/// Opens a sealed event in place: its payload reads as appended when the key is live, with
/// markers where the subject was erased or the key cannot be had. Others are left as they
/// are.
pub(crate) fn open_event(shared: &Shared, e: &mut RecordedEvent) {
    if e.payload_form != PayloadForm::Sealed {
        return;
    }
    if let Some((payload, content_type, sealing)) =
        open_payload(shared, e.event_id, e.payload(), e.content_type)
    {
        e.reopen(payload, content_type, sealing);
    }
}

/// What a read returns for a sealed payload: the payload opened (with its content type)
/// when the key is live, else markers (JSON); and how. `None` for bytes that are not a
/// sealed payload (an envelope read was checked, so never for one).
fn open_payload(
    shared: &Shared,
    event_id: EventId,
    payload: &[u8],
    content_type: ContentType,
) -> Option<(Vec<u8>, ContentType, Sealing)> {
    let s = sealed::decode(payload).ok()?;
    let fields = s.field_names().ok();
    let mut state = seal_state(shared, &s);
    let mut out_type = ContentType::Json;
    let mut out = Vec::new();
    if state == SealState::Opened {
        match opened_payload(shared, event_id, &s) {
            Ok(p) => {
                out = p;
                out_type = content_type;
            }
            Err(reason) => state = SealState::Unavailable { reason },
        }
    }
    if state != SealState::Opened {
        out = marker_payload(&s, fields.as_deref(), &state);
    }
    let sealing = Sealing {
        subject: s.subject,
        generation: s.generation,
        fields: if s.scope == SealScope::Payload {
            None
        } else {
            Some(fields.unwrap_or_default())
        },
        state,
    };
    Some((out, out_type, sealing))
}

fn seal_state(shared: &Shared, s: &SealedRef<'_>) -> SealState {
    if let Some(er) = shared.erasures.read().get(&s.subject)
        && s.generation <= er.generation
    {
        return SealState::Erased {
            by: Some(er.position),
        };
    }
    let Some(store) = shared.opts.keys.as_deref() else {
        return SealState::Unavailable {
            reason: "this log was opened without its key store".into(),
        };
    };
    match store.key(&s.subject, s.generation) {
        Ok(KeyLookup::Live(_)) => SealState::Opened,
        Ok(KeyLookup::Destroyed) => SealState::Erased { by: None },
        Ok(KeyLookup::Unknown) => SealState::Unavailable {
            reason: format!("the key store holds no key of subject {}", s.subject),
        },
        // The store's own error names its files: a read (which may go to a client) says
        // only that it failed.
        Err(_) => SealState::Unavailable {
            reason: "the key store failed to give the key".into(),
        },
    }
}

fn opened_payload(
    shared: &Shared,
    event_id: EventId,
    s: &SealedRef<'_>,
) -> std::result::Result<Vec<u8>, String> {
    let store = shared
        .opts
        .keys
        .as_deref()
        .ok_or_else(|| "no key store".to_owned())?;
    let KeyLookup::Live(key) = store
        .key(&s.subject, s.generation)
        .map_err(|e| e.to_string())?
    else {
        return Err("the key is gone".into());
    };
    let plain = keys::decrypt(&key, &s.nonce, &s.aad(event_id), s.ciphertext)
        .ok_or_else(|| "the sealed data does not open with its subject's key".to_owned())?;
    match s.scope {
        SealScope::Payload => Ok(plain),
        SealScope::Fields => {
            let mut obj = clear_object(s);
            let secret: Map<String, Value> =
                serde_json::from_slice(&plain).map_err(|e| format!("sealed fields: {e}"))?;
            obj.extend(secret);
            Ok(serde_json::to_vec(&Value::Object(obj)).unwrap_or_default())
        }
    }
}

fn clear_object(s: &SealedRef<'_>) -> Map<String, Value> {
    match serde_json::from_slice(s.clear) {
        Ok(Value::Object(o)) => o,
        _ => Map::new(),
    }
}

/// The marker an erased or unavailable field (or payload) reads as.
fn marker(s: &SealedRef<'_>, state: &SealState) -> Value {
    match state {
        SealState::Erased { by } => serde_json::json!({
            ERASED_MARKER: { "subject": s.subject.to_hex(), "by": by.map(|p| p.0) }
        }),
        SealState::Unavailable { reason } => serde_json::json!({
            SEALED_MARKER: { "subject": s.subject.to_hex(), "reason": reason }
        }),
        SealState::Opened => Value::Null,
    }
}

fn marker_payload(s: &SealedRef<'_>, fields: Option<&[String]>, state: &SealState) -> Vec<u8> {
    let m = marker(s, state);
    let v = match s.scope {
        SealScope::Payload => m,
        SealScope::Fields => {
            let mut obj = clear_object(s);
            for f in fields.unwrap_or_default() {
                obj.insert(f.clone(), m.clone());
            }
            Value::Object(obj)
        }
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Stage 10 of open: the recorded erasures, and the destruction of any key an erasure
/// names that is still live (a crash between the erasure's event and the destruction).
/// Returns how many keys it destroyed.
pub(crate) fn load_erasures(shared: &Shared) -> Result<u64> {
    let mut map = HashMap::new();
    for e in read::read_stream(shared, ERASURE_STREAM, 0, usize::MAX, Direction::Forward)? {
        let er = decode_erasure(&e)?;
        let subject = SubjectHash::from_hex(&er.subject).map_err(|source| Error::Corrupt {
            file: shared.dir.clone(),
            offset: 0,
            position: Some(e.position.0),
            detail: "an erasure event names no subject".into(),
            source: Some(source),
        })?;
        map.insert(
            subject,
            Erasure {
                generation: er.generation,
                position: e.position,
            },
        );
    }
    let mut redone = 0;
    if !shared.read_only
        && let Some(store) = shared.opts.keys.as_deref()
    {
        for (subject, er) in &map {
            if let Some((g, true)) = store.generation(subject)?
                && g <= er.generation
            {
                store.destroy(subject)?;
                redone += 1;
            }
        }
    }
    *shared.erasures.write() = map;
    Ok(redone)
}

fn decode_erasure(e: &RecordedEvent) -> Result<SubjectErased> {
    serde_json::from_slice(e.payload()).map_err(|err| Error::Corrupt {
        file: std::path::PathBuf::from(ERASURE_STREAM),
        offset: 0,
        position: Some(e.position.0),
        detail: format!("an erasure event does not decode: {err}"),
        source: None,
    })
}

/// What [`Log::forget`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetReport {
    /// The subject's id hash, in hexadecimal.
    pub subject: String,
    /// Key generations up to this one are erased.
    pub generation: u32,
    /// The `$SubjectErased` event.
    pub position: u64,
    /// Whether the erasure event carries the log's signature.
    pub signed: bool,
    /// The subject had already been erased (at `position`): nothing new was written.
    pub already_erased: bool,
}

impl Log {
    /// Erases every piece of personal data of the subject `subject` sealed so far, in hot and
    /// cold segments alike, without rewriting a byte of them: appends a signed
    /// `$SubjectErased` event with `actor` and `reason`, makes it durable, and destroys the
    /// subject's key. From then on every read shows markers in place of that data, and
    /// every proof still verifies. A subject seen again later gets a new key.
    ///
    /// A retry of a forget returns the first erasure.
    ///
    /// # Errors
    /// [`Error::ErasureHeld`] when a legal hold covers an event with the subject's data;
    /// [`Error::InvalidOptions`] without a key store or for a subject with no key;
    /// [`Error::ReadOnly`]; key store and append errors.
    pub fn forget(&self, subject: &str, actor: &str, reason: &str) -> Result<ForgetReport> {
        self.forget_hash(subject_hash(subject), actor, reason)
    }

    /// [`Log::forget`] of a subject named by its id hash (what erasure events, extracts and
    /// markers show).
    ///
    /// # Errors
    /// As [`Log::forget`].
    pub fn forget_hash(
        &self,
        subject: SubjectHash,
        actor: &str,
        reason: &str,
    ) -> Result<ForgetReport> {
        let shared = &self.shared;
        if shared.read_only {
            return Err(Error::ReadOnly);
        }
        let Some(store) = shared.opts.keys.clone() else {
            return Err(Error::InvalidOptions {
                reason: "this log has no key store: nothing in it is sealed".into(),
            });
        };
        if actor.is_empty() || reason.is_empty() {
            return Err(Error::InvalidOptions {
                reason: "an erasure needs an actor and a reason".into(),
            });
        }
        let _order = shared.governance.lock();
        // No append sealing data interleaves from here to the key's destruction: the hold
        // check sees every event of the subject, and an append after seals under a new key.
        let _erasing = shared.erasing.write();
        let Some((generation, live)) = store.generation(&subject)? else {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "the key store holds no key of subject {subject}: nothing of theirs is sealed in this log"
                ),
            });
        };
        let recorded = shared.erasures.read().get(&subject).copied();
        if let Some(er) = recorded
            && er.generation >= generation
        {
            if live {
                store.destroy(&subject)?;
            }
            return Ok(ForgetReport {
                subject: subject.to_hex(),
                generation: er.generation,
                position: er.position.0,
                signed: false,
                already_erased: true,
            });
        }
        if !live {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "the key of subject {subject} was destroyed outside Tally (no erasure event names it)"
                ),
            });
        }
        self.check_holds(&subject)?;
        let mut event = SubjectErased {
            subject: subject.to_hex(),
            generation,
            reason: reason.to_owned(),
            log_id: hex(&shared.meta.log_id),
            signature: None,
            key: None,
        };
        if let Some((sig, key)) = shared.evidence.checkpoints.lock().sign(&event.statement()) {
            event.signature = Some(hex(&sig));
            event.key = Some(hex(&key));
        }
        let signed = event.signature.is_some();
        let payload = serde_json::to_string(&event).map_err(|e| invalid(e.to_string()))?;
        let events = [EventData::json(SUBJECT_ERASED, payload).actor(actor)];
        let result = append::submit_signed(
            shared,
            &[AppendRequest {
                stream: ERASURE_STREAM,
                expected: ExpectedVersion::Any,
                events: &events,
            }],
            false,
            append::Signing {
                signature: None,
                system: true,
            },
            append::Blocking::Allowed,
        )?
        .wait()?
        .remove(0);
        // The erasure is durable before the key goes, whatever the durability setting: a
        // crash after this point is finished by the next open.
        shared.sync_all()?;
        let position = result.first_position;
        shared.erasures.write().insert(
            subject,
            Erasure {
                generation,
                position,
            },
        );
        store.destroy(&subject)?;
        Ok(ForgetReport {
            subject: subject.to_hex(),
            generation,
            position: position.0,
            signed,
            already_erased: false,
        })
    }

    /// Refuses when a legal hold covers an event that holds the subject's data (found by a
    /// scan of the log when any hold stands; none, the common case, costs nothing).
    fn check_holds(&self, subject: &SubjectHash) -> Result<()> {
        let g = self.governance()?;
        if g.holds.is_empty() {
            return Ok(());
        }
        let mut found: Option<(String, String, u64)> = None;
        self.scan_range(Position(0), self.next_position(), Verify::Checksums, |r| {
            if found.is_some() || r.body_form == BodyForm::Pruned {
                return;
            }
            let Ok(env) = r.envelope() else { return };
            if env.payload_form != PayloadForm::Sealed {
                return;
            }
            let Ok(s) = sealed::decode(env.payload) else {
                return;
            };
            if s.subject != *subject {
                return;
            }
            if let Some(h) = g
                .holds_on(
                    env.stream,
                    env.aggregate_type,
                    env.correlation_id,
                    env.actor,
                )
                .next()
            {
                found = Some((h.hold.id.clone(), h.hold.reason.clone(), r.position.0));
            }
        })?;
        match found {
            Some((hold, reason, position)) => Err(Error::ErasureHeld {
                subject: subject.to_hex(),
                hold,
                reason,
                position,
            }),
            None => Ok(()),
        }
    }

    /// For an envelope read raw ([`Log::scan_range`]) whose payload is sealed: the payload
    /// every read of the API returns in its place (opened when the key is live, else
    /// markers), its content type, and how it was opened. `None` for any other envelope.
    #[must_use]
    pub fn open_sealed(&self, env: &EnvelopeRef<'_>) -> Option<(Vec<u8>, ContentType, Sealing)> {
        if env.payload_form != PayloadForm::Sealed {
            return None;
        }
        open_payload(&self.shared, env.event_id, env.payload, env.content_type)
    }

    /// Every recorded erasure, by subject.
    #[must_use]
    pub fn erasures(&self) -> HashMap<SubjectHash, Erasure> {
        self.shared.erasures.read().clone()
    }

    /// The log's key store, when it was opened with one.
    #[must_use]
    pub fn key_store(&self) -> Option<Arc<dyn KeyStore>> {
        self.shared.opts.keys.clone()
    }
}

/// The envelope of a read event with a new payload (an opened one, or markers).
pub(crate) fn reopened_envelope<'a>(
    env: &EnvelopeRef<'a>,
    payload: &'a [u8],
    content_type: ContentType,
) -> EnvelopeRef<'a> {
    EnvelopeRef {
        payload,
        content_type,
        payload_form: PayloadForm::Inline,
        ..*env
    }
}
