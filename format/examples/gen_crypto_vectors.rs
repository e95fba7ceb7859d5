//! Writes spec/vectors/crypto.json: derived keys, keyed chunk ids, envelopes, segmented
//! envelopes, MACs, MAC envelopes and key slots from fixed keys, nonces and salts (spec/format.md §18). Deterministic.
//!
//! `cargo run -p bkimg-format --example gen_crypto_vectors -- spec/vectors`

use bkimg_format::crypto::{Aead, Key, ObjectKind, RepoKeys, ENVELOPE_HEADER_LEN};
use bkimg_format::keys::{Argon2Params, Encryption, Mode, Secret, Slot};
use bkimg_format::protect::{mac_seal, StreamSealer, SEGMENT_LEN, STREAM_HEADER_LEN};
use bkimg_format::Digest;
use serde_json::{json, Value};
use std::io::Write;

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
    let enc = Encryption::with_aead(Mode::Encrypted, &keys, REPO_ID, Aead::Aes256Gcm);

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

    // Segmented envelopes (volume indexes, §18.4.1). Plaintext byte i is i mod 251;
    // segment k's nonce is 12 bytes of (0x30 + k). Large ones are given by length and the
    // SHA-256 of the sealed bytes.
    let stream_plain = |n: usize| -> Vec<u8> { (0..n).map(|i| (i % 251) as u8).collect() };
    let stream_nonce = |k: u64| [0x30u8.wrapping_add(k as u8); 12];
    let seal_stream = |aead: Aead, name: &str, plain: &[u8]| -> Vec<u8> {
        let mut s = StreamSealer::new(&keys, aead, ObjectKind::Index, name.into(), Vec::new())
            .with_fixed_nonces(stream_nonce);
        s.write_all(plain).unwrap();
        s.finish().unwrap()
    };
    let index_name = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let mut streams = Vec::new();
    for (aead, len) in [
        (Aead::Aes256Gcm, 0usize),
        (Aead::ChaCha20Poly1305, 300),
        (Aead::Aes256Gcm, SEGMENT_LEN),
        (Aead::ChaCha20Poly1305, SEGMENT_LEN + 5),
    ] {
        let plain = stream_plain(len);
        let sealed = seal_stream(aead, index_name, &plain);
        let mut v = json!({
            "name": format!("index-{}-{len}", aead.name()),
            "aead": aead.name(),
            "kind": "index",
            "object_name": index_name,
            "plaintext_len": len,
            "segments": len.div_ceil(SEGMENT_LEN).max(1),
            "sealed_len": sealed.len(),
            "sealed_sha256": Digest::of_bytes(&sealed).to_hex(),
        });
        if sealed.len() <= 1024 {
            v["sealed_hex"] = hex::encode(&sealed).into();
        }
        streams.push(v);
    }
    // Invalid: the two-segment stream cut after its first segment (sealed as not last).
    let two = seal_stream(
        Aead::ChaCha20Poly1305,
        index_name,
        &stream_plain(SEGMENT_LEN + 5),
    );
    let cut = &two[..STREAM_HEADER_LEN + 12 + SEGMENT_LEN + 16];
    let invalid_streams = json!([{
        "name": "cut-at-a-segment-boundary",
        "description": "the two-segment ChaCha20-Poly1305 stream above without its last segment",
        "object_name": index_name,
        "sealed_len": cut.len(),
        "sealed_sha256": Digest::of_bytes(cut).to_hex(),
        "error": "corrupt",
    }]);

    // MAC envelopes (signed mode, §18.7).
    let mac_envelopes: Vec<Value> = [
        (
            ObjectKind::Manifest,
            "20260102T030405Z-abcdef",
            b"{}\n".to_vec(),
        ),
        (
            ObjectKind::PruneRecord,
            "20260102T030405Z-abcdef",
            b"[]\n".to_vec(),
        ),
    ]
    .into_iter()
    .map(|(kind, name, content)| {
        json!({
            "kind": kind_name(kind),
            "object_name": name,
            "content_hex": hex::encode(&content),
            "sealed_hex": hex::encode(mac_seal(&keys, kind, name, &content)),
        })
    })
    .collect();

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
            "config_mac_content": String::from_utf8(enc.mac_content()).unwrap(),
            "config_mac": enc.mac,
        },
        "chunk_ids": chunk_ids,
        "valid": envelopes,
        "invalid": invalid,
        "macs": macs,
        "streams": streams,
        "invalid_streams": invalid_streams,
        "mac_envelopes": mac_envelopes,
        "slots": slots,
    });
    let path = std::path::Path::new(&dir).join("crypto.json");
    let mut text = serde_json::to_string_pretty(&doc).unwrap();
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    eprintln!("wrote {}", path.display());
}
