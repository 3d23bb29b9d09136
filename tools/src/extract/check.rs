//! Verification of format 3 extracts (docs/EXTRACT.md, 6.4): one pass over the file in
//! bounded memory, the per-record work spread over worker threads.
//!
//! The reader (this thread's helper) cuts the file into batches of records; workers check
//! each record on its own (header, body, record hash, envelope, the selected stream); the
//! calling thread takes the batches back in file order and folds them: positions in order,
//! the range multiproof into the signed root, the stream's versions and links or the
//! window's contiguity. The first failure in file order is the one reported, whichever
//! thread found it. At most a few batches are in flight, so memory is bounded by the
//! buffer size whatever the number of records.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tally_engine::Timestamp;
use tally_engine::format::Hash32;
use tally_engine::format::chain::chain_step;
use tally_engine::format::checkpoint::Statement;
use tally_engine::format::envelope::{EnvelopeRef, PayloadForm};
use tally_engine::format::heads::{HeadProof, stream_key};
use tally_engine::format::multiproof::RangeFolder;
use tally_engine::format::proof::{ProofError, hex};
use tally_engine::format::record::{Layout, NO_STREAM_PREV, RecordHeader};

use super::codec::{Next, RawItem, Reader, Role};
use crate::commands::audit::{Checked, Completeness, check_head};
use crate::support::{Finding, event_json, parse_time, rfc3339};

/// What the head says the extract proves, with what the records are checked against.
#[derive(Clone, Debug)]
enum Selection {
    Stream(String),
    Window(Timestamp, Timestamp),
    Inclusion(String),
}

/// How the verification runs.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Bytes of records read ahead at most, over every batch in flight.
    pub buffer_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            buffer_bytes: 64 << 20,
        }
    }
}

/// Batches in flight: queued for the workers, being checked, and waiting to be folded.
const IN_FLIGHT: usize = 12;

struct Batch {
    seq: u64,
    items: Vec<RawItem>,
}

/// A record that passed the checks a worker makes.
struct Good {
    role: Role,
    position: u64,
    stream_version: u64,
    stream_prev: u64,
    record_time: Timestamp,
    record_hash: Hash32,
    gaps: Vec<Hash32>,
    /// Its readable JSON line, when asked for (`--events`).
    line: Option<Vec<u8>>,
    /// Retention removed the event (a pruned record).
    removed: bool,
    /// For an event that seals personal data: its subject, key generation and sealed fields.
    sealed: Option<(String, u32, Vec<String>)>,
    /// For a `$SubjectErased` event: its subject and generation.
    erasure: Option<(String, u32)>,
}

/// A record that failed: what the worker could tell of it, and why.
struct Bad {
    role: Option<Role>,
    position: Option<u64>,
    why: String,
}

type Checkeds = Vec<Result<Good, Bad>>;

struct Context {
    s: Statement,
    layout: Layout,
    selection: Selection,
    render: bool,
    /// Check each blob an event refers to against the file named by its hash here.
    blobs: Option<std::path::PathBuf>,
}

/// Checks one record on its own: FORMAT.md's header and body rules, the record hash from
/// the bytes, the envelope, and (stream extracts) its stream.
fn check_one(item: &RawItem, cx: &Context) -> Result<Good, Bad> {
    let parts = item.parts(cx.layout).map_err(|why| Bad {
        role: item.role,
        position: None,
        why,
    })?;
    let bad = |position: Option<u64>, why: String| Bad {
        role: Some(parts.role),
        position,
        why,
    };
    if parts.header.len() != cx.layout.header_len() {
        return Err(bad(
            None,
            format!(
                "header: {} bytes, not {} (format version {})",
                parts.header.len(),
                cx.layout.header_len(),
                cx.layout.version()
            ),
        ));
    }
    let h = RecordHeader::decode_in(&parts.header, cx.layout)
        .map_err(|e| bad(None, format!("header: {e}")))?;
    let position = h.position.0;
    if position >= cx.s.tree_size {
        return Err(bad(
            Some(position),
            format!("beyond the checkpoint's {} records", cx.s.tree_size),
        ));
    }
    h.check_body(&parts.body).map_err(|_| {
        bad(
            Some(position),
            "the body does not match its header (length or checksum)".into(),
        )
    })?;
    let linked = tally_engine::format::pruned::linked_body_hash(&h, &parts.body)
        .map_err(|e| bad(Some(position), format!("pruned body: {e}")))?;
    let hash = chain_step(&parts.prev, &parts.header, &linked);
    if hash != h.chain_hash {
        return Err(bad(
            Some(position),
            format!(
                "the record hash computed from its bytes is {}, the header says {}",
                hex(&hash),
                hex(&h.chain_hash)
            ),
        ));
    }
    let (env, removed_by) = tally_engine::format::pruned::content(&h, &parts.body)
        .map_err(|e| bad(Some(position), format!("envelope: {e}")))?;
    if let (Some(dir), Some(blob)) = (&cx.blobs, env.blob()) {
        crate::commands::audit::check_blob_file(&blob, dir)
            .map_err(|why| bad(Some(position), why))?;
    }
    if parts.role == Role::Event
        && let Selection::Stream(stream) = &cx.selection
        && env.stream != stream
    {
        return Err(bad(
            Some(position),
            format!("an event of stream {}, not of {stream}", env.stream),
        ));
    }
    let sealed = sealed_of(&env).map_err(|why| bad(Some(position), why))?;
    let erasure = (env.stream == tally_engine::ERASURE_STREAM
        && env.event_type == tally_engine::SUBJECT_ERASED)
        .then(|| serde_json::from_slice::<tally_engine::SubjectErased>(env.payload))
        .transpose()
        .map_err(|e| bad(Some(position), format!("an erasure event: {e}")))?
        .map(|e| (e.subject, e.generation));
    let line = (cx.render && parts.role == Role::Event).then(|| {
        let mut v = event_json(
            position,
            h.stream_version,
            h.record_time,
            &h.chain_hash,
            &env,
        );
        if let Some(by) = removed_by {
            v["removed_by"] = by.0.into();
        }
        if let Some((payload, s)) = sealed_view(&env) {
            v["payload"] = payload;
            v["payload_encoding"] = "json".into();
            v["sealed"] = s;
        }
        let mut l = serde_json::to_vec(&v).unwrap_or_default();
        l.push(b'\n');
        l
    });
    Ok(Good {
        role: parts.role,
        position,
        stream_version: h.stream_version,
        stream_prev: h.stream_prev,
        record_time: h.record_time,
        record_hash: h.chain_hash,
        gaps: parts.gaps,
        line,
        removed: removed_by.is_some(),
        sealed: sealed.map(|s| {
            (
                s.subject.to_hex(),
                s.generation,
                s.field_names().unwrap_or_default(),
            )
        }),
        erasure,
    })
}

/// The sealed payload of `env`, checked (FORMAT.md 6.6), when it has one.
fn sealed_of<'a>(
    env: &EnvelopeRef<'a>,
) -> Result<Option<tally_engine::format::sealed::SealedRef<'a>>, String> {
    if env.payload_form != PayloadForm::Sealed {
        return Ok(None);
    }
    let s = tally_engine::format::sealed::decode(env.payload)
        .map_err(|e| format!("sealed payload: {e}"))?;
    s.field_names()
        .map_err(|e| format!("sealed payload: {e}"))?;
    Ok(Some(s))
}

/// How a sealed event reads in an extract, which carries no key: its clear fields with each
/// sealed one as `{"$sealed": {"subject": S}}` (or the whole payload so), and a `sealed`
/// object naming the subject, generation and fields.
fn sealed_view(env: &EnvelopeRef<'_>) -> Option<(Value, Value)> {
    let s = sealed_of(env).ok()??;
    let names = s.field_names().unwrap_or_default();
    let marker =
        serde_json::json!({ tally_engine::SEALED_MARKER: { "subject": s.subject.to_hex() } });
    let payload = if s.scope == tally_engine::format::sealed::SealScope::Payload {
        marker
    } else {
        let mut obj = match serde_json::from_slice::<Value>(s.clear) {
            Ok(Value::Object(o)) => o,
            _ => serde_json::Map::new(),
        };
        for n in &names {
            obj.insert(n.clone(), marker.clone());
        }
        Value::Object(obj)
    };
    let info = serde_json::json!({
        "subject": s.subject.to_hex(),
        "generation": s.generation,
        "fields": (s.scope == tally_engine::format::sealed::SealScope::Fields).then_some(names),
    });
    Some((payload, info))
}

/// The in-order fold of the checked records.
struct Fold {
    s: Statement,
    selection: Selection,
    folder: RangeFolder,
    events: u64,
    /// Events that retention removed.
    removed: u64,
    /// Personal data sealed in the events, and erasures among them.
    personal: crate::commands::audit::Personal,
    records: u64,
    proof_nodes: u64,
    last_position: Option<u64>,
    stream_prev: u64,
    first_event: Option<u64>,
    /// The positions of a window's edge records.
    before: Option<u64>,
    after: Option<u64>,
}

fn name(role: Option<Role>, events: u64) -> String {
    match role {
        Some(Role::Event) | None => format!("events[{events}]"),
        Some(Role::Before) => "the record before the window".into(),
        Some(Role::After) => "the record after the window".into(),
    }
}

impl Fold {
    fn at(&self, role: Option<Role>, position: Option<u64>) -> String {
        match position {
            Some(p) => format!("{} (position {p})", name(role, self.events)),
            None => name(role, self.events),
        }
    }

    fn push(&mut self, r: Result<Good, Bad>) -> Result<(), Finding> {
        let g = r.map_err(|b| Finding(format!("{}: {}", self.at(b.role, b.position), b.why)))?;
        let at = self.at(Some(g.role), Some(g.position));
        let fail = |why: String| Err(Finding(format!("{at}: {why}")));
        if self.after.is_some() {
            return fail("a record after the window's after record".into());
        }
        match (&self.selection, g.role) {
            (Selection::Window(..), _) | (_, Role::Event) => {}
            _ => return fail("an edge record in an extract that is not of a window".into()),
        }
        if g.role == Role::Before && self.records > 0 {
            return fail("the record before the window is not the first record".into());
        }
        if let Selection::Window(from, to) = self.selection {
            if let Some(last) = self.last_position
                && g.position != last + 1
            {
                return fail(format!(
                    "follows position {last}: a window's records are every position, in order: records are missing, added or out of order"
                ));
            }
            let t = g.record_time;
            let ok = match g.role {
                Role::Before => t < from,
                Role::Event => from <= t && t < to,
                Role::After => t >= to,
            };
            if !ok {
                return fail(format!(
                    "recorded at {}, {} the window",
                    rfc3339(t),
                    if g.role == Role::Event {
                        "outside"
                    } else {
                        "inside"
                    }
                ));
            }
        }
        match self.folder.push_gap(g.position, &g.gaps) {
            Ok(()) => {}
            Err(ProofError::WrongLength { found, expected }) => {
                return fail(format!(
                    "{found} proof nodes before it, where the positions since the previous record need {expected}"
                ));
            }
            Err(_) => {
                return fail(format!(
                    "not after the previous record's position {}: records are out of order or repeated",
                    self.folder.next().saturating_sub(1)
                ));
            }
        }
        self.folder
            .push_record(&g.record_hash)
            .map_err(|e| Finding(format!("{at}: {e}")))?;
        self.proof_nodes += g.gaps.len() as u64;
        self.records += 1;
        self.last_position = Some(g.position);
        match g.role {
            Role::Before => self.before = Some(g.position),
            Role::After => self.after = Some(g.position),
            Role::Event => {
                if let Selection::Stream(_) = self.selection {
                    if g.stream_version != self.events {
                        return fail(format!(
                            "version {} where version {} must be: events are missing, added or out of order",
                            g.stream_version, self.events
                        ));
                    }
                    if g.stream_prev != self.stream_prev {
                        return fail(format!(
                            "its previous event is at position {}, but the extract's is {}",
                            g.stream_prev,
                            if self.stream_prev == NO_STREAM_PREV {
                                "none".to_owned()
                            } else {
                                self.stream_prev.to_string()
                            }
                        ));
                    }
                    self.stream_prev = g.position;
                }
                self.first_event.get_or_insert(g.position);
                self.events += 1;
                self.removed += u64::from(g.removed);
                if let Some((subject, generation, fields)) = g.sealed {
                    self.personal.sealed_events += 1;
                    let newest = self
                        .personal
                        .generations
                        .entry(subject.clone())
                        .or_default();
                    *newest = (*newest).max(generation);
                    self.personal
                        .subjects
                        .entry(subject)
                        .or_default()
                        .extend(fields);
                }
                if let Some((subject, generation)) = g.erasure {
                    self.personal
                        .erasures
                        .push((subject, generation, g.position));
                }
            }
        }
        Ok(())
    }

    fn finish(mut self, trailer: &Value) -> Result<(Completeness, u64), Finding> {
        let t = |k: &str| {
            trailer
                .get(k)
                .ok_or_else(|| Finding(format!("trailer: missing field {k:?}")))
        };
        let count = t("events")?.as_u64();
        if count != Some(self.events) {
            return Err(Finding(format!(
                "the trailer counts {} events, the extract holds {}",
                t("events")?,
                self.events
            )));
        }
        let gaps = crate::commands::audit::hash_list(t("gap")?, "trailer.gap")?;
        match self.folder.push_gap(self.s.tree_size, &gaps) {
            Ok(()) => {}
            Err(ProofError::WrongLength { found, expected }) => {
                return Err(Finding(format!(
                    "trailer.gap: {found} proof nodes, where the positions after the last record need {expected}"
                )));
            }
            Err(e) => return Err(Finding(format!("trailer.gap: {e}"))),
        }
        self.proof_nodes += gaps.len() as u64;
        let root = self
            .folder
            .root()
            .map_err(|_| Finding("the extract holds no record and no proof node".into()))?;
        if root != self.s.root {
            return Err(Finding(format!(
                "the Merkle root computed from the extract's {} records and {} proof nodes is {}, but checkpoint {} signs {}: a record hash or a proof node was changed, added or removed",
                self.records,
                self.proof_nodes,
                hex(&root),
                self.s.id,
                hex(&self.s.root)
            )));
        }
        let kind = match &self.selection {
            Selection::Inclusion(why) => Completeness::Inclusion(why.clone()),
            Selection::Stream(stream) => {
                let Some((_, streams_root)) = self.s.streams else {
                    return Err(Finding(
                        "selection: a stream proof needs a version 2 checkpoint".into(),
                    ));
                };
                let head = t("head")?;
                let int = |k: &str| {
                    head.get(k).and_then(Value::as_u64).ok_or_else(|| {
                        Finding(format!("trailer.head.{k}: missing or not an integer"))
                    })
                };
                let (version, position) = (int("version")?, int("position")?);
                let siblings = crate::commands::audit::hash_list(
                    head.get("proof").unwrap_or(&Value::Null),
                    "trailer.head.proof",
                )?;
                let last = (self.events > 0).then(|| (self.events - 1, self.last_position));
                if last != Some((version, Some(position))) {
                    return Err(Finding(format!(
                        "the stream's head at checkpoint {} is version {version} at position {position}, but the extract ends at {}: its newest events are missing",
                        self.s.id,
                        match last {
                            Some((v, Some(p))) => format!("version {v} at position {p}"),
                            _ => "no event".to_owned(),
                        }
                    )));
                }
                let key = stream_key(stream.as_bytes());
                if !(HeadProof { siblings }).verify(&streams_root, &key, version, position) {
                    return Err(Finding(format!(
                        "trailer.head: the proof that stream {stream} ends at version {version} does not verify against the signed stream heads root"
                    )));
                }
                Completeness::Stream(stream.clone())
            }
            Selection::Window(from, to) => {
                let int = |k: &str| {
                    t(k)?
                        .as_u64()
                        .ok_or_else(|| Finding(format!("trailer.{k}: not an integer")))
                };
                let (a, b) = (int("first_position")?, int("end_position")?);
                let size = self.s.tree_size;
                if a > b || b > size || self.events != b - a {
                    return Err(Finding(format!(
                        "the window is positions {a}..{b} of a tree of {size}, but the extract holds {} events",
                        self.events
                    )));
                }
                if self.first_event.is_some_and(|f| f != a) {
                    return Err(Finding(format!(
                        "the window starts at position {a}, but its first event is at {}",
                        self.first_event.unwrap_or_default()
                    )));
                }
                if self.before != a.checked_sub(1) {
                    return Err(Finding(format!(
                        "the record before position {a} must be proven and recorded before the window when the window does not start the log: the window may start earlier"
                    )));
                }
                if self.after != (b < size).then_some(b) {
                    return Err(Finding(format!(
                        "the record at position {b} must be proven and recorded at or after the window's end when the window does not end the checkpoint: the window may end later"
                    )));
                }
                Completeness::Window(rfc3339(*from), rfc3339(*to), a, b)
            }
        };
        Ok((kind, self.events))
    }
}

fn selection(head: &Value) -> Result<Selection, Finding> {
    let sel = head
        .get("selection")
        .ok_or_else(|| Finding("head: missing field \"selection\"".into()))?;
    let text = |k: &str| {
        sel.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| Finding(format!("selection.{k}: missing or not a string")))
    };
    match text("kind")? {
        "stream" => Ok(Selection::Stream(text("stream")?.to_owned())),
        "window" => {
            let time = |k: &str| -> Result<Timestamp, Finding> {
                parse_time(text(k)?).map_err(|e| Finding(format!("selection.{k}: {e}")))
            };
            let (from, to) = (time("from_time")?, time("to_time")?);
            if from >= to {
                return Err(Finding(
                    "selection: the window's from_time is not before its to_time".into(),
                ));
            }
            Ok(Selection::Window(from, to))
        }
        "inclusion" => Ok(Selection::Inclusion(text("why")?.to_owned())),
        other => Err(Finding(format!("selection.kind: unknown kind {other:?}"))),
    }
}

/// Verifies a format 3 extract from `input` (positioned at its start). Verified events go
/// to `events` as JSON lines when given; with `blobs`, each blob an event refers to must be
/// the file named by its hash in that directory.
///
/// # Errors
/// `Err(Finding)` names the first problem in file order.
pub fn verify<R: BufRead + Send>(
    input: R,
    form: super::codec::Form,
    trusted: &[[u8; 32]],
    tuning: Tuning,
    mut events: Option<&mut dyn Write>,
    blobs: Option<&std::path::Path>,
    bar: &indicatif::ProgressBar,
) -> Result<Checked, Finding> {
    let mut reader = Reader::new(input, form);
    let head = reader.head().map_err(Finding)?;
    if head.get("format").and_then(Value::as_str) != Some(super::EXTRACT_FORMAT_V3) {
        return Err(Finding(format!(
            "head: not a {} document",
            super::EXTRACT_FORMAT_V3
        )));
    }
    let (cp, layout) = check_head(&head, trusted)?;
    let selection = selection(&head)?;
    if !matches!(selection, Selection::Inclusion(_)) && cp.statement.streams.is_none() {
        return Err(Finding(
            "selection: a stream or window proof needs a version 2 checkpoint".into(),
        ));
    }
    reader.set_layout(layout);
    let cx = Context {
        s: cp.statement,
        layout,
        selection: selection.clone(),
        render: events.is_some(),
        blobs: blobs.map(std::path::Path::to_path_buf),
    };
    let mut fold = Fold {
        s: cp.statement,
        selection,
        folder: RangeFolder::new(cp.statement.tree_size),
        events: 0,
        removed: 0,
        personal: crate::commands::audit::Personal::default(),
        records: 0,
        proof_nodes: 0,
        last_position: None,
        stream_prev: NO_STREAM_PREV,
        first_event: None,
        before: None,
        after: None,
    };
    let batch_bytes = (tuning.buffer_bytes / IN_FLIGHT).max(64 << 10);
    let workers = tuning.workers.max(1);
    let mut personal = crate::commands::audit::Personal::default();
    let (kind, n, removed) =
        std::thread::scope(|scope| -> Result<(Completeness, u64, u64), Finding> {
            let (work_tx, work_rx) =
                sync_channel::<Batch>(IN_FLIGHT / 2 - workers.min(IN_FLIGHT / 4));
            let (done_tx, done_rx) = sync_channel::<(u64, Checkeds)>(IN_FLIGHT / 2);
            let work_rx = Arc::new(Mutex::new(work_rx));
            for _ in 0..workers {
                let (rx, tx, cx) = (Arc::clone(&work_rx), done_tx.clone(), &cx);
                scope.spawn(move || work(&rx, &tx, cx));
            }
            drop(done_tx);
            let read = scope.spawn(move || read_batches(&mut reader, &work_tx, batch_bytes, bar));
            let folded = fold_batches(&mut fold, &done_rx, &mut events);
            drop(done_rx);
            drop(work_rx);
            let read = read
                .join()
                .map_err(|_| Finding("the reader failed".into()))?;
            let folded = folded?;
            let (trailer, batches) = read?;
            if folded != batches {
                return Err(Finding(format!(
                    "{folded} of {batches} batches of records were checked: a worker failed"
                )));
            }
            let removed = fold.removed;
            personal = std::mem::take(&mut fold.personal);
            fold.finish(&trailer).map(|(kind, n)| (kind, n, removed))
        })?;
    Ok(Checked {
        checkpoint: cp,
        events: usize::try_from(n).unwrap_or(usize::MAX),
        removed: usize::try_from(removed).unwrap_or(usize::MAX),
        personal,
        kind,
        note: head
            .get("checkpoint_note")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

fn work(rx: &Mutex<Receiver<Batch>>, tx: &SyncSender<(u64, Checkeds)>, cx: &Context) {
    loop {
        let batch = match rx.lock().map(|r| r.recv()) {
            Ok(Ok(b)) => b,
            _ => return,
        };
        let out: Checkeds = batch.items.iter().map(|i| check_one(i, cx)).collect();
        if tx.send((batch.seq, out)).is_err() {
            return;
        }
    }
}

/// Reads record items into batches for the workers; returns the trailer and the number of
/// batches sent, or the first problem of the file's framing (after the batches before it).
fn read_batches<R: BufRead>(
    reader: &mut Reader<R>,
    tx: &SyncSender<Batch>,
    batch_bytes: usize,
    bar: &indicatif::ProgressBar,
) -> Result<(Value, u64), Finding> {
    let mut seq = 0;
    let mut items = Vec::new();
    let mut bytes = 0;
    let send = |seq: &mut u64, items: &mut Vec<RawItem>| -> bool {
        let batch = Batch {
            seq: *seq,
            items: std::mem::take(items),
        };
        *seq += 1;
        tx.send(batch).is_ok()
    };
    loop {
        match reader.next() {
            Ok(Next::Item(item)) => {
                bar.inc(item.bytes.len() as u64 + 1);
                bytes += item.bytes.len() + 64;
                items.push(item);
                if bytes >= batch_bytes {
                    bytes = 0;
                    if !send(&mut seq, &mut items) {
                        return Err(Finding("verification stopped".into()));
                    }
                }
            }
            Ok(Next::Trailer(t)) => {
                if !items.is_empty() && !send(&mut seq, &mut items) {
                    return Err(Finding("verification stopped".into()));
                }
                return Ok((t, seq));
            }
            Err(why) => {
                if !items.is_empty() {
                    let _sent = send(&mut seq, &mut items);
                }
                return Err(Finding(why));
            }
        }
    }
}

/// Folds the workers' results in file order, until they stop coming; returns the number
/// of batches folded.
fn fold_batches(
    fold: &mut Fold,
    rx: &Receiver<(u64, Checkeds)>,
    events: &mut Option<&mut dyn Write>,
) -> Result<u64, Finding> {
    let mut next = 0u64;
    let mut waiting: BTreeMap<u64, Checkeds> = BTreeMap::new();
    while let Ok((seq, out)) = rx.recv() {
        waiting.insert(seq, out);
        while let Some(out) = waiting.remove(&next) {
            next += 1;
            for r in out {
                let line = r.as_ref().ok().and_then(|g| g.line.clone());
                fold.push(r)?;
                if let (Some(w), Some(l)) = (events.as_mut(), line) {
                    w.write_all(&l)
                        .map_err(|e| Finding(format!("writing the events: {e}")))?;
                }
            }
        }
    }
    Ok(next)
}
