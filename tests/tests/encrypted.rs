//! Encrypted and signed local repositories end to end (spec/format.md §18, issue 13):
//! capture, incremental, list, info, verify, restore and prune through the key; nothing of
//! the disk readable in the repository; chunk names that do not reveal content; every
//! tampering (a flipped byte, swapped chunks, a replayed or forged manifest) refused with
//! the object named; wrong, missing and misplaced keys refused with their exit codes; a
//! rollback (newer restore points removed) and a downgrade (the protection removed from
//! the config) refused by a client that has seen the repository before.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bkimg_tests::{bkimg_path, noise, p, sha256_file, Run, TempDir, MIB};
use serde_json::Value;

/// Cheap Argon2id for tests (the default costs 256 MiB and half a second per unlock).
const KDF: [&str; 4] = ["--kdf-memory-mib", "1", "--kdf-iterations", "1"];

/// Text that stands for a secret on the disk (a password hash in /etc/shadow).
const MARKER: &[u8] = b"root:$y$j9T$SECRET-PASSWORD-HASH-bkimg-test:19700:0:99999:7:::\n";

struct Env {
    dir: TempDir,
    repo: PathBuf,
    pw: PathBuf,
    key_file: PathBuf,
}

impl Env {
    /// A repository made `mode` (encrypted or signed) with a passphrase and a key file.
    fn new(mode: &str) -> Env {
        let dir = TempDir::new().unwrap();
        fs::write(dir.path().join("empty.toml"), "").unwrap();
        let repo = dir.path().join("repo");
        let pw = dir.path().join("pw");
        fs::write(&pw, "correct horse\n").unwrap();
        let key_file = dir.path().join("repo.key");
        let env = Env {
            dir,
            repo,
            pw,
            key_file,
        };
        let mut args = vec![
            "key",
            "init",
            "--repo",
            p(&env.repo),
            "--mode",
            mode,
            "--password-file",
            p(&env.pw),
            "--key-file-out",
            p(&env.key_file),
        ];
        args.extend(KDF);
        env.ok(&args);
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(bkimg_path());
        cmd.args(args)
            .env_remove("BKIMG_REPOSITORY")
            .env_remove("BKIMG_PASSWORD_FILE")
            .env_remove("BKIMG_KEY_FILE")
            .env("BKIMG_CONFIG", self.path("empty.toml"))
            .env("BKIMG_STATE_DIR", self.path("state"))
            .stdin(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("spawning bkimg");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 0, "bkimg {args:?}:\n{}\n{}", r.stdout, r.stderr);
        r
    }

    fn fails(&self, args: &[&str], code: i32, text: &str) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, code, "bkimg {args:?}:\n{}\n{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(text),
            "bkimg {args:?}: wanted {text:?} in:\n{}",
            r.stderr
        );
        r
    }

    /// `bkimg CMD --repo REPO --password-file PW ARGS...`
    fn with_pw<'a>(&'a self, cmd: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec![cmd, "--repo", p(&self.repo), "--password-file", p(&self.pw)];
        all.extend_from_slice(args);
        all
    }

    fn capture(&self, img: &Path, parent: Option<&str>) -> Value {
        let mut args = self.with_pw("capture", &["--json", "--quiet", p(img)]);
        if let Some(parent) = parent {
            args.extend(["--parent", parent]);
        }
        self.ok(&args).json()
    }

    fn restore(&self, id: &str, target: &Path) {
        self.ok(&self.with_pw("restore", &[id, "--target", p(target), "--quiet"]));
    }

    /// Every stored file of the repository (chunks, indexes, points, pruned).
    fn stored_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.repo.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.push(path);
                }
            }
        }
        out
    }

    fn chunk_files(&self) -> Vec<PathBuf> {
        self.stored_files()
            .into_iter()
            .filter(|f| f.starts_with(self.repo.join("chunks")))
            .collect()
    }
}

/// A 3 MiB disk image: noise, the marker repeated over a whole chunk, and zeros.
fn disk_image(path: &Path, seed: u64) {
    let mut data = noise(MIB as usize, seed);
    let mut text = Vec::new();
    while text.len() < 256 << 10 {
        text.extend_from_slice(MARKER);
    }
    text.truncate(256 << 10);
    data.extend_from_slice(&text);
    data.resize(3 * MIB as usize, 0);
    fs::write(path, data).unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_encrypted_repository_captures_restores_verifies_and_prunes_through_its_key() {
    let env = Env::new("encrypted");
    let img = env.path("disk.img");
    disk_image(&img, 1);
    let first = env.capture(&img, None);
    let first_id = first["id"].as_str().unwrap().to_string();
    let first_sum = sha256_file(&img);

    // Nothing of the disk is readable in the repository, and no chunk is named by the
    // SHA-256 of its content.
    for f in env.stored_files() {
        let bytes = fs::read(&f).unwrap();
        assert!(
            !contains(&bytes, b"SECRET-PASSWORD-HASH"),
            "{} holds plaintext",
            f.display()
        );
    }
    let disk = fs::read(&img).unwrap();
    let names: Vec<String> = env
        .chunk_files()
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(!names.is_empty());
    for c in disk.chunks(256 << 10) {
        let sha = bkimg_format::Digest::of_bytes(c).to_hex();
        assert!(!names.contains(&sha), "a chunk is named by its SHA-256");
    }

    // An incremental after a change; equal chunks are stored once (keyed ids dedup).
    let mut changed = disk.clone();
    changed[100..200].copy_from_slice(&noise(100, 9));
    fs::write(&img, &changed).unwrap();
    let second = env.capture(&img, Some("latest"));
    let second_id = second["id"].as_str().unwrap().to_string();
    assert_eq!(
        bkimg_tests::u(&second["disks"][0]["chunks_new"]),
        1,
        "one changed chunk: {second}"
    );

    let list = env.ok(&env.with_pw("list", &["--json"])).json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(
        list.iter().all(|p| p["protection"] == "encrypted"),
        "{list:?}"
    );
    let info = env.ok(&env.with_pw("info", &["latest", "--json"])).json();
    assert_eq!(info["protection"], "encrypted");
    env.ok(&env.with_pw("verify", &[]));

    // Restores of both points equal the disk as it was; the key file opens it too.
    let t1 = env.path("t1.img");
    env.restore(&first_id, &t1);
    assert_eq!(sha256_file(&t1), first_sum);
    let t2 = env.path("t2.img");
    env.ok(&[
        "restore",
        "--repo",
        p(&env.repo),
        "--key-file",
        p(&env.key_file),
        &second_id,
        "--target",
        p(&t2),
        "--quiet",
    ]);
    assert_eq!(fs::read(&t2).unwrap(), changed);

    // An export carries the point sealed, with the config and key slots: it opens with
    // the key file alone and with nothing less, and holds no byte of the disk's text.
    let export = env.path("point.bkimg");
    env.ok(&env.with_pw("export", &["latest", "--output", p(&export), "--quiet"]));
    let bytes = fs::read(&export).unwrap();
    assert!(!contains(&bytes, b"SECRET-PASSWORD-HASH"));
    let (ex, kf) = (p(&export), p(&env.key_file));
    let listed = env
        .ok(&["list", "--json", "--repo", ex, "--key-file", kf])
        .json();
    assert_eq!(listed[0]["id"], second_id.as_str());
    assert_eq!(listed[0]["protection"], "encrypted");
    env.ok(&["verify", "--repo", ex, "--key-file", kf]);
    let t4 = env.path("t4.img");
    env.ok(&[
        "restore",
        "latest",
        "--target",
        p(&t4),
        "--quiet",
        "--repo",
        ex,
        "--key-file",
        kf,
    ]);
    assert_eq!(fs::read(&t4).unwrap(), changed);
    let r = env.run(&["list", "--repo", p(&export)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("passphrase"), "{}", r.stderr);
    let stranger = Env::new("encrypted");
    let r = env.run(&[
        "list",
        "--repo",
        p(&export),
        "--key-file",
        p(&stranger.key_file),
    ]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    // A byte changed in a sealed chunk of the export is found.
    let mut flipped = bytes.clone();
    flipped[64 + 1000] ^= 0x10;
    let damaged = env.path("damaged.bkimg");
    fs::write(&damaged, &flipped).unwrap();
    let r = env.run(&[
        "verify",
        "--repo",
        p(&damaged),
        "--key-file",
        p(&env.key_file),
    ]);
    assert_eq!(r.code, 3, "{}", r.stderr);

    // Prune the first point: the second stays whole (its parent's record is sealed too).
    env.ok(&env.with_pw("prune", &["--keep-last", "1"]));
    env.ok(&env.with_pw("verify", &[]));
    let t3 = env.path("t3.img");
    env.restore("latest", &t3);
    assert_eq!(fs::read(&t3).unwrap(), changed);
    for f in env.stored_files() {
        assert!(!contains(&fs::read(&f).unwrap(), b"SECRET-PASSWORD-HASH"));
    }
}

#[test]
fn tampering_with_an_encrypted_repository_is_refused_naming_the_object() {
    let env = Env::new("encrypted");
    let img = env.path("disk.img");
    disk_image(&img, 2);
    let first = env.capture(&img, None)["id"].as_str().unwrap().to_string();
    let mut data = fs::read(&img).unwrap();
    data[0] ^= 1;
    fs::write(&img, &data).unwrap();
    let second = env.capture(&img, Some("latest"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    env.ok(&env.with_pw("verify", &[]));
    let chunks = env.chunk_files();
    assert!(chunks.len() >= 3);

    // Two chunk files swapped: each is refused under the other's name.
    let (a, b) = (&chunks[0], &chunks[1]);
    let (ba, bb) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    fs::write(a, &bb).unwrap();
    fs::write(b, &ba).unwrap();
    let r = env.fails(&env.with_pw("verify", &[]), 3, "authentication failed");
    let a_name = a.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        r.stdout.contains(&a_name) || r.stderr.contains(&a_name),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let target = env.path("t.img");
    let r = env.run(&env.with_pw("restore", &[&second, "--target", p(&target), "--quiet"]));
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("chunk"), "{}", r.stderr);
    fs::write(a, &ba).unwrap();
    fs::write(b, &bb).unwrap();
    env.ok(&env.with_pw("verify", &[]));

    // One flipped byte in a chunk.
    let mut bad = ba.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    fs::write(a, &bad).unwrap();
    env.fails(&env.with_pw("verify", &[]), 3, &a_name);
    fs::write(a, &ba).unwrap();

    // A volume index flipped.
    let index = env
        .stored_files()
        .into_iter()
        .find(|f| f.starts_with(env.repo.join("indexes")))
        .unwrap();
    let good_index = fs::read(&index).unwrap();
    let mut bad = good_index.clone();
    let at = bad.len() - 20;
    bad[at] ^= 1;
    fs::write(&index, &bad).unwrap();
    env.fails(&env.with_pw("verify", &[]), 3, "volume index");
    fs::write(&index, &good_index).unwrap();

    // The first point's manifest replayed under the second's name: refused, and "latest"
    // is not silently the first.
    let points = env.repo.join("points");
    let m2 = fs::read(points.join(&second)).unwrap();
    fs::copy(points.join(&first), points.join(&second)).unwrap();
    let r = env.run(&env.with_pw("list", &[]));
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("manifest {second}")),
        "{}",
        r.stderr
    );
    env.fails(
        &env.with_pw("restore", &["latest", "--target", p(&target), "--quiet"]),
        3,
        "ambiguous",
    );
    fs::write(points.join(&second), &m2).unwrap();
    env.ok(&env.with_pw("verify", &[]));

    // The config rewritten from encrypted to signed (so that a capture would store the
    // next disk in plaintext): its settings no longer match their MAC.
    use bkimg_format::store::local::{RepoConfig, CONFIG_KIND, CONFIG_KIND_KEYS};
    let config_path = env.repo.join("config");
    let original = fs::read(&config_path).unwrap();
    let (mut config, _): (RepoConfig, _) =
        bkimg_format::sealed::open(&CONFIG_KIND_KEYS, &original).unwrap();
    let enc = config.encryption.as_mut().unwrap();
    enc.mode = bkimg_format::keys::Mode::Signed;
    enc.chunk_id = "sha256".into();
    fs::write(
        &config_path,
        bkimg_format::sealed::seal(&CONFIG_KIND, config.features(), &config),
    )
    .unwrap();
    disk_image(&img, 9);
    env.fails(
        &env.with_pw("capture", &["--quiet", p(&img)]),
        3,
        "do not match their MAC",
    );
    let n = env.chunk_files().len();
    assert_eq!(n, chunks.len(), "nothing was stored");
    fs::write(&config_path, &original).unwrap();
    env.ok(&env.with_pw("verify", &[]));
}

#[test]
fn wrong_missing_and_misplaced_keys_are_refused() {
    let env = Env::new("encrypted");
    let img = env.path("disk.img");
    disk_image(&img, 3);
    env.capture(&img, None);
    // A wrong passphrase: exit 8, nothing read.
    let wrong = env.path("wrong");
    fs::write(&wrong, "wrong horse\n").unwrap();
    env.fails(
        &["list", "--repo", p(&env.repo), "--password-file", p(&wrong)],
        8,
        "unlocks none",
    );
    // No key and no terminal to ask on: a usage error saying how to give one.
    env.fails(&["list", "--repo", p(&env.repo)], 2, "--password-file");
    // The environment gives the key as well as the option.
    let r = env.run_env(
        &["list", "--repo", p(&env.repo)],
        &[("BKIMG_KEY_FILE", p(&env.key_file))],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);

    // A key given for an unprotected repository: refused (it may have replaced the
    // protected one); a key given for a repository that does not exist yet: nothing made.
    let plain = env.path("plain");
    env.ok(&["capture", "--repo", p(&plain), "--quiet", p(&img)]);
    env.fails(
        &["list", "--repo", p(&plain), "--password-file", p(&env.pw)],
        8,
        "neither encrypted nor signed",
    );
    let fresh = env.path("fresh");
    env.fails(
        &[
            "capture",
            "--repo",
            p(&fresh),
            "--password-file",
            p(&env.pw),
            p(&img),
        ],
        5,
        "bkimg key init",
    );
    assert!(!fresh.exists());

    // A key file of another repository.
    let other = Env::new("encrypted");
    env.fails(
        &[
            "list",
            "--repo",
            p(&env.repo),
            "--key-file",
            p(&other.key_file),
        ],
        8,
        "unlocks none",
    );
}

#[test]
fn a_signed_repository_keeps_plain_chunks_and_refuses_forged_manifests() {
    let env = Env::new("signed");
    let img = env.path("disk.img");
    disk_image(&img, 4);
    let id = env.capture(&img, None)["id"].as_str().unwrap().to_string();
    // Chunks stay plain (readable with the spec alone); chunk ids are plain SHA-256.
    let disk = fs::read(&img).unwrap();
    let marker_chunk =
        bkimg_format::Digest::of_bytes(&disk[MIB as usize..(MIB as usize + (256 << 10))]);
    let names: Vec<String> = env
        .chunk_files()
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&marker_chunk.to_hex()), "{names:?}");
    let list = env.ok(&env.with_pw("list", &["--json"])).json();
    assert_eq!(list[0]["protection"], "signed");
    env.ok(&env.with_pw("verify", &[]));
    let t = env.path("t.img");
    env.restore(&id, &t);
    assert_eq!(fs::read(&t).unwrap(), disk);

    // A manifest without the MAC (what someone without the key can write) is refused; so
    // is a signed one with a changed byte.
    let manifest = env.repo.join("points").join(&id);
    let signed = fs::read(&manifest).unwrap();
    let plain = signed[12..signed.len() - 32].to_vec();
    fs::write(&manifest, &plain).unwrap();
    let r = env.run(&env.with_pw("list", &[]));
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("carries no MAC"), "{}", r.stderr);
    env.fails(
        &env.with_pw("restore", &["latest", "--target", p(&t), "--quiet"]),
        3,
        "carries no MAC",
    );
    let mut changed = signed.clone();
    let at = changed.len() / 2;
    changed[at] ^= 1;
    fs::write(&manifest, &changed).unwrap();
    env.fails(&env.with_pw("verify", &[]), 3, "MAC does not match");
    fs::write(&manifest, &signed).unwrap();
    env.ok(&env.with_pw("verify", &[]));
}

/// Sign-only is for data that must stay readable without the key: `--unauthenticated`
/// lists, verifies and restores a signed repository with no key at all, says so, and
/// writes nothing; without it the key is asked for, with the flag named. An encrypted
/// repository still needs its key.
#[test]
fn a_signed_repository_is_readable_without_its_key_when_asked() {
    let env = Env::new("signed");
    let img = env.path("disk.img");
    disk_image(&img, 7);
    let id = env.capture(&img, None)["id"].as_str().unwrap().to_string();
    let repo = p(&env.repo);

    // No key and no terminal: the message names both ways on.
    env.fails(&["list", "--repo", repo], 2, "--unauthenticated");

    let r = env.ok(&["list", "--repo", repo, "--unauthenticated", "--json"]);
    assert!(r.stderr.contains("NOT authenticated"), "{}", r.stderr);
    let list = r.json();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["protection"], "signed");
    assert_eq!(list[0]["authenticated"], false);
    let with_key = env.ok(&env.with_pw("list", &["--json"])).json();
    assert_eq!(with_key[0]["authenticated"], true);
    let info = env
        .ok(&["info", "--repo", repo, "--unauthenticated", "--json", &id])
        .json();
    assert_eq!(info["authenticated"], false);
    env.ok(&["verify", "--repo", repo, "--unauthenticated"]);
    let t = env.path("t.img");
    env.ok(&[
        "restore",
        "--repo",
        repo,
        "--unauthenticated",
        &id,
        "--target",
        p(&t),
        "--quiet",
    ]);
    assert_eq!(fs::read(&t).unwrap(), fs::read(&img).unwrap());

    // Nothing that writes runs unauthenticated, and nothing was written.
    let before = env.stored_files();
    env.fails(
        &[
            "capture",
            "--repo",
            repo,
            "--unauthenticated",
            "--quiet",
            p(&img),
        ],
        2,
        "must be signed",
    );
    env.fails(
        &[
            "prune",
            "--repo",
            repo,
            "--unauthenticated",
            "--keep-last",
            "1",
        ],
        2,
        "must be signed",
    );
    assert_eq!(env.stored_files(), before);
    // A key and --unauthenticated contradict each other.
    let r = env.run(&env.with_pw("list", &["--unauthenticated"]));
    assert_eq!(r.code, 2, "{}", r.stderr);

    // A forged manifest still fails to parse as one: the envelope's form is checked.
    let manifest = env.repo.join("points").join(&id);
    let signed = fs::read(&manifest).unwrap();
    fs::write(&manifest, &signed[12..signed.len() - 32]).unwrap();
    let r = env.run(&["list", "--repo", repo, "--unauthenticated"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("carries no MAC"), "{}", r.stderr);
    fs::write(&manifest, &signed).unwrap();

    // An encrypted repository cannot be read so.
    let enc = Env::new("encrypted");
    enc.capture(&img, None);
    enc.fails(
        &["list", "--repo", p(&enc.repo), "--unauthenticated"],
        8,
        "cannot be read without its key",
    );
}

#[test]
fn a_rolled_back_or_unprotected_repository_is_refused_by_a_client_that_saw_it() {
    let env = Env::new("encrypted");
    let img = env.path("disk.img");
    disk_image(&img, 5);
    let a = env.capture(&img, None)["id"].as_str().unwrap().to_string();
    let b = env.capture(&img, Some("latest"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let info = env.ok(&env.with_pw("info", &[&b, "--json"])).json();
    assert_eq!(info["manifest"]["point_sequence"], 2, "{info}");

    // The newest point removed (as someone with write access but no key can): refused,
    // until accepted once.
    let points = env.repo.join("points");
    let kept = env.path("kept-manifest");
    fs::rename(points.join(&b), &kept).unwrap();
    let r = env.fails(&env.with_pw("list", &[]), 8, "was rolled back");
    assert!(
        r.stderr.contains(&b) && r.stderr.contains(&a),
        "{}",
        r.stderr
    );
    let t = env.path("t.img");
    env.fails(
        &env.with_pw("restore", &["latest", "--target", p(&t), "--quiet"]),
        8,
        "was rolled back",
    );
    assert!(!t.exists(), "nothing restored");
    env.fails(
        &env.with_pw("capture", &["--quiet", p(&img)]),
        8,
        "was rolled back",
    );
    env.ok(&env.with_pw("list", &["--accept-rollback"]));
    env.ok(&env.with_pw("list", &[]));
    fs::rename(&kept, points.join(&b)).unwrap();
    env.ok(&env.with_pw("list", &[]));

    // The config swapped for an unprotected one of the same repository id.
    let config = fs::read(env.repo.join("config")).unwrap();
    let id = env
        .ok(&["key", "list", "--repo", p(&env.repo), "--json"])
        .json()["repository_id"]
        .as_str()
        .unwrap()
        .to_string();
    let plain = env.path("plain");
    drop(
        bkimg_format::store::LocalDir::open_or_create(&plain, &id, "2026-01-01T00:00:00Z").unwrap(),
    );
    fs::copy(plain.join("config"), env.repo.join("config")).unwrap();
    env.fails(&["list", "--repo", p(&env.repo)], 8, "is now unprotected");
    fs::write(env.repo.join("config"), &config).unwrap();
    env.ok(&env.with_pw("list", &[]));
}
