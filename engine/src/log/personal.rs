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
        }
    }

    /// The whole payload belongs to `subject`.
    #[must_use]
    pub fn payload(subject: impl Into<String>) -> Personal {
        Personal {
            subject: subject.into(),
            scope: PersonalScope::Payload,
            tokens: Vec::new(),
        }
    }

    /// Also stores these fields as tokens.
    #[must_use]
    pub fn with_tokens<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Personal {
        self.tokens = fields.into_iter().map(Into::into).collect();
        self
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
) -> Result<Vec<Option<SealedPayload>>> {
    if !requests
        .iter()
        .any(|r| r.events.iter().any(|e| e.personal.is_some()))
    {
        return Ok(Vec::new());
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
    // Each event's subject hash (the zero hash for an event without personal data).
    let mut hashes = Vec::new();
    let mut subjects = Vec::new();
    for (index, (stream, ev)) in requests
        .iter()
        .flat_map(|r| r.events.iter().map(move |e| (r.stream, e)))
        .enumerate()
    {
        let Some(p) = &ev.personal else { continue };
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
        let hash = subject_hash(&p.subject);
        if needs_key(p) {
            subjects.push(hash);
        }
        hashes.resize(index, SubjectHash([0; 32]));
        hashes.push(hash);
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
        let subject = hashes.get(index).copied().unwrap_or(SubjectHash([0; 32]));
        work.push((index, ev, key, subject));
    }
    let token_key = store.token_key();
    let seal = |chunk: &[SealWork<'_>]| -> Result<Vec<Option<SealedPayload>>> {
        chunk
            .iter()
            .map(|(index, ev, key, subject)| match &ev.personal {
                None => Ok(None),
                Some(p) => seal_one(ev, p, subject, key.as_ref(), token_key, *index).map(Some),
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
    let flat: Vec<Option<SealedPayload>> = if cores > 1 {
        let per = work.len().div_ceil(cores.min(PARALLEL_SEAL_THREADS));
        let parts: Vec<Result<Vec<Option<SealedPayload>>>> = std::thread::scope(|scope| {
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
    Ok(flat)
}

/// What an append writes in place of an event's payload once its personal data is sealed.
#[derive(Debug)]
pub(crate) struct SealedPayload {
    /// The event's id (the associated data binds the ciphertext to it).
    pub(crate) event_id: EventId,
    /// The payload field.
    pub(crate) payload: Vec<u8>,
    /// [`PayloadForm::Sealed`], or [`PayloadForm::Inline`] when nothing of the subject's
    /// was in the payload (tokens only).
    pub(crate) form: PayloadForm,
}

/// An event of a batch to seal: its index, the event, the key it is sealed under, and its
/// subject's id hash.
type SealWork<'e> = (usize, &'e EventData, Option<(u32, SecretKey)>, SubjectHash);

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
    subject: &SubjectHash,
    key: Option<&(u32, SecretKey)>,
    token_key: &SecretKey,
    index: usize,
) -> Result<SealedPayload> {
    let event_id = ev.event_id.unwrap_or_else(new_event_id);
    let split;
    let (scope, clear, names, plaintext): (SealScope, &[u8], &[u8], &[u8]) = match &p.scope {
        PersonalScope::Payload => (SealScope::Payload, &[], &[], &ev.payload),
        PersonalScope::Fields(fields) => {
            split = match split_borrowed(&ev.payload, fields, &p.tokens, token_key) {
                Some(s) => s,
                None => split_parsed(&ev.payload, fields, &p.tokens, token_key, index)?,
            };
            if split.names.is_empty() {
                // Nothing of the subject's is in this payload: tokens only.
                return Ok(SealedPayload {
                    event_id,
                    payload: split.clear,
                    form: PayloadForm::Inline,
                });
            }
            (
                SealScope::Fields,
                &split.clear,
                &split.names,
                &split.plaintext,
            )
        }
    };
    let Some((generation, key)) = key else {
        return Err(invalid(format!("event {index}: no key to seal it with")));
    };
    sealed::check_len(clear.len(), names.len(), plaintext.len())
        .map_err(|source| Error::InvalidEvent { index, source })?;
    let nonce = keys::nonce()?;
    // One buffer: the associated data (its prefix, the event id, the head) followed by the
    // plaintext, encrypted in place; then the prefix is dropped.
    let mut buf = Vec::with_capacity(
        sealed::AAD_HEAD_OFFSET
            + sealed::SEALED_FIXED_LEN
            + clear.len()
            + names.len()
            + plaintext.len()
            + sealed::TAG_LEN,
    );
    buf.extend_from_slice(&sealed::aad_prefix(event_id));
    buf.extend_from_slice(&sealed::fixed_part(
        scope,
        *generation,
        subject,
        &nonce,
        clear.len() as u32,
        names.len() as u32,
    ));
    buf.extend_from_slice(clear);
    buf.extend_from_slice(names);
    let text = buf.len();
    buf.extend_from_slice(plaintext);
    let (aad, text_part) = buf.split_at_mut(text);
    let tag = keys::encrypt_in_place(key, &nonce, aad, text_part);
    buf.extend_from_slice(&tag);
    buf.drain(..sealed::AAD_HEAD_OFFSET);
    Ok(SealedPayload {
        event_id,
        payload: buf,
        form: PayloadForm::Sealed,
    })
}

/// A JSON payload split for sealing: the clear object, the sealed names (a sorted JSON
/// array) and the plaintext (a JSON object of the sealed fields).
struct Split {
    clear: Vec<u8>,
    names: Vec<u8>,
    plaintext: Vec<u8>,
}

/// The top-level members of a JSON object, borrowed: each key and its value's text.
struct Members<'a>(Vec<(&'a str, &'a serde_json::value::RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(m) =
                    map.next_entry::<&'de str, &'de serde_json::value::RawValue>()?
                {
                    members.push(m);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The canonical token of a field's value: of its JSON as `serde_json` writes it, so that
/// equal values give equal tokens however they were spaced.
fn token_of(token_key: &SecretKey, value: &Value) -> String {
    keys::token(token_key, &serde_json::to_vec(value).unwrap_or_default())
}

/// Splits `payload` without building a JSON tree: the members' texts are copied as they
/// are. `None` when the payload is not an object whose keys have no escapes and appear once
/// (then [`split_parsed`] does it).
fn split_borrowed(
    payload: &[u8],
    fields: &[String],
    tokens: &[String],
    token_key: &SecretKey,
) -> Option<Split> {
    let Members(members) = serde_json::from_slice(payload).ok()?;
    let mut keys: Vec<&str> = members.iter().map(|m| m.0).collect();
    keys.sort_unstable();
    if keys.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    let value = |k: &str, raw: &serde_json::value::RawValue| -> Option<Vec<u8>> {
        // A raw value is checked for syntax only: a number out of range (`1e400`) or a lone
        // surrogate (`"\ud800"`) passes it, and the parsed way refuses them. Numbers,
        // escaped strings and nested values are parsed too, so that what is sealed always
        // reads back as JSON; plain strings, `true`, `false` and `null` need not be.
        let text = raw.get().as_bytes();
        let checked = match text.first() {
            Some(b'"') => !text.contains(&b'\\'),
            Some(b't' | b'f' | b'n') => true,
            _ => false,
        };
        if !checked && serde_json::from_str::<Value>(raw.get()).is_err() {
            return None;
        }
        if tokens.iter().any(|t| t == k) {
            let v: Value = serde_json::from_str(raw.get()).ok()?;
            serde_json::to_vec(&token_of(token_key, &v)).ok()
        } else {
            Some(raw.get().as_bytes().to_vec())
        }
    };
    let member = |out: &mut Vec<u8>, k: &str, v: &[u8]| {
        out.push(if out.is_empty() { b'{' } else { b',' });
        // A borrowed key has no escape (and JSON strings hold no control character), so
        // its quoted form is itself.
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(v);
    };
    // The plaintext in the order the fields are named, as the parsed path writes it.
    let mut sealed_names: Vec<&str> = Vec::new();
    let mut plaintext = Vec::new();
    for f in fields {
        if sealed_names.contains(&f.as_str()) {
            continue;
        }
        if let Some((k, raw)) = members.iter().find(|m| m.0 == f) {
            member(&mut plaintext, k, &value(k, raw)?);
            sealed_names.push(k);
        }
    }
    let mut clear = Vec::with_capacity(payload.len());
    for (k, raw) in &members {
        if !sealed_names.contains(k) {
            member(&mut clear, k, &value(k, raw)?);
        }
    }
    for part in [&mut clear, &mut plaintext] {
        if part.is_empty() {
            part.push(b'{');
        }
        part.push(b'}');
    }
    sealed_names.sort_unstable();
    Some(Split {
        clear,
        names: if sealed_names.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&sealed_names).ok()?
        },
        plaintext,
    })
}

/// [`split_borrowed`] through a parsed JSON tree: any JSON object (keys with escapes, a key
/// given twice, whose last value counts).
fn split_parsed(
    payload: &[u8],
    fields: &[String],
    tokens: &[String],
    token_key: &SecretKey,
    index: usize,
) -> Result<Split> {
    let mut obj: Map<String, Value> = match serde_json::from_slice(payload) {
        Ok(Value::Object(o)) => o,
        Ok(_) => {
            return Err(invalid(format!(
                "event {index}: personal fields need a payload that is a JSON object"
            )));
        }
        Err(e) => {
            return Err(invalid(format!(
                "event {index}: personal fields need a payload that is a JSON object: {e}"
            )));
        }
    };
    for (i, t) in tokens.iter().enumerate() {
        // A field named twice is one token, not a token of a token.
        if tokens[..i].contains(t) {
            continue;
        }
        if let Some(v) = obj.get_mut(t) {
            *v = Value::String(token_of(token_key, v));
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
        return Ok(Split {
            clear,
            names: Vec::new(),
            plaintext: Vec::new(),
        });
    }
    // Sorted: the bytes must not depend on the JSON map's order (which a build with
    // `serde_json/preserve_order` changes).
    let mut names: Vec<&String> = secret.keys().collect();
    names.sort();
    let names = serde_json::to_vec(&names).unwrap_or_default();
    let plaintext = serde_json::to_vec(&Value::Object(secret)).unwrap_or_default();
    Ok(Split {
        clear,
        names,
        plaintext,
    })
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
            let mut obj = clear_object(s)?;
            let secret: Map<String, Value> =
                serde_json::from_slice(&plain).map_err(|e| format!("sealed fields: {e}"))?;
            obj.extend(secret);
            Ok(serde_json::to_vec(&Value::Object(obj)).unwrap_or_default())
        }
    }
}

/// The clear part as a JSON object. The append writes one; anything else is damage that the
/// record's checksums did not catch (or a forgery), and it reads as unavailable rather than
/// as an object with fields silently missing.
fn clear_object(s: &SealedRef<'_>) -> std::result::Result<Map<String, Value>, String> {
    match serde_json::from_slice(s.clear) {
        Ok(Value::Object(o)) => Ok(o),
        _ => Err("the clear part of the sealed payload is not a JSON object".to_owned()),
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
        SealScope::Fields => match clear_object(s) {
            Ok(mut obj) => {
                for f in fields.unwrap_or_default() {
                    obj.insert(f.clone(), m.clone());
                }
                Value::Object(obj)
            }
            // The whole payload reads as one marker that says why.
            Err(reason) => marker(s, &SealState::Unavailable { reason }),
        },
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
        // An append that sealed data of the subject and wrote its records before this forget
        // took the erasure lock may not be durable yet, and so not visible to the scan: make
        // everything written durable first, or such an event under a hold would be erased.
        self.shared.sync_all()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SecretKey {
        SecretKey::from_hex(&"5a".repeat(32)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}"))
    }

    /// The borrowed split names the fields the parsed split names, and, read as JSON, its
    /// clear part is the payload without them (tokens in place) and its plaintext is them.
    /// (Compared with the payload, not with the parsed split's bytes: those rewrite floats,
    /// which do not always read back to the same value.)
    fn same_split(payload: &[u8], fields: &[String], tokens: &[String]) {
        let parsed =
            split_parsed(payload, fields, tokens, &key(), 0).unwrap_or_else(|e| panic!("{e}"));
        let Some(fast) = split_borrowed(payload, fields, tokens, &key()) else {
            panic!(
                "the borrowed split refused {}",
                String::from_utf8_lossy(payload)
            );
        };
        assert_eq!(fast.names, parsed.names);
        let Value::Object(mut clear) = json(payload) else {
            panic!("not an object")
        };
        for (i, t) in tokens.iter().enumerate() {
            if tokens[..i].contains(t) {
                continue;
            }
            if let Some(v) = clear.get_mut(t) {
                *v = Value::String(token_of(&key(), v));
            }
        }
        let mut secret = Map::new();
        for f in fields {
            if let Some(v) = clear.remove(f) {
                secret.insert(f.clone(), v);
            }
        }
        assert_eq!(json(&fast.clear), Value::Object(clear));
        if !secret.is_empty() {
            assert_eq!(json(&fast.plaintext), Value::Object(secret));
        }
    }

    #[test]
    fn the_borrowed_split_keeps_values_as_written_and_seals_named_fields() {
        let payload =
            br#"{"book": "B1", "client":{"name":"Jane","age":41},"qty":"1.10","acct":"DE89"}"#;
        let fields = vec!["client".to_owned(), "missing".to_owned()];
        let tokens = vec!["acct".to_owned()];
        let s = split_borrowed(payload, &fields, &tokens, &key()).unwrap_or_else(|| panic!());
        let token =
            serde_json::to_string(&token_of(&key(), &json(br#""DE89""#))).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&s.clear),
            format!(r#"{{"book":"B1","qty":"1.10","acct":{token}}}"#)
        );
        assert_eq!(s.names, br#"["client"]"#);
        assert_eq!(s.plaintext, br#"{"client":{"name":"Jane","age":41}}"#);
        same_split(payload, &fields, &tokens);
    }

    #[test]
    fn escaped_keys_duplicates_and_non_objects_go_the_parsed_way() {
        let fields = vec!["a".to_owned()];
        for p in [
            &br#"{"a\u0062":1,"a":2}"#[..],
            br#"{"a":1,"a":2}"#,
            br#"[1,2]"#,
            br#""a""#,
        ] {
            assert!(split_borrowed(p, &fields, &[], &key()).is_none(), "{p:?}");
        }
        // The parsed way: the last of a duplicate counts; an escaped key is matched by its
        // value.
        let s = split_parsed(br#"{"a":1,"a":2,"\u0062":3}"#, &fields, &[], &key(), 0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json(&s.plaintext), json(br#"{"a":2}"#));
        assert_eq!(json(&s.clear), json(br#"{"b":3}"#));
        assert!(split_parsed(b"[1]", &fields, &[], &key(), 0).is_err());
    }

    /// Text the JSON syntax admits but a JSON value may not hold (a number out of range, a
    /// lone surrogate), in a sealed or a clear field, is taken by the borrowed way exactly
    /// when the parsed way takes it (serde_json's `arbitrary_precision`, which another crate
    /// of a build may turn on, admits `1e400`), and what it seals then reads back as JSON.
    #[test]
    fn values_json_may_not_hold_are_taken_as_the_parsed_way_takes_them() {
        let fields = vec!["a".to_owned()];
        let mut refused = 0;
        for p in [
            &br#"{"a":"x","b":1e400}"#[..],
            br#"{"a":1e400,"b":"x"}"#,
            br#"{"a":"x","b":"\ud800"}"#,
            br#"{"a":{"c":-1e999},"b":"x"}"#,
        ] {
            let fast = split_borrowed(p, &fields, &[], &key());
            let parsed = split_parsed(p, &fields, &[], &key(), 0);
            assert_eq!(fast.is_some(), parsed.is_ok(), "{p:?}");
            match fast {
                Some(f) => {
                    json(&f.clear);
                    json(&f.plaintext);
                }
                None => refused += 1,
            }
        }
        // A lone surrogate is refused whatever the build.
        assert!(refused >= 1);
    }

    /// A clear part that is not a JSON object reads as one marker saying so, never as an
    /// object with its clear fields silently missing.
    #[test]
    fn a_damaged_clear_part_reads_as_a_marker_that_says_so() {
        let s = SealedRef {
            scope: SealScope::Fields,
            generation: 1,
            subject: SubjectHash([7; 32]),
            nonce: [0; 24],
            clear: b"[1,2]",
            names: br#"["a"]"#,
            ciphertext: &[0; 16],
            head: &[],
        };
        let fields = vec!["a".to_owned()];
        let v = json(&marker_payload(
            &s,
            Some(&fields),
            &SealState::Erased { by: None },
        ));
        assert_eq!(
            v[SEALED_MARKER]["reason"],
            "the clear part of the sealed payload is not a JSON object"
        );
        assert!(clear_object(&s).is_err());
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[ -~]{0,12}".prop_map(Value::String),
            "\\PC{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_borrowed_split_agrees_with_the_parsed_one(
            members in prop::collection::btree_map("[a-e]{1,2}", value(), 0..8),
            fields in prop::collection::vec("[a-e]{1,2}", 0..4),
            tokens in prop::collection::vec("[a-e]{1,2}", 0..3),
            pretty in any::<bool>(),
        ) {
            let obj = Value::Object(members.into_iter().collect());
            let payload = if pretty {
                serde_json::to_vec_pretty(&obj)
            } else {
                serde_json::to_vec(&obj)
            }
            .unwrap_or_default();
            same_split(&payload, &fields, &tokens);
        }
    }
}
