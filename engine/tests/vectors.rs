//! Test vectors for verifiers in other languages: docs/vectors/merkle-checkpoint-v1.json.
//!
//! The file holds known record hashes with their leaf hashes, the root of every tree size,
//! inclusion and consistency proofs, and a signed checkpoint made with a fixed key. This
//! test checks the code against the file; run it with `TALLY_WRITE_VECTORS=1` to write the
//! file after a deliberate format change (and say so in docs/FORMAT.md's version history).

#![allow(clippy::unwrap_used)]

use std::fmt::Write;

use ed25519_dalek::SigningKey;
use tally_engine::Timestamp;
use tally_engine::format::chain::{leaf_hash, merkle_root};
use tally_engine::format::checkpoint::{SignedCheckpoint, Statement};
use tally_engine::format::proof::{LeavesSource, hex, prove_consistency, prove_inclusion};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/vectors/merkle-checkpoint-v1.txt"
);

/// The vectors, rendered as lines of `name value` text (no JSON dependency in the engine).
fn render() -> String {
    let leaves: Vec<[u8; 32]> = (0..7)
        .map(|i| *blake3::hash(format!("tally test vector record {i}").as_bytes()).as_bytes())
        .collect();
    let mut out = String::new();
    writeln!(
        out,
        "# Tally Merkle and checkpoint test vectors, format v1."
    )
    .unwrap();
    writeln!(
        out,
        "# record_hash[i] = BLAKE3(\"tally test vector record <i>\")"
    )
    .unwrap();
    writeln!(
        out,
        "# All hashes are lower-case hex; proofs list hashes leaf to root, comma-separated."
    )
    .unwrap();
    for (i, l) in leaves.iter().enumerate() {
        writeln!(out, "record_hash {i} {}", hex(l)).unwrap();
        writeln!(out, "leaf_hash {i} {}", hex(&leaf_hash(l))).unwrap();
    }
    for n in 0..=leaves.len() {
        writeln!(out, "root {n} {}", hex(&merkle_root(&leaves[..n]))).unwrap();
    }
    let mut src = LeavesSource(&leaves);
    for (i, n) in [(0u64, 1u64), (0, 7), (3, 7), (6, 7), (4, 5), (2, 4)] {
        let p = prove_inclusion(&mut src, i, n).unwrap().unwrap();
        let path: Vec<String> = p.path.iter().map(|h| hex(h)).collect();
        writeln!(out, "inclusion {i} {n} {}", path.join(",")).unwrap();
    }
    for (m, n) in [(1u64, 7u64), (3, 7), (4, 7), (6, 7), (2, 5), (7, 7)] {
        let p = prove_consistency(&mut src, m, n).unwrap().unwrap();
        let path: Vec<String> = p.path.iter().map(|h| hex(h)).collect();
        writeln!(out, "consistency {m} {n} {}", path.join(",")).unwrap();
    }
    let key = SigningKey::from_bytes(&[0x11; 32]);
    let statement = Statement {
        log_id: *b"tally-vector-log",
        id: 1,
        tree_size: 7,
        time: Timestamp(1_795_000_000_000_000_000),
        root: merkle_root(&leaves),
        chain_head: leaves[6],
        streams: None,
    };
    let cp = SignedCheckpoint::sign(statement, &key);
    writeln!(out, "signing_key_seed {}", hex(&[0x11; 32])).unwrap();
    writeln!(out, "public_key {}", hex(&cp.public_key)).unwrap();
    writeln!(out, "statement {}", hex(&statement.encode())).unwrap();
    writeln!(out, "signature {}", hex(&cp.signature)).unwrap();
    writeln!(out, "checkpoint_entry {}", hex(&cp.encode_entry())).unwrap();
    out
}

#[test]
fn the_code_reproduces_the_published_vectors() {
    let now = render();
    if std::env::var_os("TALLY_WRITE_VECTORS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(PATH).parent().unwrap()).unwrap();
        std::fs::write(PATH, &now).unwrap();
    }
    let published = std::fs::read_to_string(PATH).unwrap();
    for (a, b) in published.lines().zip(now.lines()) {
        assert_eq!(a, b, "a vector changed");
    }
    assert_eq!(published.lines().count(), now.lines().count());
    // And the published checkpoint verifies as published.
    let entry = published
        .lines()
        .find_map(|l| l.strip_prefix("checkpoint_entry "))
        .unwrap();
    let bytes: Vec<u8> = (0..entry.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&entry[i..i + 2], 16).unwrap())
        .collect();
    let cp = SignedCheckpoint::decode_entry(&bytes).unwrap();
    cp.verify(&[cp.public_key]).unwrap();
}

const NOTE_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/vectors/checkpoint-note-v1.txt"
);

/// The checkpoint of the vectors above as a signed note (FORMAT.md 17.9), cosigned by a
/// witness with a fixed key and time, followed by the witness's vkey line.
fn render_note() -> String {
    use tally_engine::format::note::{Cosignature, checkpoint_body, checkpoint_note};
    let leaves: Vec<[u8; 32]> = (0..7)
        .map(|i| *blake3::hash(format!("tally test vector record {i}").as_bytes()).as_bytes())
        .collect();
    let statement = Statement {
        log_id: *b"tally-vector-log",
        id: 1,
        tree_size: 7,
        time: Timestamp(1_795_000_000_000_000_000),
        root: merkle_root(&leaves),
        chain_head: leaves[6],
        streams: None,
    };
    let cp = SignedCheckpoint::sign(statement, &SigningKey::from_bytes(&[0x11; 32]));
    let witness = SigningKey::from_bytes(&[0x22; 32]);
    let cosig = Cosignature::sign(
        &witness,
        "witness.example/vector",
        1_795_000_100,
        &checkpoint_body(&statement),
    );
    let mut out = checkpoint_note(&cp, std::slice::from_ref(&cosig)).encode();
    out.push_str("\n# witness vkey (seed 22...22):\n");
    out.push_str(&cosig.witness().encode());
    out.push('\n');
    out
}

#[test]
fn the_code_reproduces_the_published_checkpoint_note() {
    use tally_engine::format::note::{Cosignature, Note, WitnessKey, checkpoint_from_note};
    let now = render_note();
    if std::env::var_os("TALLY_WRITE_VECTORS").is_some() {
        std::fs::write(NOTE_PATH, &now).unwrap();
    }
    let published = std::fs::read_to_string(NOTE_PATH).unwrap();
    assert_eq!(published, now, "the published note changed");
    let (note_text, rest) = published.split_once("\n#").unwrap();
    let note = Note::parse(note_text).unwrap();
    let log_key = SigningKey::from_bytes(&[0x11; 32])
        .verifying_key()
        .to_bytes();
    let cp = checkpoint_from_note(&note, &[log_key]).unwrap();
    assert_eq!(cp.statement.tree_size, 7);
    let vkey = WitnessKey::parse(rest.lines().nth(1).unwrap()).unwrap();
    let cosigs = Cosignature::in_note(&note, &[vkey]);
    assert_eq!(cosigs.len(), 1);
    cosigs[0].verify(&note.body).unwrap();
}
