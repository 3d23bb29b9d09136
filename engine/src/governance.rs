//! Governance as events: retention policies and legal holds (docs/FORMAT.md, "Governance
//! events").
//!
//! Every change is an event of the system stream `$governance`, with the actor who made it
//! and a reason, written only through [`crate::Log`]'s `set_retention_policy`,
//! `remove_retention_policy`, `place_legal_hold` and `release_legal_hold` (a direct append to
//! the stream is refused). The rules in force are a fold of that stream ([`Governance`]), so
//! the history of who changed which rule, when and why, is chained, checkpointed and
//! readable by `tally audit` like any stream.
//!
//! This module is the pure part: the events' payloads, the fold, and which policy and which
//! holds cover an event. Applying retention is [`crate::Log::retention_plan`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{Position, Timestamp};
use crate::log::RecordedEvent;

/// The system stream holding retention policies and legal holds.
pub const GOVERNANCE_STREAM: &str = "$governance";
/// Event type: a retention policy is set (added, or replaced under its name).
pub const POLICY_SET: &str = "$RetentionPolicySet";
/// Event type: a retention policy is removed.
pub const POLICY_REMOVED: &str = "$RetentionPolicyRemoved";
/// Event type: a legal hold is placed.
pub const HOLD_PLACED: &str = "$LegalHoldPlaced";
/// Event type: a legal hold is released.
pub const HOLD_RELEASED: &str = "$LegalHoldReleased";
/// Event type: a retention run removed events (written before any byte is removed).
pub const RETENTION_APPLIED: &str = "$RetentionApplied";

/// Longest policy name or hold id, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Longest reason, in bytes.
pub const REASON_BYTES_MAX: usize = 1024;

/// Which streams a retention policy covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyScope {
    /// Every stream no other policy covers.
    Default,
    /// Streams whose name starts with this prefix (a category, such as `trade-`).
    Prefix(String),
    /// Streams whose first event has this aggregate type.
    AggregateType(String),
}

/// How long a policy keeps a stream's events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// For this many nanoseconds after the stream's last event (its record time): then the
    /// whole stream goes.
    AfterLastEvent {
        /// Nanoseconds.
        nanos: u64,
    },
    /// For this many nanoseconds after the stream's first event of `event_type` (its record
    /// time), such as seven years after a trade settled: then the whole stream goes. A
    /// stream without such an event is kept.
    AfterEvent {
        /// The event type that starts the clock.
        event_type: String,
        /// Nanoseconds.
        nanos: u64,
    },
    /// The newest `count` events of each stream; older ones go.
    Newest {
        /// Events kept (at least 1).
        count: u64,
    },
}

/// What a legal hold covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldScope {
    /// One stream.
    Stream(String),
    /// Streams whose name starts with this prefix.
    Prefix(String),
    /// Streams whose first event has this aggregate type.
    AggregateType(String),
    /// Events with this correlation id.
    CorrelationId(String),
    /// Events with this actor.
    Actor(String),
}

/// The payload of [`POLICY_SET`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySet {
    /// The policy's name (setting an existing name replaces it).
    pub name: String,
    /// What it covers.
    pub scope: PolicyScope,
    /// How long it keeps.
    pub keep: Keep,
    /// Why.
    pub reason: String,
}

/// The payload of [`POLICY_REMOVED`] and [`HOLD_RELEASED`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withdrawn {
    /// The policy's name, or the hold's id.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// The payload of [`HOLD_PLACED`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldPlaced {
    /// The hold's id (a matter or case number).
    pub id: String,
    /// What it covers.
    pub scope: HoldScope,
    /// Why.
    pub reason: String,
}

/// The payload of [`RETENTION_APPLIED`]: what one retention run removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionApplied {
    /// The time the run judged the policies at (nanoseconds since the epoch).
    pub as_of: u64,
    /// Removed positions, as half-open ranges `[from, to)`, ascending and disjoint, each
    /// with the name of the policy that removed it.
    pub removed: Vec<RemovedRange>,
    /// Events a policy would have removed but a hold kept.
    pub held: u64,
    /// Why the run was made (an operator's words, or `scheduled`).
    pub reason: String,
}

/// A run of removed positions and the policy that removed them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovedRange {
    /// First position removed.
    pub from: u64,
    /// One past the last position removed.
    pub to: u64,
    /// The policy.
    pub policy: String,
}

/// Who made a change, when, and where it is in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The event's actor.
    pub actor: String,
    /// Its record time.
    pub at: Timestamp,
    /// Its position.
    pub position: Position,
}

/// A retention policy in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Its definition.
    pub policy: PolicySet,
    /// Who set it.
    pub set: Provenance,
}

/// A legal hold that stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegalHold {
    /// Its definition.
    pub hold: HoldPlaced,
    /// Who placed it.
    pub placed: Provenance,
}

/// The rules in force: a fold of `$governance`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Governance {
    /// Policies by name.
    pub policies: BTreeMap<String, RetentionPolicy>,
    /// Standing holds by id.
    pub holds: BTreeMap<String, LegalHold>,
    /// Every retention run, oldest first, with where it was recorded (one run may be
    /// recorded as several events: [`crate::RANGES_PER_EVENT`] ranges each).
    #[serde(default)]
    pub runs: Vec<(Position, RetentionApplied)>,
}

fn invalid(reason: String) -> Error {
    Error::InvalidAppend { reason }
}

fn check_text(what: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() || s.len() > max || s.chars().any(char::is_control) {
        return Err(invalid(format!(
            "a {what} must be 1 to {max} bytes without control characters"
        )));
    }
    Ok(())
}

impl PolicySet {
    /// Checks the definition before it is written.
    ///
    /// # Errors
    /// [`Error::InvalidAppend`] naming what is wrong.
    pub fn check(&self) -> Result<()> {
        check_text("policy name", &self.name, NAME_BYTES_MAX)?;
        check_text("reason", &self.reason, REASON_BYTES_MAX)?;
        match &self.scope {
            PolicyScope::Default => {}
            PolicyScope::Prefix(p) | PolicyScope::AggregateType(p) => {
                check_text("policy scope", p, crate::format::envelope::STREAM_BYTES_MAX)?;
                if p.starts_with('$') {
                    return Err(invalid(
                        "system streams ($...) are never removed by retention".to_owned(),
                    ));
                }
            }
        }
        match &self.keep {
            Keep::Newest { count: 0 } => Err(invalid(
                "a policy keeps at least the newest event".to_owned(),
            )),
            Keep::AfterEvent { event_type, .. } => check_text(
                "event type",
                event_type,
                crate::format::envelope::EVENT_TYPE_BYTES_MAX,
            ),
            _ => Ok(()),
        }
    }
}

impl HoldPlaced {
    /// Checks the definition before it is written.
    ///
    /// # Errors
    /// [`Error::InvalidAppend`] naming what is wrong.
    pub fn check(&self) -> Result<()> {
        check_text("hold id", &self.id, NAME_BYTES_MAX)?;
        check_text("reason", &self.reason, REASON_BYTES_MAX)?;
        let (HoldScope::Stream(s)
        | HoldScope::Prefix(s)
        | HoldScope::AggregateType(s)
        | HoldScope::CorrelationId(s)
        | HoldScope::Actor(s)) = &self.scope;
        check_text("hold scope", s, crate::format::envelope::STREAM_BYTES_MAX)
    }
}

impl Withdrawn {
    /// Checks the payload before it is written.
    ///
    /// # Errors
    /// [`Error::InvalidAppend`] naming what is wrong.
    pub fn check(&self) -> Result<()> {
        check_text("name", &self.name, NAME_BYTES_MAX)?;
        check_text("reason", &self.reason, REASON_BYTES_MAX)
    }
}

impl Governance {
    /// Applies one event of `$governance`, in log order.
    ///
    /// # Errors
    /// [`Error::Corrupt`]-like [`Error::InvalidAppend`] when a governance event's payload does
    /// not decode (only the engine writes the stream, so this is damage or a forgery).
    pub fn apply(&mut self, e: &RecordedEvent) -> Result<()> {
        let provenance = Provenance {
            actor: e.actor().to_owned(),
            at: e.record_time,
            position: e.position,
        };
        let bad = |err: serde_json::Error| {
            invalid(format!(
                "{GOVERNANCE_STREAM} event at position {}: {}: {err}",
                e.position,
                e.event_type()
            ))
        };
        match e.event_type() {
            POLICY_SET => {
                let policy: PolicySet = serde_json::from_slice(e.payload()).map_err(bad)?;
                self.policies.insert(
                    policy.name.clone(),
                    RetentionPolicy {
                        policy,
                        set: provenance,
                    },
                );
            }
            POLICY_REMOVED => {
                let w: Withdrawn = serde_json::from_slice(e.payload()).map_err(bad)?;
                self.policies.remove(&w.name);
            }
            HOLD_PLACED => {
                let hold: HoldPlaced = serde_json::from_slice(e.payload()).map_err(bad)?;
                self.holds.insert(
                    hold.id.clone(),
                    LegalHold {
                        hold,
                        placed: provenance,
                    },
                );
            }
            HOLD_RELEASED => {
                let w: Withdrawn = serde_json::from_slice(e.payload()).map_err(bad)?;
                self.holds.remove(&w.name);
            }
            RETENTION_APPLIED => {
                let run: RetentionApplied = serde_json::from_slice(e.payload()).map_err(bad)?;
                self.runs.push((e.position, run));
            }
            _ => {}
        }
        Ok(())
    }

    /// The policy that covers a stream named `stream` whose first event has
    /// `aggregate_type`: the longest matching prefix, else an aggregate-type policy, else
    /// the default; none for a system stream.
    #[must_use]
    pub fn policy_for(&self, stream: &str, aggregate_type: &str) -> Option<&RetentionPolicy> {
        if stream.starts_with('$') {
            return None;
        }
        let by_prefix = self
            .policies
            .values()
            .filter_map(|p| match &p.policy.scope {
                PolicyScope::Prefix(x) if stream.starts_with(x.as_str()) => Some((x.len(), p)),
                _ => None,
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, p)| p);
        by_prefix
            .or_else(|| {
                self.policies.values().find(|p| {
                    matches!(&p.policy.scope,
                        PolicyScope::AggregateType(t) if !aggregate_type.is_empty() && t == aggregate_type)
                })
            })
            .or_else(|| {
                self.policies
                    .values()
                    .find(|p| p.policy.scope == PolicyScope::Default)
            })
    }

    /// The standing holds that cover an event of `stream` (whose aggregate type is
    /// `aggregate_type`) with `correlation_id` and `actor`.
    pub fn holds_on<'a>(
        &'a self,
        stream: &'a str,
        aggregate_type: &'a str,
        correlation_id: &'a str,
        actor: &'a str,
    ) -> impl Iterator<Item = &'a LegalHold> + 'a {
        self.holds.values().filter(move |h| match &h.hold.scope {
            HoldScope::Stream(s) => stream == s,
            HoldScope::Prefix(p) => stream.starts_with(p.as_str()),
            HoldScope::AggregateType(t) => aggregate_type == t,
            HoldScope::CorrelationId(c) => correlation_id == c,
            HoldScope::Actor(a) => actor == a,
        })
    }

    /// The retention run recorded at `position` that removed `removed`, and the policy it
    /// names for it.
    #[must_use]
    pub fn removal(&self, by: Position, removed: Position) -> Option<(&RetentionApplied, &str)> {
        let (_, run) = self.runs.iter().find(|(p, _)| *p == by)?;
        let i = run.removed.partition_point(|r| r.from <= removed.0);
        run.removed
            .get(i.checked_sub(1)?)
            .filter(|r| removed.0 < r.to)
            .map(|r| (run, r.policy.as_str()))
    }
}

/// Parses a duration such as `7y`, `30d`, `12h`, `90m`, `45s` (a year is 365.25 days) into
/// nanoseconds.
///
/// # Errors
/// A message when the text is not a number and one of those units, or overflows.
pub fn parse_duration(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?}: a duration needs a unit (s, m, h, d, y)"))?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?}: not a number of units"))?;
    let secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "y" => 31_557_600,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m, h, d, y)")),
    };
    n.checked_mul(secs)
        .and_then(|s| s.checked_mul(1_000_000_000))
        .ok_or_else(|| format!("{text:?}: too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("45s"), Ok(45_000_000_000));
        assert_eq!(parse_duration("2d"), Ok(2 * 86_400 * 1_000_000_000));
        assert_eq!(parse_duration("7y"), Ok(7 * 31_557_600 * 1_000_000_000));
        for bad in ["", "7", "y", "7w", "-1d", "99999999999y"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn definitions_are_checked() {
        let p = |scope, keep| PolicySet {
            name: "p".into(),
            scope,
            keep,
            reason: "r".into(),
        };
        assert!(
            p(PolicyScope::Default, Keep::Newest { count: 1 })
                .check()
                .is_ok()
        );
        assert!(
            p(PolicyScope::Default, Keep::Newest { count: 0 })
                .check()
                .is_err()
        );
        assert!(
            p(
                PolicyScope::Prefix("$producers".into()),
                Keep::Newest { count: 1 }
            )
            .check()
            .is_err()
        );
        let mut q = p(PolicyScope::Default, Keep::Newest { count: 3 });
        q.reason = String::new();
        assert!(q.check().is_err());
    }
}
