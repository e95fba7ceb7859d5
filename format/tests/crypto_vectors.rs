//! The reference implementation against spec/vectors/crypto.json (spec/format.md §18):
//! every derived key, chunk id, envelope, MAC and key slot is reproduced byte for byte, and
//! every damaged envelope is refused with the stated error class.

use std::path::Path;

use bkimg_format::crypto::{Aead, Key, ObjectKind, RepoKeys};
use bkimg_format::keys::{self, Encryption, Mode, Secret, Slot};
use bkimg_format::protect::{mac_open, mac_seal, StreamOpener, StreamSealer, SEGMENT_LEN};
use bkimg_format::{Digest, FormatError};
use serde_json::Value;
use std::io::{Read, Write};

fn vectors() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors/crypto.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("valid hex")
}

fn key(v: &Value) -> Key {
    Key::from_bytes(unhex(v).try_into().expect("32 bytes"))
}

fn kind(v: &Value) -> ObjectKind {
    match v.as_str().unwrap() {
        "chunk" => ObjectKind::Chunk,
        "index" => ObjectKind::Index,
        "manifest" => ObjectKind::Manifest,
        "prune-record" => ObjectKind::PruneRecord,
        "config" => ObjectKind::Config,
        other => panic!("kind {other}"),
    }
}

fn repo_keys(v: &Value) -> (Key, RepoKeys) {
    let master = key(&v["master_key"]);
    let keys = RepoKeys::derive(&master, v["repository_id"].as_str().unwrap());
    (master, keys)
}

#[test]
fn derived_keys() {
    let v = vectors();
    let (_, keys) = repo_keys(&v);
    let d = &v["derived"];
    assert_eq!(keys.chunk_id_key(), &key(&d["chunk_id_key"]));
    assert_eq!(keys.data_key(), &key(&d["data_key"]));
    assert_eq!(keys.mac_key(), &key(&d["mac_key"]));
    assert_eq!(
        Encryption::new(Mode::Encrypted, &keys, v["repository_id"].as_str().unwrap()).key_check,
        d["key_check"].as_str().unwrap()
    );
    let enc = Encryption::with_aead(
        Mode::Encrypted,
        &keys,
        v["repository_id"].as_str().unwrap(),
        Aead::Aes256Gcm,
    );
    assert_eq!(
        String::from_utf8(enc.mac_content()).unwrap(),
        d["config_mac_content"].as_str().unwrap()
    );
    assert_eq!(enc.mac, d["config_mac"].as_str().unwrap());
}

#[test]
fn chunk_ids() {
    let v = vectors();
    let (_, keys) = repo_keys(&v);
    for c in v["chunk_ids"].as_array().unwrap() {
        let id = keys.chunk_id(&unhex(&c["plaintext_hex"]));
        assert_eq!(id.to_hex(), c["id"].as_str().unwrap(), "{}", c["name"]);
    }
}

#[test]
fn valid_envelopes_open_and_reseal_to_the_same_bytes() {
    let v = vectors();
    let (_, keys) = repo_keys(&v);
    for e in v["valid"].as_array().unwrap() {
        let (k, name) = (kind(&e["kind"]), e["object_name"].as_str().unwrap());
        let aead = match e["aead"].as_str().unwrap() {
            "aes-256-gcm" => Aead::Aes256Gcm,
            _ => Aead::ChaCha20Poly1305,
        };
        assert_eq!(k.byte() as u64, e["kind_byte"].as_u64().unwrap());
        assert_eq!(keys.object_key(aead, k, name), key(&e["object_key"]));
        let sealed = unhex(&e["sealed_hex"]);
        let plain = unhex(&e["plaintext_hex"]);
        assert_eq!(keys.open(k, name, &sealed).unwrap(), plain, "{}", e["name"]);
        let nonce: [u8; 12] = unhex(&e["nonce_hex"]).try_into().unwrap();
        assert_eq!(keys.seal_with_nonce(aead, k, name, &nonce, &plain), sealed);
    }
}

#[test]
fn invalid_envelopes_are_refused_with_their_class() {
    let v = vectors();
    let (_, keys) = repo_keys(&v);
    for e in v["invalid"].as_array().unwrap() {
        let name = e["object_name"].as_str().unwrap();
        let err = keys
            .open(kind(&e["kind"]), name, &unhex(&e["sealed_hex"]))
            .unwrap_err();
        let class = match err {
            FormatError::Corrupt { .. } => "corrupt",
            FormatError::Unsupported { .. } => "unsupported",
            _ => "other",
        };
        assert_eq!(class, e["error"].as_str().unwrap(), "{}: {err}", e["name"]);
        assert!(err.to_string().contains(name), "{}: {err}", e["name"]);
    }
}

#[test]
fn macs() {
    let v = vectors();
    let (_, keys) = repo_keys(&v);
    for m in v["macs"].as_array().unwrap() {
        let (k, name) = (kind(&m["kind"]), m["object_name"].as_str().unwrap());
        let content = unhex(&m["content_hex"]);
        assert_eq!(
            hex::encode(keys.mac(k, name, &content)),
            m["mac"].as_str().unwrap()
        );
        keys.verify_mac(k, name, &content, &unhex(&m["mac"]))
            .unwrap();
    }
}

fn stream_plain(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn reseal_stream(keys: &RepoKeys, aead: &str, name: &str, plain: &[u8]) -> Vec<u8> {
    let aead = match aead {
        "aes-256-gcm" => Aead::Aes256Gcm,
        _ => Aead::ChaCha20Poly1305,
    };
    let mut s = StreamSealer::new(keys, aead, ObjectKind::Index, name.into(), Vec::new())
        .with_fixed_nonces(|k| [0x30u8.wrapping_add(k as u8); 12]);
    s.write_all(plain).unwrap();
    s.finish().unwrap()
}

#[test]
fn segmented_envelopes_reseal_to_the_same_bytes_and_open() {
    let v = vectors();
    let (_, keys) = repo_keys(&v);
    let keys = std::sync::Arc::new(keys);
    for e in v["streams"].as_array().unwrap() {
        let name = e["object_name"].as_str().unwrap();
        let plain = stream_plain(e["plaintext_len"].as_u64().unwrap() as usize);
        let sealed = reseal_stream(&keys, e["aead"].as_str().unwrap(), name, &plain);
        assert_eq!(sealed.len() as u64, e["sealed_len"].as_u64().unwrap());
        assert_eq!(
            Digest::of_bytes(&sealed).to_hex(),
            e["sealed_sha256"].as_str().unwrap()
        );
        if let Some(hex) = e.get("sealed_hex") {
            assert_eq!(hex::encode(&sealed), hex.as_str().unwrap());
        }
        let mut r = StreamOpener::new(&keys, ObjectKind::Index, name.into(), &sealed[..]).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, plain, "{}", e["name"]);
    }
    for e in v["invalid_streams"].as_array().unwrap() {
        let name = e["object_name"].as_str().unwrap();
        let whole = reseal_stream(
            &keys,
            "chacha20-poly1305",
            name,
            &stream_plain(SEGMENT_LEN + 5),
        );
        let cut = &whole[..e["sealed_len"].as_u64().unwrap() as usize];
        assert_eq!(
            Digest::of_bytes(cut).to_hex(),
            e["sealed_sha256"].as_str().unwrap()
        );
        let opened =
            StreamOpener::new(&keys, ObjectKind::Index, name.into(), cut).and_then(|mut r| {
                let mut out = Vec::new();
                r.read_to_end(&mut out)
                    .map_err(|e| FormatError::corrupt("stream", e.to_string()))
            });
        assert!(
            matches!(opened, Err(FormatError::Corrupt { .. })),
            "{}",
            e["name"]
        );
    }
}

#[test]
fn mac_envelopes() {
    let v = vectors();
    let (_, keys) = repo_keys(&v);
    for m in v["mac_envelopes"].as_array().unwrap() {
        let (k, name) = (kind(&m["kind"]), m["object_name"].as_str().unwrap());
        let content = unhex(&m["content_hex"]);
        let sealed = mac_seal(&keys, k, name, &content);
        assert_eq!(hex::encode(&sealed), m["sealed_hex"].as_str().unwrap());
        assert_eq!(mac_open(&keys, k, name, &sealed).unwrap(), content);
    }
}

#[test]
fn key_slots_unlock_to_the_master_key_and_reencode() {
    let v = vectors();
    let (master, _) = repo_keys(&v);
    for s in v["slots"].as_array().unwrap() {
        let doc = unhex(&s["document_hex"]);
        let slot = Slot::decode(&doc).unwrap();
        assert_eq!(
            slot,
            serde_json::from_value::<Slot>(s["body"].clone()).unwrap()
        );
        assert_eq!(slot.encode(), doc, "{}", s["name"]);
        if let Some(p) = s["passphrase"].as_str() {
            assert_eq!(
                slot.unlock(Secret::Passphrase(p.as_bytes())).unwrap(),
                master
            );
            let wrong = s["wrong_passphrase"].as_str().unwrap();
            assert!(matches!(
                slot.unlock(Secret::Passphrase(wrong.as_bytes())),
                Err(FormatError::Denied(_))
            ));
        } else {
            let file = keys::parse_key_file(&unhex(&s["key_file_hex"])).unwrap();
            assert_eq!(slot.unlock(Secret::KeyFile(&file)).unwrap(), master);
        }
        // Every flipped byte of the document is refused, but for the compat feature bits
        // (16..20), which readers ignore by definition (§6.2).
        for i in (0..doc.len()).filter(|i| !(16..20).contains(i)) {
            let mut bad = doc.clone();
            bad[i] ^= 1;
            assert!(Slot::decode(&bad).is_err(), "{}: byte {i}", s["name"]);
        }
    }
}
