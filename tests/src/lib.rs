//! Harness for end-to-end tests: run the real `bkimg` binary, build disk images with the
//! real tools, attach them to loop devices and mount them read-only to compare files.
//!
//! Tests need root (loop devices, mounts). Without root they print why and pass only when
//! not running in CI; in CI (CI=true) a missing privilege is a failure.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use tempfile::TempDir;

/// The `bkimg` binary built by cargo next to this test executable.
pub fn bkimg_path() -> PathBuf {
    if let Some(p) = std::env::var_os("BKIMG_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/bkimg
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("bkimg");
    assert!(
        bin.is_file(),
        "{} not found: build it first (cargo build -p bkimg)",
        bin.display()
    );
    bin
}

/// Whether privileged tests can run; panics in CI when they cannot.
pub fn require_root() -> bool {
    let root = nix_is_root();
    if !root {
        if std::env::var_os("CI").is_some() {
            panic!("these tests need root (loop devices, mounts) and CI must run them");
        }
        eprintln!("skipping: needs root for loop devices and mounts");
    }
    root
}

fn nix_is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Result of running bkimg.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs bkimg with `args`; stdin is /dev/null.
pub fn bkimg(args: &[&str]) -> Run {
    let out = Command::new(bkimg_path())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("spawning bkimg");
    to_run(out)
}

/// Runs bkimg with `args` and its own client state directory (what it saw of protected
/// repositories, spec/format.md §18.9), no key or repository from the environment.
pub fn bkimg_state(state: &Path, args: &[&str]) -> Run {
    let out = Command::new(bkimg_path())
        .args(args)
        .env("BKIMG_STATE_DIR", state)
        .env_remove("BKIMG_PASSWORD_FILE")
        .env_remove("BKIMG_KEY_FILE")
        .env_remove("BKIMG_REPOSITORY")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("spawning bkimg");
    to_run(out)
}

/// Runs bkimg and asserts it succeeded.
pub fn bkimg_ok(args: &[&str]) -> Run {
    let r = bkimg(args);
    assert_eq!(
        r.code, 0,
        "bkimg {args:?} failed with {}:\n{}\n{}",
        r.code, r.stdout, r.stderr
    );
    r
}

fn to_run(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a tool and returns its stdout; panics with its stderr on failure.
pub fn sh(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool and returns (exit code, stdout+stderr) without asserting.
pub fn sh_status(tool: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A loop device, detached on drop. This machine's loop driver does not scan partitions:
/// attach a partition with `offset`/`size`.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn attach(image: &Path, offset: u64, size: Option<u64>, read_only: bool) -> Loop {
        let offset_s = offset.to_string();
        let size_s = size.map(|s| s.to_string());
        let mut args = vec!["-f", "--show", "--offset", &offset_s];
        if let Some(s) = &size_s {
            args.extend(["--sizelimit", s]);
        }
        if read_only {
            args.push("-r");
        }
        args.push(p(image));
        let dev = sh("losetup", &args).trim().to_string();
        Loop { dev }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A mount, unmounted on drop.
pub struct Mount {
    pub dir: TempDir,
}

impl Mount {
    pub fn new(dev: &str, options: &str) -> Mount {
        let dir = TempDir::new().expect("mount point");
        sh("mount", &["-o", options, dev, p(dir.path())]);
        Mount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Busy for a moment when another test thread forks while this one has a file of
        // the mount open: the child holds a copy of the descriptor until its exec closes
        // it. On a loaded machine that moment can be long; a mount left behind would hold
        // its loop device and make the next capture of the image refuse it as in use.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !Command::new("umount")
            .arg(self.dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && std::time::Instant::now() < until
        {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// One line per file: path, type, mode, owner, size, mtime, SHA-256 (or link target).
/// Two trees are equal when their listings are equal.
pub fn tree_listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        if rel == "lost+found" {
            continue;
        }
        let m = fs::symlink_metadata(&path).expect("metadata");
        let common = format!(
            "{rel} mode={:o} uid={} gid={} mtime={}.{}",
            m.permissions().mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec()
        );
        if m.file_type().is_symlink() {
            out.push(format!(
                "{common} link={}",
                fs::read_link(&path).unwrap().display()
            ));
        } else if m.is_dir() {
            out.push(format!("{common} dir"));
            walk(root, &path, out);
        } else {
            out.push(format!(
                "{common} size={} sha256={}",
                m.len(),
                sha256_file(&path)
            ));
        }
    }
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = fs::File::open(path).expect("open for hashing");
    std::io::copy(&mut f, &mut h).expect("hashing");
    hex::encode(h.finalize())
}

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("creating image");
}

pub const MIB: u64 = 1 << 20;
/// bkimg's default chunk size.
pub const CHUNK: u64 = 256 * 1024;

/// Deterministic incompressible bytes, distinct per seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A raw image of noise that no partition-table probe mistakes for an MBR.
pub fn noise_image(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut data = noise(len as usize, seed);
    data[510] = 0;
    data[511] = 0;
    fs::write(path, &data).expect("writing noise image");
    data
}

/// `bkimg standby keygen --dir DIR/NAME`: the key directory and its certificate's
/// fingerprint.
pub fn standby_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let fp = bkimg_ok(&["standby", "keygen", "--dir", p(&key)])
        .stdout
        .trim()
        .to_string();
    (key, fp)
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all_at(data, offset).expect("writing");
    f.sync_all().expect("sync");
}

/// `bkimg capture --json --quiet ARGS...`, which must succeed.
pub fn capture_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["capture", "--json", "--quiet"];
    all.extend_from_slice(args);
    bkimg_ok(&all).json()
}

/// `bkimg restore --repo REPO ID --target TARGET --quiet`, which must succeed.
pub fn restore_to(repo: &Path, id: &str, target: &Path) {
    bkimg_ok(&[
        "restore",
        "--repo",
        p(repo),
        id,
        "--target",
        p(target),
        "--quiet",
    ]);
}

/// `bkimg list --json` as a vector of restore points.
pub fn list_json(repo: &Path) -> Vec<serde_json::Value> {
    bkimg_ok(&["list", "--repo", p(repo), "--json"])
        .json()
        .as_array()
        .expect("list --json gives an array")
        .clone()
}

pub fn u(v: &serde_json::Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned number: {v}"))
}

/// Regular files below `dir`, recursively.
pub fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("reading dir") {
            let e = e.expect("dir entry");
            if e.file_type().expect("file type").is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// The s3s-fs binary: $S3S_FS (set by .ci/test), else built and cached by
/// .ci/install-s3s-fs.
pub fn s3s_fs() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return PathBuf::from(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/install-s3s-fs");
    let out = Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("s3s-fs")
}
