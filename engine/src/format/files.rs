//! The name of every file a data directory (and a witness directory) can hold
//! (docs/FORMAT.md, section 2). Nothing outside `format/` spells a file name; the engine,
//! `tally` and `tallyd` name files through these.

use super::SegmentSeq;

/// The log identity (docs/FORMAT.md, "Log identity").
pub const META_FILE: &str = "tally.meta";
/// The advisory lock held by the one writable open.
pub const LOCK_FILE: &str = "tally.lock";
/// The signed checkpoints, appended one entry at a time.
pub const CHECKPOINTS_FILE: &str = "tally.checkpoints";
/// The checkpoint signing key (when kept in the data directory).
pub const KEY_FILE: &str = "tally.key";
/// Appended to a signing key's file name for its ledger of the checkpoints it signed.
pub const KEY_LEDGER_SUFFIX: &str = ".ledger";
/// Witness cosignatures of checkpoints.
pub const COSIGNATURES_FILE: &str = "tally.cosignatures";
/// The Merkle tree's node file.
pub const TREE_FILE: &str = "merkle.tree";
/// The stream-table snapshot written at a clean close and after seals.
pub const SNAPSHOT_FILE: &str = "streams.snap";
/// Appended to a file's name while it is written under a temporary name, before the rename
/// that makes it whole (or the link, for the key file).
pub const TEMP_SUFFIX: &str = ".tmp";
/// Appended to a segment's name while its spare is prepared.
pub const SPARE_TEMP_SUFFIX: &str = ".prep";

/// The witness's secret key file in its directory.
pub const WITNESS_KEY_FILE: &str = "witness.key";
/// The witness's public key (vkey) file in its directory, as `tally verify --witness`
/// reads it.
pub const WITNESS_VKEY_FILE: &str = "witness.vkey";
/// The directory of the logs a witness watches, one subdirectory per log id.
pub const WITNESS_LOGS_DIR: &str = "logs";
/// In a log's subdirectory: the log's public keys (a public key file).
pub const WITNESS_LOG_KEYS_FILE: &str = "log.pub";
/// In a log's subdirectory: the newest checkpoint cosigned, as a signed note.
pub const WITNESS_LATEST_FILE: &str = "latest.note";
/// In a log's subdirectory: every checkpoint cosigned, one line each.
pub const WITNESS_HISTORY_FILE: &str = "history";
/// In a log's subdirectory: signed notes that conflict with what was cosigned.
pub const WITNESS_EVIDENCE_DIR: &str = "evidence";

/// The cold manifest: which segments are in the cold tier (docs/FORMAT.md, 21.6).
pub const COLD_MANIFEST_FILE: &str = "cold.manifest";
/// The URL of the log's cold store, one line (docs/FORMAT.md, 21.7).
pub const COLD_STORE_FILE: &str = "cold.store";
/// The directory of rehydrated cold segments (derived data, emptied by a writable open).
pub const COLD_CACHE_DIR: &str = "cold-cache";

/// The key of segment `seq`'s cold object in the store: `<log id hex>/<seq>.cold`.
#[must_use]
pub fn cold_object_key(log_id: &[u8; 16], seq: SegmentSeq) -> String {
    let hex: String = log_id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}/{:020}.cold", seq.0)
}

/// The key of a blob in the store: `<log id hex>/blobs/<BLAKE3 hex>`.
#[must_use]
pub fn blob_object_key(log_id: &[u8; 16], hash: &super::Hash32) -> String {
    let hex: String = log_id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}/blobs/{}", super::proof::hex(hash))
}

/// The file of segment `seq`.
#[must_use]
pub fn segment_file_name(seq: SegmentSeq) -> String {
    format!("{:020}.seg", seq.0)
}

/// The index sidecar of segment `seq`.
#[must_use]
pub fn index_file_name(seq: SegmentSeq) -> String {
    format!("{:020}.idx", seq.0)
}

/// The attribute index sidecar of segment `seq`.
#[must_use]
pub fn attrs_file_name(seq: SegmentSeq) -> String {
    format!("{:020}.adx", seq.0)
}

/// The segment number named by a segment file's name, if `name` is one.
#[must_use]
pub fn parse_segment_file_name(name: &str) -> Option<SegmentSeq> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(SegmentSeq)
}

/// The temporary name `name` is written under before it is renamed into place.
#[must_use]
pub fn temp_name(name: &str) -> String {
    format!("{name}{TEMP_SUFFIX}")
}

/// The temporary name of segment `seq`'s spare while it is prepared.
#[must_use]
pub fn spare_temp_name(seq: SegmentSeq) -> String {
    format!("{}{SPARE_TEMP_SUFFIX}", segment_file_name(seq))
}

/// The ledger of the signing key whose file is named `key_name`.
#[must_use]
pub fn key_ledger_name(key_name: &str) -> String {
    format!("{key_name}{KEY_LEDGER_SUFFIX}")
}

/// Whether `name` is a temporary file that Tally itself leaves behind when interrupted
/// (removed by a writable open).
#[must_use]
pub fn is_temporary(name: &str) -> bool {
    let segment_named = |stem: &str| parse_segment_file_name(&format!("{stem}.seg")).is_some();
    if let Some(stem) = name.strip_suffix(".seg.prep") {
        return segment_named(stem);
    }
    let Some(base) = name.strip_suffix(TEMP_SUFFIX) else {
        return false;
    };
    base.strip_suffix(".idx")
        .or_else(|| base.strip_suffix(".adx"))
        .or_else(|| base.strip_suffix(".seg"))
        .is_some_and(segment_named)
        || base == SNAPSHOT_FILE
        || base == META_FILE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_temporaries_are_recognised() {
        let seq = SegmentSeq(42);
        assert_eq!(segment_file_name(seq), "00000000000000000042.seg");
        assert_eq!(parse_segment_file_name(&segment_file_name(seq)), Some(seq));
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(parse_segment_file_name(&index_file_name(seq)), None);
        for t in [
            spare_temp_name(seq),
            temp_name(&index_file_name(seq)),
            temp_name(&attrs_file_name(seq)),
            temp_name(&segment_file_name(seq)),
            temp_name(SNAPSHOT_FILE),
            temp_name(META_FILE),
        ] {
            assert!(is_temporary(&t), "{t}");
        }
        // The key's temporary is not removed at open: a key write cut short is resolved by
        // the key rules (docs/FORMAT.md), never by deleting it blindly.
        for keep in [
            segment_file_name(seq),
            temp_name(KEY_FILE),
            temp_name(CHECKPOINTS_FILE),
            "notes.tmp".to_owned(),
            "42.idx.tmp".to_owned(),
        ] {
            assert!(!is_temporary(&keep), "{keep}");
        }
    }
}
