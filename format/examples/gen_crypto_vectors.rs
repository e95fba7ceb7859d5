//! Writes spec/vectors/crypto.json: derived keys, keyed chunk ids, envelopes, MACs and key
//! slots from fixed keys, nonces and salts (spec/format.md §18). Deterministic.
//!
//! `cargo run -p bkimg-format --example gen_crypto_vectors -- spec/vectors`

use bkimg_format::crypto::{Aead, Key, ObjectKind, RepoKeys, ENVELOPE_HEADER_LEN};
use bkimg_format::keys::{Argon2Params, Encryption, Mode, Secret, Slot};
use serde_json::{json, Value};

const REPO_ID: &str = "0b7ef2a4-1c3d-4e5f-8a9b-c0d1e2f3a4b5";

fn kind_name(k: ObjectKind) -> &'static str {
    match k {
        ObjectKind::Chunk => "chunk",
        ObjectKind::Index => "index",
        ObjectKind::Manifest => "manifest",
        ObjectKind::PruneRecord => "prune-record",
        ObjectKind::Config => "config",
    }
}

fn seq(start: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| start.wrapping_add(i as u8)).collect()
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: gen_crypto_vectors DIR");
    let master = Key::from_bytes(seq(0, 32).try_into().unwrap());
    let keys = RepoKeys::derive(&master, REPO_ID);
    let enc = Encryption::new(Mode::Encrypted, &keys);

    let text = b"bkimg test vector: the quick brown fox jumps over the lazy dog.\n".to_vec();
    let chunk_ids: Vec<Value> = [
        ("text", text.clone()),
        ("zeros-4096", vec![0u8; 4096]),
        ("one-byte", vec![1u8]),
    ]
    .into_iter()
    .map(|(name, p)| {
        json!({
            "name": name,
            "plaintext_hex": hex::encode(&p),
            "id": keys.chunk_id(&p).to_hex(),
        })
    })
    .collect();

    let chunk_name = keys.chunk_id(&text).to_hex();
    let nonce: [u8; 12] = seq(0xa0, 12).try_into().unwrap();
    let cases = [
        (
            Aead::Aes256Gcm,
            ObjectKind::Chunk,
            chunk_name.as_str(),
            text.clone(),
        ),
        (
            Aead::ChaCha20Poly1305,
            ObjectKind::Chunk,
            chunk_name.as_str(),
            text.clone(),
        ),
        (
            Aead::Aes256Gcm,
            ObjectKind::Manifest,
            "20260102T030405Z-abcdef",
            b"{}\n".to_vec(),
        ),
        (
            Aead::ChaCha20Poly1305,
            ObjectKind::Index,
            "00ff",
            Vec::new(),
        ),
    ];
    let mut envelopes = Vec::new();
    for (aead, kind, name, plain) in &cases {
        let sealed = keys.seal_with_nonce(*aead, *kind, name, &nonce, plain);
        envelopes.push(json!({
            "name": format!("{}-{}", kind_name(*kind), aead.name()),
            "aead": aead.name(),
            "kind": kind_name(*kind),
            "kind_byte": kind.byte(),
            "object_name": name,
            "nonce_hex": hex::encode(nonce),
            "object_key": hex::encode(keys.object_key(*aead, *kind, name).as_bytes()),
            "plaintext_hex": hex::encode(plain),
            "sealed_hex": hex::encode(&sealed),
        }));
    }

    // Damaged envelopes: each has one fault.
    let good = keys.seal_with_nonce(
        Aead::Aes256Gcm,
        ObjectKind::Chunk,
        &chunk_name,
        &nonce,
        &text,
    );
    let flip = |i: usize| {
        let mut b = good.clone();
        b[i] ^= 1;
        b
    };
    let mut invalid = Vec::new();
    let mut bad = |name: &str,
                   description: &str,
                   kind: ObjectKind,
                   obj: &str,
                   bytes: Vec<u8>,
                   error: &str| {
        invalid.push(json!({
            "name": name,
            "description": description,
            "kind": kind_name(kind),
            "object_name": obj,
            "sealed_hex": hex::encode(bytes),
            "error": error,
        }));
    };
    bad(
        "bad-magic",
        "first magic byte flipped",
        ObjectKind::Chunk,
        &chunk_name,
        flip(0),
        "corrupt",
    );
    let mut unknown = good.clone();
    unknown[8] = 3;
    bad(
        "unknown-aead",
        "algorithm byte 3",
        ObjectKind::Chunk,
        &chunk_name,
        unknown,
        "unsupported",
    );
    bad(
        "reserved-byte",
        "reserved byte 10 is not zero",
        ObjectKind::Chunk,
        &chunk_name,
        flip(10),
        "corrupt",
    );
    bad(
        "nonce-flipped",
        "a nonce bit flipped",
        ObjectKind::Chunk,
        &chunk_name,
        flip(12),
        "corrupt",
    );
    bad(
        "ciphertext-flipped",
        "first ciphertext byte flipped",
        ObjectKind::Chunk,
        &chunk_name,
        flip(ENVELOPE_HEADER_LEN),
        "corrupt",
    );
    bad(
        "tag-flipped",
        "last tag byte flipped",
        ObjectKind::Chunk,
        &chunk_name,
        flip(good.len() - 1),
        "corrupt",
    );
    bad(
        "truncated",
        "the last byte cut off",
        ObjectKind::Chunk,
        &chunk_name,
        good[..good.len() - 1].to_vec(),
        "corrupt",
    );
    bad(
        "short",
        "shorter than the 40-byte envelope",
        ObjectKind::Chunk,
        &chunk_name,
        good[..39].to_vec(),
        "corrupt",
    );
    let other_name = "00".repeat(31) + "01";
    bad(
        "other-name",
        "a valid envelope opened under another chunk id",
        ObjectKind::Chunk,
        &other_name,
        good.clone(),
        "corrupt",
    );
    bad(
        "other-kind",
        "a chunk's envelope opened as an index of the same name",
        ObjectKind::Index,
        &chunk_name,
        good.clone(),
        "corrupt",
    );
    let mut relabelled = good.clone();
    relabelled[9] = ObjectKind::Index.byte();
    bad(
        "kind-byte-rewritten",
        "the kind byte rewritten to index and opened as an index: the AEAD refuses",
        ObjectKind::Index,
        &chunk_name,
        relabelled,
        "corrupt",
    );

    let macs: Vec<Value> = [
        (
            ObjectKind::Manifest,
            "20260102T030405Z-abcdef",
            b"{}\n".to_vec(),
        ),
        (ObjectKind::Index, "00ff", text.clone()),
    ]
    .into_iter()
    .map(|(k, n, c)| {
        json!({
            "kind": kind_name(k),
            "object_name": n,
            "content_hex": hex::encode(&c),
            "mac": hex::encode(keys.mac(k, n, &c)),
        })
    })
    .collect();

    let small = Argon2Params {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    let salt: [u8; 32] = seq(0x40, 32).try_into().unwrap();
    let slot_nonce: [u8; 12] = seq(0x70, 12).try_into().unwrap();
    let pass_slot = Slot::create_with(
        &master,
        REPO_ID,
        "0123456789abcdef",
        "2026-01-02T03:04:05Z",
        Secret::Passphrase(b"correct horse battery staple"),
        small,
        &salt,
        &slot_nonce,
    )
    .unwrap();
    let key_file = Key::from_bytes(seq(0xc0, 32).try_into().unwrap());
    let file_slot = Slot::create_with(
        &master,
        REPO_ID,
        "fedcba9876543210",
        "2026-01-02T03:04:05Z",
        Secret::KeyFile(&key_file),
        small,
        &salt,
        &slot_nonce,
    )
    .unwrap();
    let slots = json!([
        {
            "name": "passphrase",
            "passphrase": "correct horse battery staple",
            "wrong_passphrase": "correct horse battery stapler",
            "document_hex": hex::encode(pass_slot.encode()),
            "body": pass_slot,
        },
        {
            "name": "key-file",
            "key_file_hex": hex::encode(key_file.as_bytes()),
            "document_hex": hex::encode(file_slot.encode()),
            "body": file_slot,
        }
    ]);

    let doc = json!({
        "vectors": "encryption and authentication: derived keys, keyed chunk ids, AEAD envelopes, MACs, key slots",
        "format": "bkimg v1 (spec/format.md §18)",
        "generated_by": "bkimg-format 0.1.0 format/examples/gen_crypto_vectors.rs",
        "notes": "All keys, nonces and salts are fixed here; a writer MUST use fresh random ones. Byte i of a `seq` value is (start + i) mod 256.",
        "master_key": hex::encode(master.as_bytes()),
        "repository_id": REPO_ID,
        "derived": {
            "chunk_id_key": hex::encode(keys.chunk_id_key().as_bytes()),
            "data_key": hex::encode(keys.data_key().as_bytes()),
            "mac_key": hex::encode(keys.mac_key().as_bytes()),
            "key_check": enc.key_check,
        },
        "chunk_ids": chunk_ids,
        "valid": envelopes,
        "invalid": invalid,
        "macs": macs,
        "slots": slots,
    });
    let path = std::path::Path::new(&dir).join("crypto.json");
    let mut text = serde_json::to_string_pretty(&doc).unwrap();
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    eprintln!("wrote {}", path.display());
}
