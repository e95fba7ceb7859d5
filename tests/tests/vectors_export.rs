//! spec/vectors/protected-export.json (a whole protected export, spec/format.md §10.3)
//! against the bkimg binary, and the independent decoder spec/vectors/check_crypto.py
//! against every crypto vector and that export.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use bkimg_tests::{bkimg_state, p, TempDir};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors")
}

#[test]
fn the_protected_export_vector_opens_only_with_its_key_and_restores_its_disk() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let v: Value = serde_json::from_str(
        &fs::read_to_string(vectors_dir().join("protected-export.json")).unwrap(),
    )
    .unwrap();
    let export = vectors_dir().join(v["file"].as_str().unwrap());
    let key = d.join("key");
    fs::write(
        &key,
        hex::decode(v["key_file_hex"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let point = v["point_id"].as_str().unwrap();

    let r = bkimg_state(
        &state,
        &[
            "list",
            "--repo",
            p(&export),
            "--key-file",
            p(&key),
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()[0]["id"], point);
    let r = bkimg_state(
        &state,
        &["verify", "--repo", p(&export), "--key-file", p(&key)],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = d.join("disk.img");
    let r = bkimg_state(
        &state,
        &[
            "restore",
            "--repo",
            p(&export),
            point,
            "--target",
            p(&out),
            "--key-file",
            p(&key),
            "-q",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        fs::metadata(&out).unwrap().len(),
        v["disk"]["size"].as_u64().unwrap()
    );
    assert_eq!(
        bkimg_tests::sha256_file(&out),
        v["disk"]["sha256"].as_str().unwrap()
    );

    // No key: exit 2, naming the passphrase; another key file: exit 8.
    let r = bkimg_state(&state, &["list", "--repo", p(&export)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let other = d.join("other-key");
    fs::write(&other, [7u8; 32]).unwrap();
    let r = bkimg_state(
        &state,
        &["list", "--repo", p(&export), "--key-file", p(&other)],
    );
    assert_eq!(r.code, 8, "{}", r.stderr);

    // A changed byte anywhere past the header: nothing verifies.
    let bytes = fs::read(&export).unwrap();
    let changed = d.join("changed.bkimg");
    for at in (64..bytes.len()).step_by(127) {
        let mut b = bytes.clone();
        b[at] ^= 0x40;
        fs::write(&changed, &b).unwrap();
        let r = bkimg_state(
            &state,
            &["verify", "--repo", p(&changed), "--key-file", p(&key)],
        );
        assert_ne!(
            r.code, 0,
            "byte {at} changed, and the export still verifies"
        );
    }
}

/// The Python decoder, written from the spec alone, needs `cryptography` >= 44: the
/// virtualenv .ci/install-moto makes has it (CI passes its moto_server as MOTO_SERVER; its
/// python is beside it).
#[test]
fn the_independent_decoder_passes_every_crypto_vector_and_the_protected_export() {
    let Some(moto) = std::env::var_os("MOTO_SERVER") else {
        eprintln!("skipped: MOTO_SERVER (whose venv has Python's cryptography) is not set");
        return;
    };
    let python = Path::new(&moto).with_file_name("python");
    let out = Command::new(&python)
        .arg(vectors_dir().join("check_crypto.py"))
        .arg(vectors_dir().join("crypto.json"))
        .output()
        .expect("running check_crypto.py");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("crypto.json: all vectors pass"), "{text}");
    assert!(text.contains("restores to its disk"), "{text}");
}
