//! S3 Object Lock (`replicate --object-lock-days N`) against a server that implements it:
//! moto's server mode (pinned in .ci/install-moto; s3s-fs has no Object Lock) on 127.0.0.1.
//! What is uploaded carries a COMPLIANCE retention and cannot be deleted; the bucket
//! restores byte for byte; a bucket without Object Lock is refused before anything is
//! sent; a multipart index is locked too; a prune of a locked bucket hides points behind
//! delete markers and leaves every locked version in place.
//!
//! `bkimg` gets endpoint and credentials through the environment only, as a user would.
//! The test inspects and attacks the bucket with boto3 from moto's own venv (a small script
//! below), so the suite needs no S3 client crate.
//!
//! Where moto 5.2.1 differs from AWS (checked by hand; 5.2.5 is the same):
//! * GetObjectRetention (`GET ?retention`) is not routed in server mode: it answers with the
//!   object's body. Retention is read from HeadObject's `x-amz-object-lock-*` headers, which
//!   AWS sends as well.
//! * PutObjectRetention may shorten a COMPLIANCE retention or turn it into GOVERNANCE; AWS
//!   refuses both. So the test does not try to lift a retention, only to delete versions.
//! * CreateMultipartUpload's retention headers are dropped: the completed object has none.
//! * Uploads with a retention are accepted without a checksum of their body; AWS refuses
//!   them (400 InvalidRequest).
//!
//! The last two are checked on the wire instead: bkimg's requests pass through a relay
//! (`Tap`) that keeps what they carry.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bkimg_tests::{
    capture_json as capture, noise, noise_image, p, sha256_file, u, write_at, Run, TempDir, MIB,
};
use serde_json::Value;

const LOCKED: &str = "lockbucket";
const DAY: u64 = 86_400;

/// The directory holding `moto_server` and the venv's `python`: from $MOTO_SERVER (set by
/// .ci/test), else installed once (cached) by .ci/install-moto. In CI an install that
/// fails fails the test; it is never a skip.
fn moto_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(server) = std::env::var_os("MOTO_SERVER") {
            let server = PathBuf::from(server);
            assert!(
                server.is_file(),
                "MOTO_SERVER={} is not a file",
                server.display()
            );
            return server
                .parent()
                .expect("MOTO_SERVER's directory")
                .to_path_buf();
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/install-moto");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(out.status.success(), "{} failed", script.display());
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// The bucket seen from outside bkimg: `python -c TOOL COMMAND ARGS...`, one JSON value on
/// stdout.
const TOOL: &str = r#"
import json, sys, boto3, botocore.exceptions
s3 = boto3.client("s3")
cmd, bucket, args = sys.argv[1], sys.argv[2], sys.argv[3:]

def code(call):
    try:
        call()
        return None
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]

if cmd == "create":
    kind = args[0]
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=(kind == "locked"))
    if kind == "versioned":
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    out = None
elif cmd == "versions":
    out = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=args[0]):
        for m in page.get("DeleteMarkers", []):
            out.append({"key": m["Key"], "version": m["VersionId"], "latest": m["IsLatest"],
                        "marker": True})
        for v in page.get("Versions", []):
            h = s3.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
            until = h.get("ObjectLockRetainUntilDate")
            out.append({"key": v["Key"], "version": v["VersionId"], "latest": v["IsLatest"],
                        "marker": False, "etag": v["ETag"], "size": v["Size"],
                        "mode": h.get("ObjectLockMode"),
                        "until": until.timestamp() if until else None})
elif cmd == "policy":
    s3.put_bucket_policy(Bucket=bucket, Policy=args[0])
    out = None
elif cmd == "delete":
    key = args[0]
    def batch():
        r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key}]})
        errors = r.get("Errors", [])
        if errors:
            raise botocore.exceptions.ClientError({"Error": {"Code": errors[0]["Code"]}}, "DeleteObjects")
    out = {"DeleteObject": code(lambda: s3.delete_object(Bucket=bucket, Key=key)),
           "DeleteObjects": code(batch),
           "still_there": code(lambda: s3.head_object(Bucket=bucket, Key=key)) is None}
elif cmd == "delete-version":
    key, version = args
    one = lambda: s3.delete_object(Bucket=bucket, Key=key, VersionId=version)
    def batch():
        r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key, "VersionId": version}]})
        errors = r.get("Errors", [])
        if errors:
            raise botocore.exceptions.ClientError({"Error": {"Code": errors[0]["Code"]}}, "DeleteObjects")
    out = {"DeleteObject": code(one), "DeleteObjects": code(batch),
           "still_there": code(lambda: s3.head_object(Bucket=bucket, Key=key, VersionId=version)) is None}
print(json.dumps(out))
"#;

/// A moto server on 127.0.0.1, killed on drop.
struct Moto {
    port: u16,
    child: Child,
    dir: TempDir,
}

impl Moto {
    fn start() -> Moto {
        let dir = TempDir::new().expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = fs::File::create(dir.path().join("moto.log")).expect("log");
        let mut child = Command::new(moto_bin().join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting moto_server");
        // moto imports a lot of Python before it listens: seconds, not milliseconds.
        let until = Instant::now() + Duration::from_secs(300);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().expect("moto_server") {
                panic!(
                    "moto_server exited ({status}):\n{}",
                    fs::read_to_string(dir.path().join("moto.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < until,
                "moto_server did not start listening"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { port, child, dir }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Endpoint, region and (any: moto checks none) credentials, and nothing from the
    /// machine's own AWS set-up.
    fn aws_env(&self, c: &mut Command) {
        c.env("AWS_ACCESS_KEY_ID", "bkimgtestkey")
            .env("AWS_SECRET_ACCESS_KEY", "bkimg-test-secret")
            .env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_REGION", "us-east-1")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/nonexistent/bkimg-test")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/bkimg-test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ENDPOINT_URL_S3");
    }

    /// Runs TOOL with boto3 from moto's venv.
    fn tool(&self, args: &[&str]) -> Value {
        let mut c = Command::new(moto_bin().join("python"));
        c.arg("-c").arg(TOOL).args(args).stdin(Stdio::null());
        self.aws_env(&mut c);
        let out = c.output().expect("running the venv's python");
        assert!(
            out.status.success(),
            "tool {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("tool output is JSON")
    }

    /// `kind`: "locked" (Object Lock, hence versioning), "versioned" or "plain".
    fn create_bucket(&self, name: &str, kind: &str) {
        self.tool(&["create", name, kind]);
    }

    /// Every version and delete marker under `prefix`, each with its retention.
    fn versions(&self, bucket: &str, prefix: &str) -> Vec<Value> {
        let v = self.tool(&["versions", bucket, prefix]);
        v.as_array().expect("an array").clone()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bkimg_tests::bkimg_path());
        c.args(args).stdin(Stdio::null());
        self.aws_env(&mut c);
        c
    }

    fn bkimg(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().expect("running bkimg");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn ok(&self, args: &[&str]) -> Run {
        let r = self.bkimg(args);
        assert_eq!(
            r.code,
            0,
            "bkimg {args:?} failed with {}:\n{}\n{}\nmoto log tail:\n{}",
            r.code,
            r.stdout,
            r.stderr,
            self.log_tail()
        );
        r
    }

    fn list(&self, url: &str) -> Vec<Value> {
        self.ok(&["list", "--repo", url, "--json"])
            .json()
            .as_array()
            .expect("list --json gives an array")
            .clone()
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn key(v: &Value) -> &str {
    v["key"].as_str().expect("key")
}

/// Current objects (not delete markers) under `prefix`.
fn current<'a>(versions: &'a [Value], prefix: &str) -> Vec<&'a Value> {
    versions
        .iter()
        .filter(|v| v["latest"] == true && v["marker"] == false && key(v).starts_with(prefix))
        .collect()
}

/// (key, version) of every version with a retention.
fn locked(versions: &[Value]) -> BTreeSet<(String, String)> {
    versions
        .iter()
        .filter(|v| !v["mode"].is_null())
        .map(|v| {
            (
                key(v).to_string(),
                v["version"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Asserts that `v` has a COMPLIANCE retention of one day from its upload, which happened
/// between `from` and `to`.
fn assert_locked_one_day(v: &Value, from: u64, to: u64) {
    assert_eq!(v["mode"], "COMPLIANCE", "{v:#}");
    let until = v["until"]
        .as_f64()
        .unwrap_or_else(|| panic!("no retain-until date: {v:#}"));
    assert!(
        until >= (from + DAY - 2) as f64 && until <= (to + DAY + 2) as f64,
        "retain-until {until} is not one day after the upload ({from}..{to}): {v:#}"
    );
}

fn replicate_locked(s: &Moto, repo: &Path, url: &str) -> Value {
    s.ok(&[
        "replicate",
        "--repo",
        p(repo),
        "--to",
        url,
        "--object-lock-days",
        "1",
        "--json",
    ])
    .json()
}

/// Replicate with a one-day lock: every object bkimg relies on is locked for a day and a
/// locked version cannot be deleted; the bucket verifies and restores byte for byte. A
/// second point, then `prune --keep-last 1`: the first point leaves the listing (delete
/// markers) while every locked version is still there, and the kept point restores.
#[test]
fn locked_objects_survive_deletes_and_prune() {
    if !bkimg_tests::require_root() {
        return;
    }
    let s = Moto::start();
    s.create_bucket(LOCKED, "locked");
    let t = TempDir::new().unwrap();
    let img = t.path().join("disk.img");
    let repo = t.path().join("repo");
    let url = format!("s3://{LOCKED}/p");
    noise_image(&img, 16 * MIB, 21);
    let sha1 = sha256_file(&img);
    let first = capture(&["--repo", p(&repo), "--raw", p(&img)]);
    let id1 = first["id"].as_str().unwrap().to_string();
    let n1 = u(&first["disks"][0]["chunks_new"]);
    assert_eq!(n1, 64, "{first:#}");

    let from = now();
    let r = replicate_locked(&s, &repo, &url);
    let to = now();
    assert_eq!(r["points_sent"], serde_json::json!([id1]), "{r:#}");
    assert_eq!(u(&r["chunks_sent"]), n1, "{r:#}");

    let versions = s.versions(LOCKED, "p/");
    let cur = current(&versions, "p/");
    let count = |prefix: &str| cur.iter().filter(|v| key(v).starts_with(prefix)).count();
    assert_eq!(count("p/config"), 1, "{versions:#?}");
    assert_eq!(count("p/chunks/"), n1 as usize, "{versions:#?}");
    assert_eq!(count("p/indexes/"), 1, "{versions:#?}");
    assert_eq!(count("p/points/"), 1, "{versions:#?}");
    assert_eq!(count("p/locks/"), 0, "the ship lock is gone: {versions:#?}");
    for v in &cur {
        assert_locked_one_day(v, from, to);
    }

    // The owner (moto checks no policy: these credentials could do anything) tries to
    // delete versions: the manifest, a chunk, the index, the config.
    for prefix in ["p/points/", "p/chunks/", "p/indexes/", "p/config"] {
        let v = cur.iter().find(|v| key(v).starts_with(prefix)).unwrap();
        let d = s.tool(&[
            "delete-version",
            LOCKED,
            key(v),
            v["version"].as_str().unwrap(),
        ]);
        assert_eq!(d["DeleteObject"], "AccessDenied", "{} {d}", key(v));
        assert_eq!(d["DeleteObjects"], "AccessDenied", "{} {d}", key(v));
        assert_eq!(d["still_there"], true, "{} {d}", key(v));
    }

    let v = s.ok(&["verify", "--repo", &url, "--json"]).json();
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    let out = t.path().join("restored-1.img");
    s.ok(&[
        "restore",
        "--repo",
        &url,
        &id1,
        "--target",
        p(&out),
        "--quiet",
    ]);
    assert_eq!(
        sha256_file(&out),
        sha1,
        "restore from the locked bucket differs"
    );

    // A second point: 1 MiB rewritten, 4 new chunks, locked on upload like the rest.
    write_at(&img, 4 * MIB, &noise(MIB as usize, 22));
    let sha2 = sha256_file(&img);
    let second = capture(&["--repo", p(&repo), "--parent", "latest", "--raw", p(&img)]);
    let id2 = second["id"].as_str().unwrap().to_string();
    let from = now();
    let r = replicate_locked(&s, &repo, &url);
    let to = now();
    assert_eq!(r["points_sent"], serde_json::json!([id2]), "{r:#}");
    assert_eq!(u(&r["chunks_sent"]), 4, "{r:#}");
    let versions = s.versions(LOCKED, "p/");
    let new_point = format!("p/points/{id2}");
    let manifest = current(&versions, &new_point);
    assert_eq!(manifest.len(), 1, "{versions:#?}");
    assert_locked_one_day(manifest[0], from, to);
    let before_prune = locked(&versions);

    let pruned = s
        .ok(&["prune", "--repo", &url, "--keep-last", "1", "--json"])
        .json();
    assert_eq!(pruned["removed"][0]["id"], id1.as_str(), "{pruned:#}");
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 1, "{pruned:#}");
    // The 4 chunks of the rewritten MiB were only the first point's.
    assert_eq!(u(&pruned["chunks_removed"]), 4, "{pruned:#}");
    let listed = s.list(&url);
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["id"], id2.as_str());

    // Nothing locked went away; the pruned manifest and chunks are hidden behind delete
    // markers.
    let versions = s.versions(LOCKED, "p/");
    let after_prune = locked(&versions);
    assert_eq!(
        before_prune.difference(&after_prune).count(),
        0,
        "locked versions disappeared: {:#?}",
        before_prune.difference(&after_prune).collect::<Vec<_>>()
    );
    let old_point = format!("p/points/{id1}");
    let hidden: Vec<&Value> = versions
        .iter()
        .filter(|v| v["latest"] == true && v["marker"] == true)
        .filter(|v| !key(v).starts_with("p/locks/"))
        .collect();
    let hidden_keys: BTreeSet<&str> = hidden.iter().map(|v| key(v)).collect();
    assert!(hidden_keys.contains(old_point.as_str()), "{hidden_keys:#?}");
    assert_eq!(
        hidden_keys
            .iter()
            .filter(|k| k.starts_with("p/chunks/"))
            .count(),
        4,
        "{hidden_keys:#?}"
    );
    for k in &hidden_keys {
        let kept = versions
            .iter()
            .filter(|v| key(v) == *k && v["mode"] == "COMPLIANCE")
            .count();
        assert_eq!(kept, 1, "the locked version of {k} is gone: {versions:#?}");
    }

    let v = s.ok(&["verify", "--repo", &url, "--json"]).json();
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    let out = t.path().join("restored-2.img");
    s.ok(&[
        "restore",
        "--repo",
        &url,
        &id2,
        "--target",
        p(&out),
        "--quiet",
    ]);
    assert_eq!(sha256_file(&out), sha2, "restore after the prune differs");
}

/// `--object-lock-days` on a bucket without Object Lock (plain, or versioned only): exit 1,
/// one message that says what to do, and not one object (or version) in the bucket.
#[test]
fn bucket_without_object_lock_is_refused() {
    if !bkimg_tests::require_root() {
        return;
    }
    let s = Moto::start();
    let t = TempDir::new().unwrap();
    let img = t.path().join("disk.img");
    let repo = t.path().join("repo");
    noise_image(&img, 4 * MIB, 23);
    capture(&["--repo", p(&repo), "--raw", p(&img)]);
    for (bucket, kind) in [("plainbucket", "plain"), ("versionedbucket", "versioned")] {
        s.create_bucket(bucket, kind);
        let r = s.bkimg(&[
            "replicate",
            "--repo",
            p(&repo),
            "--to",
            &format!("s3://{bucket}/p"),
            "--object-lock-days",
            "1",
        ]);
        assert_eq!(r.code, 1, "{kind}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!(
                "bucket {bucket} does not have S3 Object Lock enabled"
            )),
            "{kind}: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains("--object-lock-enabled-for-bucket"),
            "{kind}: {}",
            r.stderr
        );
        let versions = s.versions(bucket, "");
        assert!(
            versions.is_empty(),
            "{kind}: something was uploaded: {versions:#?}"
        );
    }
}

/// A 1 GiB image (1 MiB of noise, the rest a hole) captured with 4 KiB chunks: an 8 MiB
/// index, which goes up in two parts of 5 MiB. Returns the image and the point's id.
fn capture_for_multipart(dir: &Path, repo: &Path) -> (PathBuf, String) {
    let img = dir.join("disk.img");
    noise_image(&img, MIB, 24);
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| f.set_len(1024 * MIB))
        .unwrap();
    let full = capture(&["--repo", p(repo), "--raw", "--chunk-size", "4K", p(&img)]);
    (img, full["id"].as_str().unwrap().to_string())
}

/// `replicate --object-lock-days 1` with 5 MiB parts, through `endpoint`; returns the
/// times before and after.
fn replicate_multipart(s: &Moto, repo: &Path, url: &str, endpoint: &str) -> (u64, u64) {
    let mut c = s.command(&[
        "replicate",
        "--repo",
        p(repo),
        "--to",
        url,
        "--object-lock-days",
        "1",
        "--json",
    ]);
    c.env("AWS_ENDPOINT_URL", endpoint)
        .env("BKIMG_S3_PART_SIZE", (5 * MIB).to_string());
    let from = now();
    let out = c.output().unwrap();
    let to = now();
    assert!(
        out.status.success(),
        "{}\nmoto log tail:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log_tail()
    );
    (from, to)
}

/// A large index goes up in parts and is locked like the rest (where the server applies
/// the retention of a multipart upload: moto does not, see below); the bucket restores it.
#[test]
fn multipart_index_is_locked() {
    if !bkimg_tests::require_root() {
        return;
    }
    let s = Moto::start();
    s.create_bucket(LOCKED, "locked");
    let t = TempDir::new().unwrap();
    let repo = t.path().join("repo");
    let url = format!("s3://{LOCKED}/mp");
    let (img, id) = capture_for_multipart(t.path(), &repo);
    let (from, to) = replicate_multipart(&s, &repo, &url, &s.endpoint());

    let versions = s.versions(LOCKED, "mp/indexes/");
    assert_eq!(versions.len(), 1, "{versions:#?}");
    let index = &versions[0];
    assert_eq!(u(&index["size"]), 128 + 32 * 262_144, "{index:#}");
    // A multipart object's ETag is the digest of its parts' digests, then "-<parts>".
    assert!(
        index["etag"].as_str().unwrap().ends_with("-2\""),
        "not uploaded in two parts: {index:#}"
    );
    // moto (5.2.1, and 5.2.5 still) drops the retention headers of CreateMultipartUpload:
    // the completed object has no retention, where AWS gives it the one asked for. That
    // bkimg asks is checked on the wire (locked_uploads_carry_what_aws_requires).
    if index["mode"].is_null() {
        eprintln!("moto stored the multipart index without a retention (a moto gap)");
    } else {
        assert_locked_one_day(index, from, to);
    }
    for v in current(&s.versions(LOCKED, "mp/"), "mp/") {
        if v["key"] != index["key"] {
            assert_locked_one_day(v, from, to);
        }
    }

    let restored = t.path().join("r.img");
    s.ok(&[
        "restore",
        "--repo",
        &url,
        &id,
        "--target",
        p(&restored),
        "--quiet",
    ]);
    // cmp, not sha256_file: this test binary is unoptimized and the image is 1 GiB.
    bkimg_tests::sh("cmp", &[p(&img), p(&restored)]);
}

/// What AWS demands of uploads with a retention, which moto does not check, read on the
/// wire: every PutObject with Object Lock headers carries a checksum of its body
/// (`x-amz-checksum-*` as a header or announced trailer, or `Content-MD5`: AWS answers 400
/// InvalidRequest otherwise, and also when `x-amz-sdk-checksum-algorithm` comes without
/// one); CreateMultipartUpload carries the retention, one day ahead; every UploadPart of
/// that upload carries a checksum too.
#[test]
fn locked_uploads_carry_what_aws_requires() {
    if !bkimg_tests::require_root() {
        return;
    }
    let s = Moto::start();
    s.create_bucket(LOCKED, "locked");
    let tap = Tap::start(s.port);
    let t = TempDir::new().unwrap();
    let repo = t.path().join("repo");
    let url = format!("s3://{LOCKED}/w");
    capture_for_multipart(t.path(), &repo);
    let (from, to) = replicate_multipart(&s, &repo, &url, &tap.endpoint());
    let heads = tap.request_heads();
    let has_checksum = |h: &str| {
        header(h, "content-md5").is_some()
            || h.lines().skip(1).any(|l| {
                let l = l.to_ascii_lowercase();
                l.starts_with("x-amz-checksum-")
                    || (l.starts_with("x-amz-trailer:") && l.contains("x-amz-checksum-"))
            })
    };
    let in_time = |until: &str| {
        until >= iso8601(from + DAY - 2).as_str() && until <= iso8601(to + DAY + 2).as_str()
    };

    let puts: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with(&format!("PUT /{LOCKED}/w/")) && h.contains("x-id=PutObject"))
        .collect();
    // The config, 256 chunks, the manifest (and lock objects).
    assert!(puts.len() >= 258, "{} PutObject requests", puts.len());
    let locked_puts: Vec<&&String> = puts
        .iter()
        .filter(|h| header(h, "x-amz-object-lock-mode").is_some())
        .collect();
    assert!(
        locked_puts.len() >= 258,
        "{} locked puts",
        locked_puts.len()
    );
    let without: Vec<&&&String> = locked_puts.iter().filter(|h| !has_checksum(h)).collect();
    assert!(
        without.is_empty(),
        "{} of {} PutObject requests with a retention carry no checksum of their body \
         (AWS refuses them); the first:\n{}",
        without.len(),
        locked_puts.len(),
        without[0]
    );

    let creates: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with(&format!("POST /{LOCKED}/w/indexes/")) && h.contains("?uploads"))
        .collect();
    assert_eq!(creates.len(), 1, "one CreateMultipartUpload: {heads:#?}");
    let create = creates[0];
    assert_eq!(
        header(create, "x-amz-object-lock-mode").as_deref(),
        Some("COMPLIANCE"),
        "{create}"
    );
    let until = header(create, "x-amz-object-lock-retain-until-date")
        .unwrap_or_else(|| panic!("no retain-until date: {create}"));
    assert!(in_time(&until), "retain-until {until}: not one day ahead");
    let parts: Vec<&String> = heads
        .iter()
        .filter(|h| {
            h.starts_with(&format!("PUT /{LOCKED}/w/indexes/")) && h.contains("partNumber=")
        })
        .collect();
    assert_eq!(parts.len(), 2, "two UploadPart: {heads:#?}");
    for part in parts {
        assert!(has_checksum(part), "UploadPart without a checksum:\n{part}");
    }
}

/// What a client sent on one connection, as it arrives.
type Stream = Arc<Mutex<Vec<u8>>>;

/// A TCP relay in front of moto that keeps what clients send, to read the headers of
/// requests whose effect moto does not show. Its threads end with their connections; the
/// accepting one lives as long as the test process.
struct Tap {
    port: u16,
    /// Client-to-server bytes, one buffer per connection.
    sent: Arc<Mutex<Vec<Stream>>>,
}

impl Tap {
    fn start(upstream: u16) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("tap port");
        let port = listener.local_addr().expect("tap address").port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let all = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let buf: Stream = Arc::new(Mutex::new(Vec::new()));
                all.lock().unwrap().push(buf.clone());
                let (mut client_r, mut server_r) = (
                    client.try_clone().expect("socket"),
                    server.try_clone().expect("socket"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_r, &mut client);
                    let _ = client.shutdown(Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let mut chunk = [0u8; 64 * 1024];
                    loop {
                        match client_r.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                // Kept before it is forwarded: a request that was answered
                                // is in the buffer.
                                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
                                if server.write_all(&chunk[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = server.shutdown(Shutdown::Write);
                });
            }
        });
        Tap { port, sent }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The head (request line and headers) of every request sent so far.
    fn request_heads(&self) -> Vec<String> {
        const METHODS: [&[u8]; 5] = [b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE "];
        let mut heads = Vec::new();
        for buf in self.sent.lock().unwrap().iter() {
            let buf = buf.lock().unwrap();
            // Bodies are not parsed: a request line is a line that starts with a method
            // and ends with the protocol (binary bodies practically never hold one).
            let mut line = 0;
            while let Some(n) = find(&buf[line..], b"\r\n") {
                let text = &buf[line..line + n];
                if METHODS.iter().any(|m| text.starts_with(m)) && text.ends_with(b" HTTP/1.1") {
                    let end = find(&buf[line..], b"\r\n\r\n").map_or(buf.len(), |e| line + e);
                    heads.push(String::from_utf8_lossy(&buf[line..end]).into_owned());
                }
                line += n + 2;
            }
        }
        heads
    }
}

/// The value of header `name` (any case) in a request head.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), the form of
/// `x-amz-object-lock-retain-until-date`.
fn iso8601(secs: u64) -> String {
    // Days to civil date: H. Hinnant's algorithm.
    let (days, rem) = ((secs / DAY) as i64, secs % DAY);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The statements of docs/replication-s3.md's append-only policy that deny: no delete of
/// anything under PREFIX but the client's own lock objects, no version deleted, no
/// retention or bucket configuration changed.
fn append_only_denials(bucket: &str, prefix: &str) -> Value {
    let under = |dir: &str| format!("arn:aws:s3:::{bucket}/{prefix}/{dir}");
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "NoDeletesButLocks",
                "Effect": "Deny",
                "Principal": "*",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": [
                    under("config"), under("keys/*"), under("points/*"), under("indexes/*"),
                    under("chunks/*"), under("pruned/*"),
                ],
            },
            {
                "Sid": "NoVersionDeletes",
                "Effect": "Deny",
                "Principal": "*",
                "Action": ["s3:DeleteObjectVersion", "s3:BypassGovernanceRetention"],
                "Resource": format!("arn:aws:s3:::{bucket}/*"),
            },
        ],
    })
}

/// An append-only client (issue 13): under the documented policy's denials, replicate adds
/// restore points (its lock objects come and go), but its prune fails with exit 8, saying
/// what was refused, and loses nothing: both points stay listed, verify and restore. A
/// direct delete of a point is refused too.
///
/// moto applies a bucket policy's Deny to every caller (it ignores `Principal`), which is
/// what an IAM policy on the client's user does on AWS; moto's IAM enforcement cannot be
/// used (it miscomputes the signature of a listing whose prefix holds a `/`).
#[test]
fn an_append_only_client_adds_points_and_cannot_delete_them() {
    if !bkimg_tests::require_root() {
        return;
    }
    const BUCKET: &str = "appendonly";
    let s = Moto::start();
    s.create_bucket(BUCKET, "locked");
    let policy = append_only_denials(BUCKET, "p").to_string();
    s.tool(&["policy", BUCKET, &policy]);
    let t = TempDir::new().unwrap();
    let img = t.path().join("disk.img");
    let repo = t.path().join("repo");
    let url = format!("s3://{BUCKET}/p");
    noise_image(&img, 8 * MIB, 31);
    let sha1 = sha256_file(&img);
    let id1 = capture(&["--repo", p(&repo), "--raw", p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    replicate_locked(&s, &repo, &url);
    write_at(&img, 2 * MIB, &noise(MIB as usize, 32));
    let id2 = capture(&["--repo", p(&repo), "--parent", "latest", "--raw", p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = replicate_locked(&s, &repo, &url);
    assert_eq!(r["points_sent"], serde_json::json!([id2]), "{r:#}");
    // The client's lock objects were removed as it finished.
    let versions = s.versions(BUCKET, "p/locks/");
    assert!(current(&versions, "p/locks/").is_empty(), "{versions:#?}");

    let r = s.bkimg(&["prune", "--repo", &url, "--keep-last", "1"]);
    assert_eq!(r.code, 8, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("deleting"), "{}", r.stderr);
    assert!(r.stderr.contains("may not delete"), "{}", r.stderr);
    let listed = s.list(&url);
    assert_eq!(listed.len(), 2, "{listed:#?}");
    let v = s.ok(&["verify", "--repo", &url, "--json"]).json();
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    let out = t.path().join("first.img");
    s.ok(&[
        "restore",
        "--repo",
        &url,
        &id1,
        "--target",
        p(&out),
        "--quiet",
    ]);
    assert_eq!(sha256_file(&out), sha1);

    let point = format!("p/points/{id1}");
    let d = s.tool(&["delete", BUCKET, &point]);
    // moto answers a single delete its bucket policy denies with a bare 403, no body.
    assert!(
        d["DeleteObject"] == "AccessDenied" || d["DeleteObject"] == "403",
        "{d:#}"
    );
    assert_eq!(d["DeleteObjects"], "AccessDenied", "{d:#}");
    assert_eq!(d["still_there"], true, "{d:#}");
}
