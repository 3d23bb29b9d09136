//! A schema registry kept in the log itself, and upcasting on read.
//!
//! Each event type has numbered schema versions, each a list of fields (name, kind,
//! required, default). Registrations are events of the stream `$schemas` (event type
//! `$SchemaRegistered`, JSON payload: the [`Schema`]), so the registry's history is in the
//! log, chained and signed like everything else.
//!
//! - **Compatibility.** Version `n + 1` must be readable by upcasting from version `n`: a
//!   field kept must keep its kind; a new required field needs a default; a field that
//!   becomes required needs a default. A breaking change is refused with the reason.
//! - **Validation.** When a schema says so (`validate`), [`Registry::check`] refuses an
//!   event whose JSON payload does not match it, naming the field.
//! - **Upcasting.** [`Registry::upcast`] lifts a payload from its version to the newest,
//!   one version at a time: a registered upcaster function for that step, or the generic
//!   one (drop the fields the new version removed, fill new fields with their defaults).
//!   Old bytes on disk are never rewritten; [`Upcasted`] shows an event as its newest
//!   version to aggregates and projections.
//!
//! This module uses only the log's public API.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;
use crate::format::envelope::{ContentType, PayloadForm};
use crate::format::{EventId, Position, Timestamp};
use crate::log::{Direction, EventData, EventView, ExpectedVersion, Log};

/// The stream holding the registry.
pub const SCHEMA_STREAM: &str = "$schemas";

/// Most fields a schema version may declare (compatibility checks compare every pair).
pub const FIELDS_MAX: usize = 1024;
/// The event type of a registration.
pub const SCHEMA_EVENT_TYPE: &str = "$SchemaRegistered";

/// The kind of a field's JSON value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    /// A string.
    String,
    /// An exact decimal, written as a string (`"101.25"`, `"-3"`), at most 28 digits.
    Decimal,
    /// An integer.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A JSON object.
    Object,
    /// A JSON array.
    Array,
}

impl FieldKind {
    fn admits(self, v: &Value) -> bool {
        match self {
            FieldKind::String => v.is_string(),
            FieldKind::Decimal => v.as_str().is_some_and(|s| {
                let t = s.strip_prefix('-').unwrap_or(s);
                let mut parts = t.splitn(2, '.');
                let int = parts.next().unwrap_or("");
                let frac = parts.next().unwrap_or("");
                // At most 28 significant digits: what an exact 96-bit decimal holds.
                !int.is_empty()
                    && int.len() + frac.len() <= 28
                    && int.bytes().all(|b| b.is_ascii_digit())
                    && (!t.contains('.') || !frac.is_empty())
                    && frac.bytes().all(|b| b.is_ascii_digit())
            }),
            FieldKind::Integer => v.is_i64() || v.is_u64(),
            FieldKind::Boolean => v.is_boolean(),
            FieldKind::Object => v.is_object(),
            FieldKind::Array => v.is_array(),
        }
    }
}

/// One field of a schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The field's name in the JSON object.
    pub name: String,
    /// Its kind.
    pub kind: FieldKind,
    /// Whether every event must have it.
    pub required: bool,
    /// The value an upcast gives it when the older version lacks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// Whether it holds personal data, and how it is kept: sealed under the key of the
    /// event's data subject ([`Schema::subject_field`]) or stored as a token
    /// (docs/FORMAT.md 6.6). Appends through tallyd follow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personal: Option<PersonalMark>,
}

/// How a field holding personal data is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PersonalMark {
    /// Sealed under the subject's key; erased when the subject is forgotten.
    Sealed,
    /// Replaced by a stable token (a keyed hash): joinable, never readable.
    Token,
}

/// A version of an event type's schema. Unknown keys in its JSON form are refused (a
/// misspelt `"validate"` must not silently turn validation off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// The event type.
    pub event_type: String,
    /// The version, from 1.
    pub version: u32,
    /// The fields.
    pub fields: Vec<Field>,
    /// Check appends of this version against it ([`Registry::check`]).
    #[serde(default)]
    pub validate: bool,
    /// The field that names the event's data subject (a client or trader id), needed when a
    /// field is [`PersonalMark::Sealed`]: a required string field, kept in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_field: Option<String>,
}

impl Schema {
    /// Reads a schema from its JSON form (docs/FORMAT.md, "Schema registrations").
    ///
    /// # Errors
    /// The text is not a schema; the message says why.
    pub fn from_json(text: &str) -> Result<Schema, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// The schema's JSON form, as stored in `$schemas`.
    ///
    /// # Errors
    /// The schema does not serialise (a default value JSON cannot hold).
    pub fn to_json(&self) -> Result<String, String> {
        serde_json::to_string(self).map_err(|e| e.to_string())
    }
}

/// Calls `f` with `e` as its newest schema version through `registry`, or as it is without
/// one: how aggregates and projections are shown events. An event that cannot be upcast
/// is refused with the reason.
///
/// # Errors
/// The upcast's reason, or `f`'s.
pub fn with_newest<T>(
    registry: Option<&Registry>,
    e: &dyn EventView,
    f: impl FnOnce(&dyn EventView) -> Result<T, String>,
) -> Result<T, String> {
    if let Some(refused) = crate::log::fold_refusal(e) {
        return Err(refused);
    }
    match registry {
        None => f(e),
        Some(r) => f(&r.view(e).map_err(|err| err.to_string())?),
    }
}

/// Why a registration, a check or an upcast failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] Error),
    /// The new version cannot be reached by upcasting from the previous one.
    #[error("{event_type} version {version} is a breaking change: {reason}")]
    Breaking {
        /// The event type.
        event_type: String,
        /// The refused version.
        version: u32,
        /// Why.
        reason: String,
    },
    /// The version is not the next one.
    #[error("{event_type}: version {version} is not the next version ({expected})")]
    WrongVersion {
        /// The event type.
        event_type: String,
        /// The version given.
        version: u32,
        /// The next version.
        expected: u32,
    },
    /// An event does not match its schema.
    #[error("{event_type} version {version}: field {field:?} {reason}")]
    Invalid {
        /// The event type.
        event_type: String,
        /// The schema version.
        version: u32,
        /// The field (empty: the payload as a whole).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A schema that no payload could meet or no event could carry: an event type that is
    /// empty or breaks the envelope's limits, or a field named twice.
    #[error("the schema of {event_type:?} version {version} is malformed: {reason}")]
    Malformed {
        /// The event type.
        event_type: String,
        /// The schema version.
        version: u32,
        /// What is wrong.
        reason: String,
    },
    /// An upcaster refused a payload.
    #[error("upcasting {event_type} from version {from}: {reason}")]
    Upcast {
        /// The event type.
        event_type: String,
        /// The version lifted from.
        from: u32,
        /// Why.
        reason: String,
    },
}

/// What is wrong with a schema's personal-data marks: a sealed field without a subject
/// field, a subject field that is not a required string of the schema, or one that is
/// itself marked.
fn personal_problem(s: &Schema) -> Option<String> {
    let sealed = s
        .fields
        .iter()
        .any(|f| f.personal == Some(PersonalMark::Sealed));
    match &s.subject_field {
        None if sealed => {
            Some("a field is marked sealed, and no subject_field names the data subject".into())
        }
        None => None,
        Some(name) => match s.fields.iter().find(|f| &f.name == name) {
            None => Some(format!("subject_field {name:?} is not one of its fields")),
            Some(f) if f.kind != FieldKind::String || !f.required => Some(format!(
                "subject_field {name:?} must be a required string field"
            )),
            Some(f) if f.personal.is_some() => Some(format!(
                "subject_field {name:?} names the subject and is kept in clear: it cannot be marked personal"
            )),
            Some(_) => None,
        },
    }
}

/// A function lifting a payload from version `n` to `n + 1`.
pub type Upcaster = Arc<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// The registry: every schema version of every event type, and the upcasters.
#[derive(Clone, Default)]
pub struct Registry {
    schemas: BTreeMap<String, Vec<Schema>>,
    upcasters: BTreeMap<(String, u32), Upcaster>,
    /// Registrations read from the log (the stream's next version).
    loaded: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("schemas", &self.schemas)
            .finish_non_exhaustive()
    }
}

fn invalid(s: &Schema, field: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        event_type: s.event_type.clone(),
        version: s.version,
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Checks that `new` can be reached by upcasting from `old`.
fn compatible(old: &Schema, new: &Schema) -> Result<(), String> {
    for f in &new.fields {
        match old.fields.iter().find(|o| o.name == f.name) {
            Some(o) if o.kind != f.kind => {
                return Err(format!(
                    "field {:?} changes kind from {:?} to {:?}",
                    f.name, o.kind, f.kind
                ));
            }
            Some(o) if f.required && !o.required && f.default.is_none() => {
                return Err(format!(
                    "field {:?} becomes required without a default",
                    f.name
                ));
            }
            None if f.required && f.default.is_none() => {
                return Err(format!("new required field {:?} has no default", f.name));
            }
            _ => {}
        }
    }
    Ok(())
}

impl Registry {
    /// Reads the registry from the log.
    ///
    /// # Errors
    /// [`SchemaError::Log`]; a registration that does not decode is an
    /// [`SchemaError::Invalid`] naming it.
    pub fn load(log: &Log) -> Result<Registry, SchemaError> {
        let mut r = Registry::default();
        r.refresh(log)?;
        Ok(r)
    }

    /// Reads registrations appended since the last load.
    ///
    /// # Errors
    /// As [`Registry::load`].
    pub fn refresh(&mut self, log: &Log) -> Result<(), SchemaError> {
        loop {
            let page = log.read_stream(SCHEMA_STREAM, self.loaded, 256, Direction::Forward)?;
            for e in &page {
                self.add_registration(e.version, e.payload())?;
            }
            if page.len() < 256 {
                return Ok(());
            }
        }
    }

    /// The next version of the `$schemas` stream to read: registrations read so far.
    #[must_use]
    pub fn loaded(&self) -> u64 {
        self.loaded
    }

    /// Adds the registration stored as event `version` of `$schemas` (its payload), as
    /// [`Registry::refresh`] does for each: for a registry read through a server. Events
    /// must come in order, from [`Registry::loaded`]; others are ignored.
    ///
    /// # Errors
    /// [`SchemaError::Invalid`] for a payload that is not a schema.
    pub fn add_registration(&mut self, version: u64, payload: &[u8]) -> Result<(), SchemaError> {
        if version != self.loaded {
            return Ok(());
        }
        let bad = |reason: String| SchemaError::Invalid {
            event_type: SCHEMA_STREAM.into(),
            version: 0,
            field: String::new(),
            reason: format!("registration at version {version} {reason}"),
        };
        let s: Schema = serde_json::from_slice(payload)
            .map_err(|err| bad(format!("does not decode: {err}")))?;
        // What `register` would have refused cannot have been registered (an embedded
        // writer may append to `$schemas` directly).
        let next = self
            .latest(&s.event_type)
            .map_or(Some(1), |l| l.version.checked_add(1));
        if Some(s.version) != next || s.fields.len() > FIELDS_MAX {
            return Err(bad(format!(
                "is {} version {} with {} fields: not the next version of its type, or too many fields",
                s.event_type,
                s.version,
                s.fields.len()
            )));
        }
        self.schemas
            .entry(s.event_type.clone())
            .or_default()
            .push(s);
        self.loaded = version + 1;
        Ok(())
    }

    /// Whether any registered schema version asks for validation ([`Registry::check`] can
    /// refuse something).
    #[must_use]
    pub fn validates(&self) -> bool {
        self.schemas.values().flatten().any(|s| s.validate)
    }

    /// Whether some schema marks personal data ([`Registry::personal_for`] has work).
    #[must_use]
    pub fn marks_personal(&self) -> bool {
        self.schemas
            .values()
            .flatten()
            .any(|s| s.fields.iter().any(|f| f.personal.is_some()))
    }

    /// The personal data an event holds by its schema version's marks: the sealed fields,
    /// the tokenised ones, and the subject named by its subject field. `None` when the
    /// event gives its own marking, or its schema marks nothing.
    ///
    /// # Errors
    /// [`SchemaError::Invalid`] when the payload is not a JSON object or lacks the subject.
    pub fn personal_for(&self, e: &EventData) -> Result<Option<crate::log::Personal>, SchemaError> {
        if e.personal.is_some() {
            return Ok(None);
        }
        let Some(s) = self.get(&e.event_type, e.schema_version) else {
            return Ok(None);
        };
        let marked = |m: PersonalMark| {
            s.fields
                .iter()
                .filter(move |f| f.personal == Some(m))
                .map(|f| f.name.clone())
        };
        let sealed: Vec<String> = marked(PersonalMark::Sealed).collect();
        let tokens: Vec<String> = marked(PersonalMark::Token).collect();
        if sealed.is_empty() && tokens.is_empty() {
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&e.payload)
            .map_err(|err| invalid(s, "", format!("is not JSON: {err}")))?;
        let subject = match &s.subject_field {
            Some(name) => match v.get(name) {
                Some(Value::String(id)) if !id.is_empty() => id.clone(),
                _ => {
                    return Err(invalid(
                        s,
                        name,
                        "names the event's data subject: a non-empty string is required",
                    ));
                }
            },
            // Tokens only: no key is used.
            None => String::from("-"),
        };
        Ok(Some(
            crate::log::Personal::fields(subject, sealed).with_tokens(tokens),
        ))
    }

    /// The newest version of `event_type`, if it has a schema.
    #[must_use]
    pub fn latest(&self, event_type: &str) -> Option<&Schema> {
        self.schemas.get(event_type).and_then(|v| v.last())
    }

    /// Version `version` of `event_type`.
    #[must_use]
    pub fn get(&self, event_type: &str, version: u32) -> Option<&Schema> {
        self.schemas
            .get(event_type)?
            .iter()
            .find(|s| s.version == version)
    }

    /// Registers a new version after checking that it is the next one and compatible with
    /// the previous one; the registration is appended to `$schemas`, expecting the
    /// registry's version as loaded (a concurrent registration makes it fail; refresh and
    /// retry).
    ///
    /// # Errors
    /// [`SchemaError::WrongVersion`], [`SchemaError::Breaking`], [`SchemaError::Log`].
    pub fn register(&mut self, log: &Log, schema: Schema) -> Result<(), SchemaError> {
        let (expect, event) = self.prepare(&schema)?;
        log.append(SCHEMA_STREAM, expect, &[event])?;
        self.commit(schema);
        Ok(())
    }

    /// The checks of [`Registry::register`] without the append: the expectation and the
    /// event that register `schema` in `$schemas`. A caller that sequences the append
    /// itself (a server that must order it before the appends it will check) appends it,
    /// then calls [`Registry::commit`].
    ///
    /// # Errors
    /// [`SchemaError::WrongVersion`], [`SchemaError::Breaking`].
    pub fn prepare(&self, schema: &Schema) -> Result<(ExpectedVersion, EventData), SchemaError> {
        let schema = schema.clone();
        let malformed = |reason: String| SchemaError::Malformed {
            event_type: schema.event_type.clone(),
            version: schema.version,
            reason,
        };
        if let Err(e) = crate::format::envelope::check_event_type(&schema.event_type) {
            return Err(malformed(format!("its event type: {e}")));
        }
        let mut names = std::collections::BTreeSet::new();
        if let Some(twice) = schema
            .fields
            .iter()
            .find(|f| !names.insert(f.name.as_str()))
        {
            return Err(malformed(format!(
                "field {:?} is named twice (a payload could never meet both)",
                twice.name
            )));
        }
        if let Some(reason) = personal_problem(&schema) {
            return Err(malformed(reason));
        }
        if schema.fields.len() > FIELDS_MAX {
            return Err(SchemaError::Breaking {
                event_type: schema.event_type.clone(),
                version: schema.version,
                reason: format!(
                    "{} fields exceed the limit of {FIELDS_MAX}",
                    schema.fields.len()
                ),
            });
        }
        let expected = self
            .latest(&schema.event_type)
            .map_or(1, |s| s.version.saturating_add(1));
        if schema.version != expected {
            return Err(SchemaError::WrongVersion {
                event_type: schema.event_type,
                version: schema.version,
                expected,
            });
        }
        if let Some(f) = schema
            .fields
            .iter()
            .find(|f| f.default.as_ref().is_some_and(|d| !f.kind.admits(d)))
        {
            return Err(SchemaError::Breaking {
                event_type: schema.event_type.clone(),
                version: schema.version,
                reason: format!("the default of {:?} is not a {:?}", f.name, f.kind),
            });
        }
        // The first version has nothing to be compatible with. A registered upcaster for
        // the step takes responsibility for it (a rename, a unit change); otherwise the
        // generic upcast must be able to make the step.
        if let Some(previous) = self.latest(&schema.event_type)
            && !self
                .upcasters
                .contains_key(&(schema.event_type.clone(), previous.version))
        {
            compatible(previous, &schema).map_err(|reason| SchemaError::Breaking {
                event_type: schema.event_type.clone(),
                version: schema.version,
                reason,
            })?;
        }
        let body =
            serde_json::to_string(&schema).map_err(|e| invalid(&schema, "", e.to_string()))?;
        let expect = match self.loaded {
            0 => ExpectedVersion::NoStream,
            n => ExpectedVersion::Exact(n - 1),
        };
        Ok((expect, EventData::json(SCHEMA_EVENT_TYPE, body)))
    }

    /// Adds `schema` as registered, after its [`Registry::prepare`]d event was appended.
    pub fn commit(&mut self, schema: Schema) {
        self.loaded += 1;
        self.schemas
            .entry(schema.event_type.clone())
            .or_default()
            .push(schema);
    }

    /// Registers the function that lifts `event_type` payloads from `from` to `from + 1`
    /// (instead of the generic defaults-and-drops).
    pub fn set_upcaster(&mut self, event_type: &str, from: u32, f: Upcaster) {
        self.upcasters.insert((event_type.to_owned(), from), f);
    }

    /// Checks an event about to be appended against its schema, when that schema asks for
    /// validation. Events of types or versions without a schema pass.
    ///
    /// # Errors
    /// [`SchemaError::Invalid`] naming the field.
    pub fn check(&self, e: &EventData) -> Result<(), SchemaError> {
        let Some(s) = self.get(&e.event_type, e.schema_version) else {
            return Ok(());
        };
        if !s.validate {
            return Ok(());
        }
        if e.blob.is_some() {
            // A reference says nothing about the blob's fields: a validated type's events
            // carry their payloads (an append stores a large one as a blob after this check).
            return Err(invalid(
                s,
                "",
                "is a reference to a stored blob; events of a validated type give their payload itself",
            ));
        }
        let v: Value = serde_json::from_slice(&e.payload)
            .map_err(|err| invalid(s, "", format!("is not JSON: {err}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| invalid(s, "", "is not a JSON object"))?;
        for f in &s.fields {
            match obj.get(&f.name) {
                None if f.required => return Err(invalid(s, &f.name, "is required")),
                Some(Value::Null) if !f.required => {}
                Some(val) if !f.kind.admits(val) => {
                    return Err(invalid(
                        s,
                        &f.name,
                        format!("must be a {:?}, got {val}", f.kind),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Lifts `payload` of `event_type` from `version` to the newest registered version.
    /// Returns the new version and payload (unchanged when already newest, or when the
    /// type has no schema).
    ///
    /// # Errors
    /// [`SchemaError::Upcast`] if the payload is not JSON or an upcaster refuses it.
    pub fn upcast(
        &self,
        event_type: &str,
        version: u32,
        payload: &[u8],
    ) -> Result<(u32, Vec<u8>), SchemaError> {
        let Some(latest) = self.latest(event_type) else {
            return Ok((version, payload.to_vec()));
        };
        if version >= latest.version {
            return Ok((version, payload.to_vec()));
        }
        let fail = |from: u32, reason: String| SchemaError::Upcast {
            event_type: event_type.to_owned(),
            from,
            reason,
        };
        let mut v: Value =
            serde_json::from_slice(payload).map_err(|e| fail(version, e.to_string()))?;
        for from in version..latest.version {
            v = match self.upcasters.get(&(event_type.to_owned(), from)) {
                Some(f) => f(v).map_err(|r| fail(from, r))?,
                None => {
                    let next = self
                        .get(event_type, from + 1)
                        .ok_or_else(|| fail(from, format!("no schema version {}", from + 1)))?;
                    let mut obj = match v {
                        Value::Object(o) => o,
                        other => {
                            return Err(fail(from, format!("payload {other} is not an object")));
                        }
                    };
                    // Drop what the next version no longer has (when the older version
                    // declared it), fill what it adds.
                    if let Some(prev) = self.get(event_type, from) {
                        for f in &prev.fields {
                            if !next.fields.iter().any(|n| n.name == f.name) {
                                obj.remove(&f.name);
                            }
                        }
                    }
                    for f in &next.fields {
                        if obj.contains_key(&f.name) {
                            continue;
                        }
                        match &f.default {
                            Some(d) => {
                                obj.insert(f.name.clone(), d.clone());
                            }
                            // A registered upcaster was expected for this step and is not
                            // set in this process: refuse rather than lose the field.
                            None if f.required => {
                                return Err(fail(
                                    from,
                                    format!(
                                        "version {} requires {:?}, which has no default; set the step's upcaster",
                                        from + 1,
                                        f.name
                                    ),
                                ));
                            }
                            None => {}
                        }
                    }
                    Value::Object(obj)
                }
            };
        }
        let bytes = serde_json::to_vec(&v).map_err(|e| fail(latest.version, e.to_string()))?;
        Ok((latest.version, bytes))
    }

    /// `e` as its newest schema version.
    ///
    /// # Errors
    /// As [`Registry::upcast`].
    pub fn view<'e>(&self, e: &'e dyn EventView) -> Result<Upcasted<'e>, SchemaError> {
        // A payload stored as a blob is shown as it is: its reference cannot be upcast (a
        // reader fetches the blob, whose schema version is the event's).
        let (schema_version, payload) = if e.payload_form() == PayloadForm::Blob {
            (e.schema_version(), e.payload().to_vec())
        } else {
            self.upcast(e.event_type(), e.schema_version(), e.payload())?
        };
        Ok(Upcasted {
            inner: e,
            schema_version,
            payload,
        })
    }
}

/// An event shown as a newer schema version than it was written with.
pub struct Upcasted<'e> {
    inner: &'e dyn EventView,
    schema_version: u32,
    payload: Vec<u8>,
}

impl EventView for Upcasted<'_> {
    fn position(&self) -> Position {
        self.inner.position()
    }
    fn version(&self) -> u64 {
        self.inner.version()
    }
    fn event_id(&self) -> EventId {
        self.inner.event_id()
    }
    fn stream(&self) -> &str {
        self.inner.stream()
    }
    fn event_type(&self) -> &str {
        self.inner.event_type()
    }
    fn aggregate_type(&self) -> &str {
        self.inner.aggregate_type()
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
    fn content_type(&self) -> ContentType {
        self.inner.content_type()
    }
    fn payload_form(&self) -> crate::format::envelope::PayloadForm {
        self.inner.payload_form()
    }
    fn correlation_id(&self) -> &str {
        self.inner.correlation_id()
    }
    fn causation_id(&self) -> &str {
        self.inner.causation_id()
    }
    fn actor(&self) -> &str {
        self.inner.actor()
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
    fn event_time(&self) -> Timestamp {
        self.inner.event_time()
    }
    fn record_time(&self) -> Timestamp {
        self.inner.record_time()
    }
    fn removed_by(&self) -> Option<Position> {
        self.inner.removed_by()
    }
}
