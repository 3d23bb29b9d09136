//! The log's governance operations: retention policies and legal holds written as events of
//! `$governance` ([`crate::governance`]), and the retention plan that judges every event
//! against them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::record::BodyForm;
use crate::format::{Position, Timestamp};
use crate::governance::{
    GOVERNANCE_STREAM, Governance, HOLD_PLACED, HOLD_RELEASED, HoldPlaced, Keep, POLICY_REMOVED,
    POLICY_SET, PolicySet, Withdrawn,
};
use crate::log::{
    AppendRequest, AppendResult, Direction, EventData, ExpectedVersion, Log, append, read,
};

/// What a retention run would remove, and what holds keep ([`Log::retention_plan`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RetentionPlan {
    /// The time the policies were judged at.
    pub as_of: Timestamp,
    /// Events examined (every event of a stream some policy covers).
    pub examined: u64,
    /// Per stream, the events a policy removes, ordered by stream name.
    pub removals: Vec<StreamRemoval>,
    /// Per stream, the events a policy would remove but a hold keeps.
    pub held: Vec<StreamHeld>,
}

/// The events of one stream a policy removes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamRemoval {
    /// The stream.
    pub stream: String,
    /// The policy.
    pub policy: String,
    /// Why, in words (the rule and the event or time that started its clock).
    pub why: String,
    /// How many events.
    pub events: u64,
    /// The stream's last version when the plan was made: a run removes nothing of a stream
    /// that has grown since (its clock may have started again).
    #[serde(default)]
    pub last_version: u64,
    /// The positions removed, ascending (left out of a plan sent as a summary, such as
    /// GOVERN's answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<u64>,
    /// The first and last stream version removed.
    pub versions: (u64, u64),
}

/// The events of one stream a hold keeps from its policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamHeld {
    /// The stream.
    pub stream: String,
    /// The policy that would remove them.
    pub policy: String,
    /// The holds that keep them.
    pub holds: Vec<String>,
    /// How many events.
    pub events: u64,
}

impl RetentionPlan {
    /// The plan without the positions of each removal (the counts, versions and reasons
    /// stay): what a report or a protocol answer carries, whatever the size of the log.
    #[must_use]
    pub fn summary(mut self) -> RetentionPlan {
        for r in &mut self.removals {
            r.positions = Vec::new();
        }
        self
    }

    /// Events the plan removes.
    #[must_use]
    pub fn removed_events(&self) -> u64 {
        self.removals.iter().map(|r| r.events).sum()
    }

    /// Events holds keep.
    #[must_use]
    pub fn held_events(&self) -> u64 {
        self.held.iter().map(|h| h.events).sum()
    }
}

/// What the plan's first pass learns of a stream.
#[derive(Default)]
struct Facts {
    aggregate_type: String,
    last_version: u64,
    last_time: Timestamp,
    /// Record time of the first event of each type some `AfterEvent` policy names.
    started: HashMap<String, Timestamp>,
}

/// Counts one more event kept by `holds`, adding the hold ids not yet named.
fn note_holds(kept: &mut (Vec<String>, u64), holds: Vec<&str>) {
    for id in holds {
        if !kept.0.iter().any(|x| x == id) {
            kept.0.push(id.to_owned());
        }
    }
    kept.1 += 1;
}

/// The fold of `$governance`: the rules in force and every run.
pub(crate) fn fold(shared: &super::shared::Shared) -> Result<Governance> {
    let mut g = Governance::default();
    for e in read::read_stream(shared, GOVERNANCE_STREAM, 0, usize::MAX, Direction::Forward)? {
        g.apply(&e)?;
    }
    Ok(g)
}

fn refused(reason: String) -> Error {
    Error::InvalidOptions { reason }
}

fn ago(nanos: u64) -> String {
    const DAY: u64 = 86_400_000_000_000;
    if nanos.is_multiple_of(365 * DAY + DAY / 4) && nanos > 0 {
        format!("{}y", nanos / (365 * DAY + DAY / 4))
    } else if nanos.is_multiple_of(DAY) {
        format!("{}d", nanos / DAY)
    } else {
        format!("{}s", nanos / 1_000_000_000)
    }
}

impl Log {
    /// The retention policies and legal holds in force, and every retention run: a fold of
    /// `$governance`.
    ///
    /// # Errors
    /// Read errors; a governance event that does not decode.
    pub fn governance(&self) -> Result<Governance> {
        fold(&self.shared)
    }

    /// Sets a retention policy (a new one, or a new definition under an existing name),
    /// as an event of `$governance` with `actor` and the policy's reason.
    ///
    /// # Errors
    /// [`Error::InvalidAppend`] for a definition that does not check; as [`Log::append`].
    pub fn set_retention_policy(&self, policy: &PolicySet, actor: &str) -> Result<AppendResult> {
        policy.check()?;
        self.write_governance(POLICY_SET, policy, actor, |g| {
            // One policy per scope: two would leave which one applies to a stream to their
            // names.
            match g
                .policies
                .values()
                .find(|p| p.policy.scope == policy.scope && p.policy.name != policy.name)
            {
                Some(other) => Err(refused(format!(
                    "policy {:?} already covers that scope: set it again, or remove it first",
                    other.policy.name
                ))),
                None => Ok(()),
            }
        })
    }

    /// Removes the retention policy `name`.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when there is no such policy; as [`Log::append`].
    pub fn remove_retention_policy(
        &self,
        name: &str,
        actor: &str,
        reason: &str,
    ) -> Result<AppendResult> {
        let w = Withdrawn {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        w.check()?;
        self.write_governance(POLICY_REMOVED, &w, actor, |g| {
            if g.policies.contains_key(name) {
                Ok(())
            } else {
                Err(refused(format!("there is no retention policy {name:?}")))
            }
        })
    }

    /// Places a legal hold: from then on nothing it covers is removed or erased.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when a hold with that id stands; [`Error::InvalidAppend`]
    /// for a definition that does not check; as [`Log::append`].
    pub fn place_legal_hold(&self, hold: &HoldPlaced, actor: &str) -> Result<AppendResult> {
        hold.check()?;
        self.write_governance(HOLD_PLACED, hold, actor, |g| {
            if g.holds.contains_key(&hold.id) {
                Err(refused(format!("legal hold {:?} already stands", hold.id)))
            } else {
                Ok(())
            }
        })
    }

    /// Releases the legal hold `id`.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when no such hold stands; as [`Log::append`].
    pub fn release_legal_hold(&self, id: &str, actor: &str, reason: &str) -> Result<AppendResult> {
        let w = Withdrawn {
            name: id.to_owned(),
            reason: reason.to_owned(),
        };
        w.check()?;
        self.write_governance(HOLD_RELEASED, &w, actor, |g| {
            if g.holds.contains_key(id) {
                Ok(())
            } else {
                Err(refused(format!("there is no legal hold {id:?}")))
            }
        })
    }

    /// Appends one event to `$governance`, holding the governance lock so that the check
    /// against the rules in force, the append, and any retention run are ordered.
    fn write_governance(
        &self,
        event_type: &str,
        payload: &impl Serialize,
        actor: &str,
        check: impl FnOnce(&Governance) -> Result<()>,
    ) -> Result<AppendResult> {
        let _order = self.shared.governance.lock();
        check(&self.governance()?)?;
        self.append_governance(event_type, payload, actor)
    }

    /// Appends one event to `$governance` and waits for it; the caller holds the
    /// governance lock.
    pub(crate) fn append_governance(
        &self,
        event_type: &str,
        payload: &impl Serialize,
        actor: &str,
    ) -> Result<AppendResult> {
        let payload = serde_json::to_string(payload).map_err(|e| Error::InvalidAppend {
            reason: format!("{event_type}: {e}"),
        })?;
        let events = [EventData::json(event_type, payload).actor(actor)];
        let mut results = append::submit_signed(
            &self.shared,
            &[AppendRequest {
                stream: GOVERNANCE_STREAM,
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
        .wait()?;
        Ok(results.remove(0))
    }

    /// Judges every event of the log against the retention policies and legal holds in
    /// force at `as_of`: which events a policy removes, and which a hold keeps. Nothing is
    /// changed. System streams (`$...`) are never removed, except the snapshots of a stream
    /// removed whole (`$snapshot-<stream>`), which go with it.
    ///
    /// # Errors
    /// Read errors; a record that does not decode.
    pub fn retention_plan(&self, as_of: Timestamp) -> Result<RetentionPlan> {
        // Two passes over every record: at low priority, beside appends.
        super::retention::at_low_priority(|| {
            let g = self.governance()?;
            self.plan_with(&g, as_of)
        })
    }

    pub(crate) fn plan_with(&self, g: &Governance, as_of: Timestamp) -> Result<RetentionPlan> {
        let mut plan = RetentionPlan {
            as_of,
            ..RetentionPlan::default()
        };
        if g.policies.is_empty() {
            return Ok(plan);
        }
        let clocks: Vec<&str> = g
            .policies
            .values()
            .filter_map(|p| match &p.policy.keep {
                Keep::AfterEvent { event_type, .. } => Some(event_type.as_str()),
                _ => None,
            })
            .collect();
        let end = self.next_position();
        // Pass 1: what each stream is (aggregate type, last event, clock events).
        let mut facts: HashMap<String, Facts> = HashMap::new();
        let mut bad = None;
        self.scan_range(Position(0), end, read::Verify::Checksums, |r| {
            if r.body_form == BodyForm::Pruned {
                return;
            }
            let env = match r.envelope() {
                Ok(env) => env,
                Err(e) => {
                    bad.get_or_insert((r.position, e));
                    return;
                }
            };
            if env.stream.starts_with('$') {
                return;
            }
            let f = facts.entry(env.stream.to_owned()).or_default();
            // The first event's aggregate type; once retention removed it, the oldest one
            // left (a stream keeps one aggregate type).
            if f.aggregate_type.is_empty() {
                env.aggregate_type.clone_into(&mut f.aggregate_type);
            }
            f.last_version = r.stream_version;
            f.last_time = r.record_time;
            if clocks.contains(&env.event_type) && !f.started.contains_key(env.event_type) {
                f.started.insert(env.event_type.to_owned(), r.record_time);
            }
        })?;
        if let Some((position, e)) = bad {
            return Err(Error::Corrupt {
                file: self.shared.dir.clone(),
                offset: 0,
                position: Some(position.0),
                detail: "an envelope does not decode".to_owned(),
                source: Some(e),
            });
        }
        // Per stream: the policy, and the first version it keeps.
        let mut keep_from: HashMap<&str, (u64, &str, String)> = HashMap::new();
        for (stream, f) in &facts {
            let Some(p) = g.policy_for(stream, &f.aggregate_type) else {
                continue;
            };
            let expired = |t: Timestamp, nanos: u64| t.0.saturating_add(nanos) <= as_of.0;
            let (from, why) = match &p.policy.keep {
                Keep::AfterLastEvent { nanos } if expired(f.last_time, *nanos) => (
                    f.last_version + 1,
                    format!("kept {} after its last event", ago(*nanos)),
                ),
                Keep::AfterEvent { event_type, nanos } => match f.started.get(event_type) {
                    Some(t) if expired(*t, *nanos) => (
                        f.last_version + 1,
                        format!("kept {} after {event_type}", ago(*nanos)),
                    ),
                    _ => continue,
                },
                Keep::Newest { count } if f.last_version + 1 > *count => (
                    f.last_version + 1 - count,
                    format!("keeps the newest {count} events"),
                ),
                _ => continue,
            };
            keep_from.insert(stream.as_str(), (from, p.policy.name.as_str(), why));
        }
        // Pass 2: each event below its stream's first kept version goes, unless held.
        let mut removed: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        let mut held: HashMap<&str, (Vec<String>, u64)> = HashMap::new();
        // The snapshots of each stream the policy removes whole (derived from it, they go
        // with it unless a hold keeps any of its events).
        let mut snapshots: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        // Holds that cover a snapshot event itself (its stream, actor or correlation id):
        // they keep every snapshot of that stream.
        let mut snapshots_held: HashMap<&str, (Vec<String>, u64)> = HashMap::new();
        self.scan_range(Position(0), end, read::Verify::Checksums, |r| {
            if r.body_form == BodyForm::Pruned {
                return;
            }
            let Ok(env) = r.envelope() else { return };
            if let Some(base) = crate::format::pruned::snapshot_base(env.stream) {
                if let Some((base, (from, _, _))) = keep_from.get_key_value(base)
                    && let Some(f) = facts.get(*base).filter(|f| *from > f.last_version)
                {
                    let holds: Vec<&str> = g
                        .holds_on(env.stream, &f.aggregate_type, env.correlation_id, env.actor)
                        .map(|h| h.hold.id.as_str())
                        .collect();
                    if holds.is_empty() {
                        snapshots
                            .entry(base)
                            .or_default()
                            .push((r.position.0, r.stream_version));
                    } else {
                        note_holds(snapshots_held.entry(base).or_default(), holds);
                    }
                }
                return;
            }
            let Some((stream, (from, _, _))) = keep_from.get_key_value(env.stream) else {
                return;
            };
            plan.examined += 1;
            if r.stream_version >= *from {
                return;
            }
            let agg = facts
                .get(*stream)
                .map(|f| f.aggregate_type.as_str())
                .unwrap_or_default();
            let holds: Vec<&str> = g
                .holds_on(env.stream, agg, env.correlation_id, env.actor)
                .map(|h| h.hold.id.as_str())
                .collect();
            if holds.is_empty() {
                removed
                    .entry(stream)
                    .or_default()
                    .push((r.position.0, r.stream_version));
            } else {
                note_holds(held.entry(stream).or_default(), holds);
            }
        })?;
        for (base, (mut holds, events)) in snapshots_held {
            holds.sort();
            plan.held.push(StreamHeld {
                stream: format!("{}{base}", crate::format::pruned::SNAPSHOT_STREAM_PREFIX),
                policy: keep_from[base].1.to_owned(),
                holds,
                events: events + snapshots.remove(base).map_or(0, |s| s.len() as u64),
            });
        }
        for (base, events) in snapshots {
            if held.contains_key(base) || !removed.contains_key(base) {
                continue;
            }
            let (_, policy, _) = &keep_from[base];
            plan.removals.push(StreamRemoval {
                stream: format!("{}{base}", crate::format::pruned::SNAPSHOT_STREAM_PREFIX),
                policy: (*policy).to_owned(),
                why: format!("the snapshots of {base}, which the policy removes"),
                versions: (
                    events.first().map_or(0, |e| e.1),
                    events.last().map_or(0, |e| e.1),
                ),
                events: events.len() as u64,
                last_version: events.last().map_or(0, |e| e.1),
                positions: events.into_iter().map(|e| e.0).collect(),
            });
        }
        for (stream, events) in removed {
            let (_, policy, why) = &keep_from[stream];
            plan.removals.push(StreamRemoval {
                stream: stream.to_owned(),
                policy: (*policy).to_owned(),
                why: why.clone(),
                versions: (
                    events.first().map_or(0, |e| e.1),
                    events.last().map_or(0, |e| e.1),
                ),
                events: events.len() as u64,
                last_version: facts.get(stream).map_or(0, |f| f.last_version),
                positions: events.into_iter().map(|e| e.0).collect(),
            });
        }
        for (stream, (mut holds, events)) in held {
            holds.sort();
            plan.held.push(StreamHeld {
                stream: stream.to_owned(),
                policy: keep_from[stream].1.to_owned(),
                holds,
                events,
            });
        }
        plan.removals.sort_by(|a, b| a.stream.cmp(&b.stream));
        plan.held.sort_by(|a, b| a.stream.cmp(&b.stream));
        Ok(plan)
    }
}
