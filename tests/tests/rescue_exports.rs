//! How the recovery system picks, of several exports on its media, the one for the machine
//! it booted on (`bkimg_rescue::init::export_of_host`), with protected exports among them:
//! their host names are sealed, so they are read through the rescue's key file. Real
//! exports made by the bkimg binary; no VM (the whole rescue is rescue.rs).

use std::fs;
use std::path::{Path, PathBuf};

use bkimg_rescue::init::export_of_host;
use bkimg_tests::{bkimg_ok, bkimg_path, noise, p, require_root, sh, TempDir, MIB};

/// Captures `disk` into `repo` as host `host` (a UTS namespace with that host name) and
/// exports the point to `out`; `pw` unlocks a protected repository.
fn export_as(host: &str, repo: &Path, disk: &Path, pw: Option<&Path>, out: &Path) {
    let key = pw
        .map(|pw| format!("--password-file {}", p(pw)))
        .unwrap_or_default();
    sh(
        "unshare",
        &[
            "--uts",
            "sh",
            "-c",
            &format!(
                "hostname {host} && {} capture --repo {} {key} -q {}",
                p(&bkimg_path()),
                p(repo),
                p(disk)
            ),
        ],
    );
    let mut a = vec!["export", "--repo", p(repo), "-o", p(out), "-q"];
    if let Some(pw) = pw {
        a.extend(["--password-file", p(pw)]);
    }
    bkimg_ok(&a);
}

#[test]
fn the_export_of_this_host_is_found_among_protected_ones_with_the_key_file() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let disk = d.join("disk.img");
    fs::write(&disk, noise(2 * MIB as usize, 5)).unwrap();
    let (pw, key) = (d.join("pw"), d.join("repo.key"));
    fs::write(&pw, "fleet passphrase\n").unwrap();
    let enc = d.join("enc");
    bkimg_ok(&[
        "key",
        "init",
        "--repo",
        p(&enc),
        "--password-file",
        p(&pw),
        "--key-file-out",
        p(&key),
        "--kdf-memory-mib",
        "1",
        "--kdf-iterations",
        "1",
    ]);
    let exports: Vec<PathBuf> = ["db1.bkimg", "web2.bkimg"]
        .iter()
        .map(|n| d.join(n))
        .collect();
    export_as("db1", &d.join("plain"), &disk, None, &exports[0]);
    export_as("web2", &enc, &disk, Some(&pw), &exports[1]);
    let key_bytes = fs::read(&key).unwrap();

    // With the key file: web2's sealed export is read and chosen; db1's plain one too.
    assert_eq!(
        export_of_host(&exports, "web2", Some(&key_bytes)).unwrap(),
        exports[1]
    );
    assert_eq!(
        export_of_host(&exports, "db1", Some(&key_bytes)).unwrap(),
        exports[0]
    );
    // Without it (or with a key of nothing here), web2 is not found, and the message
    // names the export that could not be read and what to do.
    let other = fs::read(&key)
        .unwrap()
        .iter()
        .map(|b| b ^ 1)
        .collect::<Vec<u8>>();
    for k in [None, Some(other.as_slice())] {
        let e = format!("{:#}", export_of_host(&exports, "web2", k).unwrap_err());
        assert!(e.contains("they hold: db1"), "{e}");
        assert!(
            e.contains("cannot be read without their key: web2.bkimg"),
            "{e}"
        );
    }
    assert_eq!(export_of_host(&exports, "db1", None).unwrap(), exports[0]);
}
