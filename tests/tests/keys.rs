//! `bkimg key` as a user types it (spec/format.md §18, docs/cli.md): init, list, add a key
//! file slot, unlock by either secret, passwd, the last slot kept, a wrong passphrase or key
//! file refused with exit code 8, a repository with restore points refused, and the key
//! asked for by the commands that read an encrypted repository (tests/encrypted.rs goes
//! on from there).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bkimg_tests::{bkimg_path, noise_image, p, Run, TempDir, MIB};
use serde_json::Value;

/// Cheap Argon2id for tests (the default costs 256 MiB and half a second per slot).
const KDF: [&str; 4] = ["--kdf-memory-mib", "1", "--kdf-iterations", "1"];

struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = TempDir::new().unwrap();
        fs::write(dir.path().join("empty.toml"), "").unwrap();
        Env { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn secret(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, format!("{text}\n")).unwrap();
        path
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(bkimg_path());
        cmd.args(args)
            .env_remove("BKIMG_REPOSITORY")
            .env_remove("BKIMG_PASSWORD_FILE")
            .env_remove("BKIMG_NEW_PASSWORD_FILE")
            .env_remove("BKIMG_KEY_FILE")
            .env("BKIMG_CONFIG", self.path("empty.toml"))
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("spawning bkimg");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn ok(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let r = self.run(args, env);
        assert_eq!(r.code, 0, "bkimg {args:?}:\n{}\n{}", r.stdout, r.stderr);
        r
    }

    fn fails(&self, args: &[&str], env: &[(&str, &str)], code: i32, text: &str) -> Run {
        let r = self.run(args, env);
        assert_eq!(r.code, code, "bkimg {args:?}:\n{}\n{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(text), "bkimg {args:?}: {}", r.stderr);
        r
    }

    /// An encrypted repository with one passphrase slot and one key-file slot.
    fn init(&self) -> (PathBuf, PathBuf, PathBuf) {
        let repo = self.path("repo");
        let pw = self.secret("pw", "first passphrase");
        let kf = self.path("repo.key");
        let mut args = vec![
            "key",
            "init",
            "--repo",
            p(&repo),
            "--password-file",
            p(&pw),
            "--key-file-out",
            p(&kf),
            "--json",
        ];
        args.extend(KDF);
        let v = self.ok(&args, &[]).json();
        assert_eq!(v["mode"], "encrypted");
        assert_eq!(v["slots"].as_array().unwrap().len(), 2);
        (repo, pw, kf)
    }
}

fn slots(env: &Env, repo: &Path) -> Vec<Value> {
    let v = env
        .ok(&["key", "list", "--repo", p(repo), "--json"], &[])
        .json();
    v["slots"].as_array().unwrap().clone()
}

fn slot_of(slots: &[Value], kind: &str) -> String {
    slots
        .iter()
        .find(|s| s["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} slot in {slots:?}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn init_list_add_unlock_by_either_and_remove() {
    let env = Env::new();
    let (repo, pw, kf) = env.init();
    assert_eq!(fs::metadata(&kf).unwrap().len(), 32);
    let listed = slots(&env, &repo);
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0]["kdf"]["memory_kib"]
            .as_u64()
            .or(listed[1]["kdf"]["memory_kib"].as_u64()),
        Some(1024)
    );
    let text = env.ok(&["key", "list", "--repo", p(&repo)], &[]).stdout;
    assert!(
        text.contains("passphrase") && text.contains("key-file"),
        "{text}"
    );

    let first = slot_of(&listed, "passphrase");
    // A second passphrase, unlocked by the key file; then a key file unlocked by it
    // (through BKIMG_PASSWORD_FILE).
    let pw2 = env.secret("pw2", "second passphrase");
    let mut add = vec!["key", "add", "--repo", p(&repo), "--key-file", p(&kf)];
    add.extend(["--new-password-file", p(&pw2)]);
    add.extend(KDF);
    env.ok(&add, &[]);
    let kf2 = env.path("second.key");
    let mut add = vec!["key", "add", "--repo", p(&repo), "--key-file-out", p(&kf2)];
    add.extend(KDF);
    env.ok(&add, &[("BKIMG_PASSWORD_FILE", p(&pw2))]);
    assert_eq!(slots(&env, &repo).len(), 4);

    // Remove the first passphrase's slot; the first passphrase then unlocks nothing.
    env.ok(
        &[
            "key",
            "remove",
            "--repo",
            p(&repo),
            "--slot",
            &first,
            "--key-file",
            p(&kf2),
        ],
        &[],
    );
    assert_eq!(slots(&env, &repo).len(), 3);
    let mut add = vec!["key", "add", "--repo", p(&repo), "--password-file", p(&pw)];
    add.extend(["--new-password-file", p(&pw2)]);
    env.fails(&add, &[], 8, "unlocks none of the 1 key slots");
}

#[test]
fn passwd_changes_the_passphrase() {
    let env = Env::new();
    let (repo, pw, kf) = env.init();
    let new = env.secret("new", "changed passphrase");
    let mut passwd = vec![
        "key",
        "passwd",
        "--repo",
        p(&repo),
        "--password-file",
        p(&pw),
    ];
    passwd.extend(["--new-password-file", p(&new)]);
    passwd.extend(KDF);
    env.ok(&passwd, &[]);
    assert_eq!(slots(&env, &repo).len(), 2, "rewritten in place");
    // The old passphrase no longer unlocks; the new one does.
    let kf2 = env.path("k2");
    let mut add = vec!["key", "add", "--repo", p(&repo), "--password-file", p(&pw)];
    add.extend(["--key-file-out", p(&kf2)]);
    env.fails(&add, &[], 8, "passphrase unlocks none");
    let mut add = vec!["key", "add", "--repo", p(&repo), "--password-file", p(&new)];
    add.extend(["--key-file-out", p(&kf2)]);
    env.ok(&add, &[]);
    drop(kf);
}

#[test]
fn wrong_secrets_are_refused_with_exit_code_8() {
    let env = Env::new();
    let (repo, _, _) = env.init();
    let wrong = env.secret("wrong", "not the passphrase");
    let kf2 = env.path("k2");
    let add = [
        "key",
        "add",
        "--repo",
        p(&repo),
        "--password-file",
        p(&wrong),
        "--key-file-out",
        p(&kf2),
    ];
    env.fails(
        &add,
        &[],
        8,
        "the passphrase unlocks none of the 1 key slots",
    );
    assert!(
        !kf2.exists(),
        "no key file is written before the key is unlocked"
    );
    // A key file of another repository.
    let other = Env::new();
    let (_, _, other_kf) = other.init();
    let (k3, k4, k5) = (env.path("k3"), env.path("k4"), env.path("k5"));
    let add = [
        "key",
        "add",
        "--repo",
        p(&repo),
        "--key-file",
        p(&other_kf),
        "--key-file-out",
        p(&k3),
    ];
    env.fails(&add, &[], 8, "the key file unlocks none");
    // Not a key file at all.
    let junk = env.secret("junk", "short");
    let add = [
        "key",
        "add",
        "--repo",
        p(&repo),
        "--key-file",
        p(&junk),
        "--key-file-out",
        p(&k4),
    ];
    env.fails(&add, &[], 8, "not a bkimg key file");
    // No terminal and no password file: a usage error that says what to give.
    let add = ["key", "add", "--repo", p(&repo), "--key-file-out", p(&k5)];
    let r = env.run(&add, &[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--password-file"), "{}", r.stderr);
}

#[test]
fn the_last_slot_is_kept() {
    let env = Env::new();
    let repo = env.path("repo");
    let kf = env.path("only.key");
    env.ok(
        &[
            "key",
            "init",
            "--repo",
            p(&repo),
            "--no-passphrase",
            "--key-file-out",
            p(&kf),
        ],
        &[],
    );
    let only = slot_of(&slots(&env, &repo), "key-file");
    env.fails(
        &[
            "key",
            "remove",
            "--repo",
            p(&repo),
            "--slot",
            &only,
            "--key-file",
            p(&kf),
        ],
        &[],
        5,
        "is the last key",
    );
    env.fails(
        &[
            "key",
            "remove",
            "--repo",
            p(&repo),
            "--slot",
            "0000000000000000",
            "--key-file",
            p(&kf),
        ],
        &[],
        4,
        "key slot \"0000000000000000\" is missing",
    );
}

#[test]
fn a_tampered_slot_does_not_unlock() {
    let env = Env::new();
    let (repo, pw, _) = env.init();
    let id = slot_of(&slots(&env, &repo), "passphrase");
    let path = repo.join("keys").join(&id);
    let k = env.path("k");
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 1;
    fs::write(&path, bytes).unwrap();
    let add = [
        "key",
        "add",
        "--repo",
        p(&repo),
        "--password-file",
        p(&pw),
        "--key-file-out",
        p(&k),
    ];
    env.fails(&add, &[], 3, "damaged");
}

#[test]
fn the_other_commands_ask_for_the_key_of_an_encrypted_repository() {
    let env = Env::new();
    let (repo, _, _) = env.init();
    for args in [
        vec!["list", "--repo", p(&repo)],
        vec!["verify", "--repo", p(&repo)],
        vec!["info", "--repo", p(&repo), "latest"],
    ] {
        env.fails(&args, &[], 2, "no terminal to ask for the passphrase");
    }
    let img = env.path("disk.img");
    noise_image(&img, MIB, 1);
    env.fails(
        &["capture", "--repo", p(&repo), p(&img)],
        &[],
        2,
        "--password-file",
    );
    assert!(fs::read_dir(repo.join("points")).unwrap().next().is_none());
    // init twice: refused, nothing changed.
    let pw = env.secret("pw3", "x");
    let config = fs::read(repo.join("config")).unwrap();
    env.fails(
        &["key", "init", "--repo", p(&repo), "--password-file", p(&pw)],
        &[],
        5,
        "already encrypted",
    );
    assert_eq!(fs::read(repo.join("config")).unwrap(), config);
}

#[test]
fn init_refuses_a_repository_with_restore_points_and_an_unencrypted_one_stays_readable() {
    let env = Env::new();
    let repo = env.path("repo");
    let img = env.path("disk.img");
    noise_image(&img, MIB, 2);
    env.ok(&["capture", "--repo", p(&repo), p(&img)], &[]);
    let config = fs::read(repo.join("config")).unwrap();
    let pw = env.secret("pw", "x");
    let mut init = vec!["key", "init", "--repo", p(&repo), "--password-file", p(&pw)];
    init.extend(KDF);
    env.fails(&init, &[], 5, "already holds restore points");
    assert_eq!(
        fs::read(repo.join("config")).unwrap(),
        config,
        "config untouched"
    );
    assert!(!repo.join("keys").exists());
    env.ok(&["list", "--repo", p(&repo)], &[]);
    env.fails(
        &["key", "list", "--repo", p(&repo)],
        &[],
        5,
        "is not encrypted",
    );
}

/// A `key init` killed after writing its slots and before the config leaves an empty,
/// unencrypted repository with stray slots: the next `key init` starts clean.
#[test]
fn init_after_an_interrupted_init_drops_its_stray_slots() {
    let env = Env::new();
    let (other, _, _) = env.init();
    let stray = fs::read_dir(other.join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let repo = env.path("second");
    drop(
        bkimg_format::store::LocalDir::open_or_create(&repo, "second", "2026-01-01T00:00:00Z")
            .unwrap(),
    );
    fs::create_dir(repo.join("keys")).unwrap();
    fs::copy(stray.path(), repo.join("keys").join(stray.file_name())).unwrap();
    let pw = env.secret("pw-second", "second repository");
    let mut init = vec!["key", "init", "--repo", p(&repo), "--password-file", p(&pw)];
    init.extend(KDF);
    env.ok(&init, &[]);
    let listed = slots(&env, &repo);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_ne!(listed[0]["id"].as_str(), stray.file_name().to_str());
    let k = env.path("k");
    let mut add = vec!["key", "add", "--repo", p(&repo), "--password-file", p(&pw)];
    add.extend(["--key-file-out", p(&k)]);
    env.ok(&add, &[]);
}
