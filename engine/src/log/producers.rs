//! Producer keys and the signing policy (docs/FORMAT.md, "Producer-signed batches"): events
//! of the system stream `$producers`, each with its actor and reason, loaded at open and
//! enforced on every append. The stream is written only through [`super::Log`]'s
//! `register_producer_key`, `revoke_producer_key` and `require_signatures`; a direct append
//! to it is refused.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::format::producer::ProducerSignature;
use crate::format::proof::{hex, parse_hex};

/// The system stream holding producer keys and the signing policy.
pub const PRODUCERS_STREAM: &str = "$producers";
/// Event type: a producer key may sign batches (payload: `key`, `name`, `prefixes`,
/// `reason`).
pub const KEY_REGISTERED: &str = "$ProducerKeyRegistered";
/// Event type: a producer key may no longer sign (payload: `key`, `reason`).
pub const KEY_REVOKED: &str = "$ProducerKeyRevoked";
/// Event type: appends to streams with a prefix must be signed (payload: `prefix`,
/// `reason`).
pub const SIGNATURES_REQUIRED: &str = "$SignaturesRequired";

/// A registered producer key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerKey {
    /// Who it belongs to (an OMS, a booking service).
    pub name: String,
    /// The stream prefixes it may sign for; empty: any stream.
    pub prefixes: Vec<String>,
    /// Revoked keys sign nothing new.
    pub revoked: bool,
}

/// The producer keys and the prefixes that require signed appends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerPolicy {
    /// Registered keys.
    pub keys: BTreeMap<[u8; 32], ProducerKey>,
    /// Stream prefixes whose appends must be signed.
    pub required: Vec<String>,
}

fn bad(detail: String) -> Error {
    Error::InvalidAppend { reason: detail }
}

impl ProducerPolicy {
    /// Applies one event of `$producers` (in log order).
    pub(crate) fn apply(&mut self, event_type: &str, payload: &[u8]) -> Result<()> {
        let v: Value = serde_json::from_slice(payload)
            .map_err(|e| bad(format!("{PRODUCERS_STREAM}: not JSON: {e}")))?;
        let key = || {
            v.get("key")
                .and_then(Value::as_str)
                .and_then(parse_hex::<32>)
                .ok_or_else(|| bad(format!("{PRODUCERS_STREAM}: {event_type} without a key")))
        };
        match event_type {
            KEY_REGISTERED => {
                let prefixes = v
                    .get("prefixes")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                let name = v.get("name").and_then(Value::as_str).unwrap_or_default();
                self.keys.insert(
                    key()?,
                    ProducerKey {
                        name: name.to_owned(),
                        prefixes,
                        revoked: false,
                    },
                );
            }
            KEY_REVOKED => {
                if let Some(k) = self.keys.get_mut(&key()?) {
                    k.revoked = true;
                }
            }
            SIGNATURES_REQUIRED => {
                let prefix = v.get("prefix").and_then(Value::as_str).ok_or_else(|| {
                    bad(format!("{PRODUCERS_STREAM}: {event_type} without a prefix"))
                })?;
                if !self.required.iter().any(|p| p == prefix) {
                    self.required.push(prefix.to_owned());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The required prefix that `stream` falls under, if any.
    #[must_use]
    pub fn required_for(&self, stream: &str) -> Option<&str> {
        self.required
            .iter()
            .find(|p| stream.starts_with(p.as_str()))
            .map(String::as_str)
    }

    /// Whether a batch to `streams`, signed as given, may be appended.
    ///
    /// # Errors
    /// [`Error::SignatureRefused`] naming the stream and what is missing.
    pub(crate) fn check(
        &self,
        streams: &[&str],
        signature: Option<&ProducerSignature>,
    ) -> Result<()> {
        let refused = |reason: String| Error::SignatureRefused { reason };
        match signature {
            None => {
                for s in streams {
                    if let Some(p) = self.required_for(s) {
                        return Err(refused(format!(
                            "appends to stream {s} must be signed by a producer (policy for prefix {p:?})"
                        )));
                    }
                }
                Ok(())
            }
            Some(sig) => {
                let fp = crate::format::checkpoint::fingerprint(&sig.public_key);
                let Some(k) = self.keys.get(&sig.public_key) else {
                    return Err(refused(format!(
                        "the batch is signed by key {fp}, which is not a registered producer key"
                    )));
                };
                if k.revoked {
                    return Err(refused(format!(
                        "the batch is signed by key {fp} ({}), which was revoked",
                        k.name
                    )));
                }
                if !k.prefixes.is_empty() {
                    for s in streams {
                        if !k.prefixes.iter().any(|p| s.starts_with(p.as_str())) {
                            return Err(refused(format!(
                                "producer {} (key {fp}) may not sign for stream {s}",
                                k.name
                            )));
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// The payload of a registration event.
pub(crate) fn registered_payload(
    key: &[u8; 32],
    name: &str,
    prefixes: &[String],
    reason: &str,
) -> String {
    json!({"key": hex(key), "name": name, "prefixes": prefixes, "reason": reason}).to_string()
}

/// The payload of a revocation event.
pub(crate) fn revoked_payload(key: &[u8; 32], reason: &str) -> String {
    json!({"key": hex(key), "reason": reason}).to_string()
}

/// The payload of a policy event.
pub(crate) fn required_payload(prefix: &str, reason: &str) -> String {
    json!({"prefix": prefix, "reason": reason}).to_string()
}

/// What a verifier trusts about producers (`tally verify --producers FILE`): the keys it
/// accepts, each for some stream prefixes or any stream, and the prefixes whose batches must
/// be signed. It is the verifier's own, not the log's `$producers`, which an attacker who
/// writes the directory could extend at the tail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerTrust {
    /// Trusted keys: `(name, public key, prefixes)`; empty prefixes: any stream.
    pub keys: Vec<(String, [u8; 32], Vec<String>)>,
    /// Prefixes whose batches must be signed by a trusted key, each from a position on:
    /// the one given (`require PREFIX from N`), or else 0. Never the log's own
    /// `$SignaturesRequired` events: a forger could append one after an injected batch.
    pub required: Vec<(String, Option<u64>)>,
}

impl ProducerTrust {
    /// Parses a producer trust file: lines `key <name> <64 hex digits> [prefix ...]` and
    /// `require <prefix> [from <position>]`; blank lines and lines starting with `#` are
    /// ignored.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] naming the first line that does not parse.
    pub fn parse(text: &str) -> Result<ProducerTrust> {
        let mut t = ProducerTrust::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || Error::InvalidOptions {
                reason: format!(
                    "producer trust file line {}: expected `key NAME HEX [PREFIX...]` or `require PREFIX`",
                    n + 1
                ),
            };
            match f.as_slice() {
                ["key", name, key, prefixes @ ..] => t.keys.push((
                    (*name).to_owned(),
                    parse_hex::<32>(key).ok_or_else(bad)?,
                    prefixes.iter().map(|p| (*p).to_owned()).collect(),
                )),
                ["require", prefix] => t.required.push(((*prefix).to_owned(), None)),
                ["require", prefix, "from", at] => t
                    .required
                    .push(((*prefix).to_owned(), Some(at.parse().map_err(|_| bad())?))),
                _ => return Err(bad()),
            }
        }
        Ok(t)
    }

    /// Checks one batch of a log: its streams, its producer block if any, and the hashes of
    /// its envelopes. Returns why it fails.
    pub(crate) fn check_batch(
        &self,
        log_id: &[u8; 16],
        first: u64,
        streams: &[&str],
        block: Option<&crate::format::producer::ProducerBlock>,
        envelope_hashes: &[crate::format::Hash32],
    ) -> std::result::Result<(), String> {
        let Some(block) = block else {
            for s in streams {
                if let Some((p, from)) = self
                    .required
                    .iter()
                    .find(|(p, from)| s.starts_with(p.as_str()) && from.is_none_or(|f| first >= f))
                {
                    return Err(format!(
                        "the batch writing stream {s} is not signed, but batches for prefix {p:?} must be from position {} on (the trust file's `require {p} from POSITION` says where)",
                        from.unwrap_or(0)
                    ));
                }
            }
            return Ok(());
        };
        let sig = &block.signature;
        let fp = crate::format::checkpoint::fingerprint(&sig.public_key);
        let Some((name, _, prefixes)) = self.keys.iter().find(|(_, k, _)| *k == sig.public_key)
        else {
            return Err(format!(
                "the batch is signed by key {fp}, which is not among the trusted producers"
            ));
        };
        if block.event_count as usize != envelope_hashes.len() {
            return Err(format!(
                "the producer signed {} events, the batch holds {}",
                block.event_count,
                envelope_hashes.len()
            ));
        }
        sig.verify(log_id, envelope_hashes)
            .map_err(|e| format!("the signature of producer {name} does not verify: {e}"))?;
        if !prefixes.is_empty() {
            for s in streams {
                if !prefixes.iter().any(|p| s.starts_with(p.as_str())) {
                    return Err(format!("producer {name} may not sign for stream {s}"));
                }
            }
        }
        Ok(())
    }
}
