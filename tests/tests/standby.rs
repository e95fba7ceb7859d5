//! Replication to a standby host, end to end: the standby (`bkimg standby serve`) runs in a
//! network namespace made by each test, reached from the root namespace over a veth pair;
//! faults are real (nft packet loss, tc tbf bandwidth limit, the link set down, the
//! standby killed with SIGKILL). Every case must converge to a replica byte-identical to
//! the source disk, and a restore from the standby's repository byte-identical too.
//!
//! Needs root (namespaces, nft, tc). Helpers live in this file.

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bkimg_tests::{
    bkimg, bkimg_ok, bkimg_path, bkimg_state, noise, p, require_root, sh, sha256_file, write_at,
    Run, TempDir, CHUNK, MIB,
};
use serde_json::Value;

const PORT: u16 = 7070;

// ------------------------------------------------------------------------------------------
// Network namespace with a veth pair, torn down on drop.

struct Net {
    ns: String,
    host_if: String,
    ns_if: String,
    host_ip: String,
    ns_ip: String,
}

impl Net {
    /// A namespace and a /30 from 198.18.0.0/15 unique to this process and call.
    fn new() -> Net {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{}", pid % 0xfffff, n);
        let slot = ((pid % 2048) * 16 + n) % 32768;
        let base = (198u32 << 24) | (18 << 16) | (slot * 4);
        let ip = |x: u32| {
            let a = base + x;
            format!(
                "{}.{}.{}.{}",
                a >> 24,
                (a >> 16) & 255,
                (a >> 8) & 255,
                a & 255
            )
        };
        let net = Net {
            ns: format!("bksb{tag}"),
            host_if: format!("bkh{tag}"),
            ns_if: format!("bkn{tag}"),
            host_ip: ip(1),
            ns_ip: ip(2),
        };
        sh("ip", &["netns", "add", &net.ns]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &net.ns_if,
            ],
        );
        sh("ip", &["link", "set", &net.ns_if, "netns", &net.ns]);
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", net.host_ip),
                "dev",
                &net.host_if,
            ],
        );
        sh("ip", &["link", "set", &net.host_if, "up"]);
        net.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", net.ns_ip),
            "dev",
            &net.ns_if,
        ]);
        net.exec(&["ip", "link", "set", &net.ns_if, "up"]);
        net.exec(&["ip", "link", "set", "lo", "up"]);
        net
    }

    /// Runs a command inside the namespace; it must succeed.
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.ns];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    fn url(&self) -> String {
        format!("bkimg://{}:{PORT}", self.ns_ip)
    }

    /// Drops `percent` % of packets both ways inside the namespace (nft numgen).
    fn loss(&self, percent: u32) {
        let n = percent.to_string();
        self.exec(&["nft", "add", "table", "inet", "bkloss"]);
        for (chain, hook) in [("i", "input"), ("o", "output")] {
            let spec = format!("{{ type filter hook {hook} priority 0 ; }}");
            self.exec(&["nft", "add", "chain", "inet", "bkloss", chain, &spec]);
            self.exec(&[
                "nft", "add", "rule", "inet", "bkloss", chain, "numgen", "random", "mod", "100",
                "<", &n, "counter", "drop",
            ]);
        }
    }

    /// Packets the loss rules dropped so far.
    fn dropped(&self) -> u64 {
        let out = self.exec(&["nft", "list", "table", "inet", "bkloss"]);
        out.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }

    /// Limits what the host sends to the standby (tc tbf on the host's end).
    fn rate(&self, rate: &str) {
        sh(
            "tc",
            &[
                "qdisc",
                "add",
                "dev",
                &self.host_if,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kbit",
                "latency",
                "500ms",
            ],
        );
    }

    /// Sets the standby's end of the link down or up. (Not the host's end: with it down,
    /// the host would route the standby's address to its default gateway.)
    fn link(&self, up: bool) {
        self.exec(&[
            "ip",
            "link",
            "set",
            &self.ns_if,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth, which deletes both ends.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

// ------------------------------------------------------------------------------------------
// Keys, the standby process, the client.

struct Keys {
    client: PathBuf,
    server: PathBuf,
    client_fp: String,
    server_fp: String,
}

fn keys(dir: &Path) -> Keys {
    let client = dir.join("client-key");
    let server = dir.join("standby-key");
    let client_fp = bkimg_ok(&["standby", "keygen", "--dir", p(&client)])
        .stdout
        .trim()
        .to_string();
    let server_fp = bkimg_ok(&["standby", "keygen", "--dir", p(&server)])
        .stdout
        .trim()
        .to_string();
    assert_eq!(client_fp.len(), 64, "{client_fp}");
    Keys {
        client,
        server,
        client_fp,
        server_fp,
    }
}

/// `bkimg standby serve` inside the namespace, killed (SIGKILL) on drop.
struct Standby {
    child: Option<Child>,
    log: PathBuf,
    repo: PathBuf,
    /// The first (or only) replica.
    replica: PathBuf,
}

impl Standby {
    /// With one replica, `DIR/replica.img` (`--replica TARGET`).
    fn start(net: &Net, k: &Keys, dir: &Path, env: &[(&str, &str)]) -> Standby {
        Standby::start_with(net, k, dir, env, &[("", "replica.img")])
    }

    /// With `--replica DISK=DIR/FILE` for each (DISK, FILE); DISK "" gives `--replica
    /// DIR/FILE`.
    fn start_with(
        net: &Net,
        k: &Keys,
        dir: &Path,
        env: &[(&str, &str)],
        replicas: &[(&str, &str)],
    ) -> Standby {
        let repo = dir.join("standby-repo");
        let replica = dir.join(replicas[0].1);
        let log = dir.join("standby.log");
        let seen = fs::metadata(&log).map(|m| m.len() as usize).unwrap_or(0);
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let listen = format!("{}:{PORT}", net.ns_ip);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net.ns])
            .arg(bkimg_path())
            .args(["standby", "serve", "--listen", &listen, "--repo"])
            .arg(&repo);
        for (disk, file) in replicas {
            let target = dir.join(file);
            cmd.arg("--replica").arg(if disk.is_empty() {
                target.into_os_string()
            } else {
                format!("{disk}={}", target.display()).into()
            });
        }
        cmd.arg("--key")
            .arg(&k.server)
            .args(["--allow", &k.client_fp, "--timeout", "10"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting the standby");
        let s = Standby {
            child: Some(child),
            log,
            repo,
            replica,
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        while !s
            .log_text()
            .get(seen..)
            .unwrap_or("")
            .contains("listening on")
        {
            assert!(
                Instant::now() < deadline,
                "standby did not start:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn status(&self) -> Value {
        bkimg_ok(&["standby", "status", "--repo", p(&self.repo), "--json"]).json()
    }

    /// Waits until the standby's log has a line containing `text` (the journal says
    /// "applied" before the log line about it is written).
    fn wait_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !self.log_text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the standby's log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the replica holds `id` with no apply running.
    fn wait_applied(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let s = self.status();
            if s["applied"] == id && s["apply_state"] == "idle" {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "replica never reached {id}: {s}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.kill();
    }
}

fn replicate_args<'a>(
    repo: &'a str,
    net_url: &'a str,
    k: &'a Keys,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "replicate",
        "--repo",
        repo,
        "--to",
        net_url,
        "--key",
        p(&k.client),
        "--server-fingerprint",
        &k.server_fp,
        "--json",
        "--quiet",
    ];
    a.extend_from_slice(extra);
    a
}

fn replicate(repo: &Path, net: &Net, k: &Keys, extra: &[&str]) -> Run {
    let url = net.url();
    bkimg(&replicate_args(p(repo), &url, k, extra))
}

fn replicate_ok(repo: &Path, net: &Net, k: &Keys, extra: &[&str]) -> Value {
    let r = replicate(repo, net, k, extra);
    assert_eq!(r.code, 0, "replicate failed:\n{}\n{}", r.stdout, r.stderr);
    r.json()
}

/// Starts `bkimg replicate` without waiting for it.
fn replicate_spawn(repo: &Path, net: &Net, k: &Keys, extra: &[&str]) -> Child {
    let url = net.url();
    Command::new(bkimg_path())
        .args(replicate_args(p(repo), &url, k, extra))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning bkimg replicate")
}

fn finish(child: Child) -> Run {
    let out = child.wait_with_output().expect("waiting for bkimg");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ------------------------------------------------------------------------------------------
// Source disks.

/// A GPT disk of incompressible data (two partitions, captured raw): `size` bytes.
fn gpt_disk(path: &Path, size: u64, seed: u64) {
    fs::write(path, noise(size as usize, seed)).unwrap();
    sh(
        "sgdisk",
        &["-o", "-n", "1:2048:+12M", "-n", "2:0:0", p(path)],
    );
}

fn capture(repo: &Path, disk: &Path, parent: bool) -> String {
    capture_disks(repo, &[disk], parent)
}

/// One restore point of several disks (disk0, disk1, ... in this order).
fn capture_disks(repo: &Path, disks: &[&Path], parent: bool) -> String {
    let mut a = vec!["capture", "--json", "--quiet", "--repo", p(repo)];
    if parent {
        a.extend(["--parent", "latest"]);
    }
    a.extend(disks.iter().map(|d| p(d)));
    let v = bkimg_ok(&a).json();
    v["id"]
        .as_str()
        .or_else(|| v["point"]["id"].as_str())
        .or_else(|| v["manifest"]["id"].as_str())
        .unwrap_or_else(|| panic!("capture JSON without an id: {v}"))
        .to_string()
}

fn mtime(path: &Path) -> std::time::SystemTime {
    fs::metadata(path).unwrap().modified().unwrap()
}

fn same_file(a: &Path, b: &Path) -> bool {
    let (ma, mb) = (fs::metadata(a), fs::metadata(b));
    if ma.map(|m| m.len()).ok() != mb.map(|m| m.len()).ok() {
        return false;
    }
    sha256_file(a) == sha256_file(b)
}

fn assert_same(a: &Path, b: &Path, what: &str) {
    assert!(
        same_file(a, b),
        "{what}: {} and {} differ",
        a.display(),
        b.display()
    );
}

/// Restores `id` from `repo` to a new image and compares it with `expected`.
fn assert_restores_to(repo: &Path, id: &str, expected: &Path, scratch: &Path) {
    let out = scratch.join(format!("restore-{id}.img"));
    let _ = fs::remove_file(&out);
    bkimg_ok(&[
        "restore",
        "--repo",
        p(repo),
        id,
        "--target",
        p(&out),
        "--quiet",
    ]);
    assert_same(
        &out,
        expected,
        &format!("restore of {id} from {}", repo.display()),
    );
    fs::remove_file(&out).unwrap();
}

/// Changes `n` whole chunks (at distinct chunk indexes) of `disk`, inside partition 2.
fn change_chunks(disk: &Path, first: u64, n: u64, seed: u64) {
    for i in 0..n {
        write_at(
            disk,
            (first + i * 3) * CHUNK,
            &noise(CHUNK as usize, seed + i),
        );
    }
}

fn setup() -> Option<(TempDir, Net, Keys)> {
    if !require_root() {
        return None;
    }
    let dir = TempDir::new().unwrap();
    let net = Net::new();
    let k = keys(dir.path());
    Some((dir, net, k))
}

// ------------------------------------------------------------------------------------------

/// (a) + (b): full then incremental; the standby repository verifies, the replica and a
/// restore from the standby equal the source, and the incremental writes to the replica
/// only the chunks that changed.
#[test]
fn round_trip_full_and_incremental_writes_only_changed_chunks() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 40 * MIB, 1);
    let full = capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);

    let r = replicate_ok(&src, &net, &k, &[]);
    assert_eq!(r["points_sent"][0], full.as_str(), "{r}");
    assert_eq!(r["target"], net.url());
    assert!(r["chunks_sent"].as_u64().unwrap() >= 160, "{r}");
    let s = sb.wait_applied(&full);
    assert_eq!(s["last_apply"]["mode"], "full", "{s}");
    assert_same(&sb.replica, &disk, "replica after the full");

    // Incremental: 5 chunks change.
    change_chunks(&disk, 60, 5, 100);
    let inc = capture(&src, &disk, true);
    let r = replicate_ok(&src, &net, &k, &[]);
    assert_eq!(r["points_sent"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["points_present"], 1, "{r}");
    assert_eq!(r["chunks_sent"], 5, "only the new chunks travel: {r}");
    let s = sb.wait_applied(&inc);
    assert_eq!(s["last_apply"]["mode"], "changed-chunks", "{s}");
    assert_eq!(
        s["last_apply"]["chunks_written"], 5,
        "only the changed chunks are written to the replica: {s}"
    );
    assert_eq!(s["last_apply"]["from"], full.as_str());
    sb.wait_log("5 changed chunks written");
    assert!(
        !sb.log_text().contains("instead of applying the changes"),
        "{}",
        sb.log_text()
    );
    assert_same(&sb.replica, &disk, "replica after the incremental");

    // Nothing left to send: a rerun sends nothing.
    let r = replicate_ok(&src, &net, &k, &[]);
    assert_eq!(r["chunks_sent"], 0, "{r}");
    assert_eq!(r["points_present"], 2, "{r}");

    bkimg_ok(&["verify", "--repo", p(&sb.repo)]);
    assert_restores_to(&sb.repo, &inc, &disk, d);
    assert_restores_to(&src, &inc, &sb.replica, d);
}

/// (c): 7 % packet loss both ways and a 60 Mbit/s link; then an incremental under
/// --bwlimit takes at least as long as the limit implies.
#[test]
fn lossy_slow_link_converges() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 24 * MIB, 2);
    capture(&src, &disk, false);
    net.loss(7);
    net.rate("60mbit");
    let sb = Standby::start(&net, &k, d, &[]);
    let r = replicate_ok(&src, &net, &k, &["--timeout", "20"]);
    sb.wait_applied(r["points_sent"][0].as_str().unwrap());
    assert_same(&sb.replica, &disk, "replica over a lossy link");
    assert!(net.dropped() > 0, "the loss rules dropped nothing");

    change_chunks(&disk, 50, 8, 200); // 2 MiB
    let inc = capture(&src, &disk, true);
    let t = Instant::now();
    let r = replicate_ok(&src, &net, &k, &["--bwlimit", "1M", "--timeout", "20"]);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r["chunks_sent"], 8, "{r}");
    assert!(secs >= 1.5, "2 MiB at 1 MiB/s took only {secs:.2} s");
    sb.wait_applied(&inc);
    assert_same(&sb.replica, &disk, "replica after the incremental");
    bkimg_ok(&["verify", "--repo", p(&sb.repo)]);
}

/// (d): the link goes down mid-transfer for longer than the client's timeout, then comes
/// back: the client retries and finishes (or a rerun does).
#[test]
fn link_cut_mid_transfer_resumes() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 32 * MIB, 3);
    let id = capture(&src, &disk, false);
    net.rate("40mbit"); // ~7 s for 32 MiB
    let sb = Standby::start(&net, &k, d, &[]);
    let client = replicate_spawn(&src, &net, &k, &["--timeout", "3", "--retries", "6"]);
    std::thread::sleep(Duration::from_secs(2));
    net.link(false);
    std::thread::sleep(Duration::from_secs(5));
    net.link(true);
    let r = finish(client);
    if r.code != 0 {
        assert_eq!(r.code, 9, "{}", r.stderr);
        assert!(
            r.stderr.contains("run the same command again"),
            "{}",
            r.stderr
        );
        replicate_ok(&src, &net, &k, &[]);
    } else {
        assert!(
            r.stderr.contains("retrying"),
            "the cut went unnoticed:\n{}",
            r.stderr
        );
    }
    sb.wait_applied(&id);
    assert_same(&sb.replica, &disk, "replica after the cut");
    bkimg_ok(&["verify", "--repo", p(&sb.repo)]);
}

/// (e): the standby is killed (SIGKILL) mid-transfer, then mid-apply; status reports the
/// interrupted apply, a restart finishes it, and a rerun converges.
#[test]
fn standby_killed_mid_transfer_and_mid_apply() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 32 * MIB, 4);
    let full = capture(&src, &disk, false);
    net.rate("40mbit");
    let mut sb = Standby::start(&net, &k, d, &[]);

    // Mid-transfer: the client gives up (exit 9) and says how to resume.
    let client = replicate_spawn(&src, &net, &k, &["--timeout", "2", "--retries", "1"]);
    std::thread::sleep(Duration::from_secs(3));
    sb.kill();
    let r = finish(client);
    assert_eq!(r.code, 9, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("run the same command again"),
        "{}",
        r.stderr
    );
    let stored = sb.log_text();
    drop(sb);

    let sb = Standby::start(&net, &k, d, &[]);
    let r = replicate_ok(&src, &net, &k, &[]);
    assert!(
        r["chunks_present"].as_u64().unwrap() > 0,
        "what arrived before the kill is not sent again: {r}\n{stored}"
    );
    sb.wait_applied(&full);
    assert_same(&sb.replica, &disk, "replica after the kill mid-transfer");
    drop(sb);

    // Mid-apply: the apply pauses after its first chunk (a test hook that creates
    // `paused` there); kill the standby there.
    let paused = d.join("paused");
    let hook = format!("apply-first-chunk:{}", paused.display());
    let mut sb = Standby::start(&net, &k, d, &[("BKIMG_TEST_PAUSE", hook.as_str())]);
    let before = d.join("before.img");
    fs::copy(&disk, &before).unwrap();
    change_chunks(&disk, 60, 6, 300);
    let inc = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !paused.exists() {
        assert!(
            Instant::now() < deadline,
            "the apply never reached its pause point (built without --features \
             bkimg/test-hooks?)\n{}",
            sb.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = sb.status();
    assert!(
        s["apply_state"] == "in progress" && s["applying"]["id"] == inc.as_str(),
        "{s}"
    );
    sb.kill();
    let s = sb.status();
    assert_eq!(s["apply_state"], "interrupted", "{s}");
    assert_eq!(s["applied"], full.as_str(), "{s}");
    let text = bkimg_ok(&["standby", "status", "--repo", p(&sb.repo)]).stdout;
    assert!(text.contains("apply interrupted"), "{text}");
    assert!(
        !same_file(&sb.replica, &disk) && !same_file(&sb.replica, &before),
        "the replica should be half-applied"
    );
    drop(sb);

    let sb = Standby::start(&net, &k, d, &[]);
    // Finished before anything else: by the time it listens.
    let s = sb.status();
    assert_eq!(s["applied"], inc.as_str(), "{s}\n{}", sb.log_text());
    assert_eq!(s["apply_state"], "idle", "{s}");
    assert!(
        sb.log_text().contains("finished the interrupted apply"),
        "{}",
        sb.log_text()
    );
    assert_same(&sb.replica, &disk, "replica after the interrupted apply");
    // The chunk written before the kill may be sampled: it reads as the new point has it,
    // which is no reason to distrust the replica.
    assert_eq!(s["last_apply"]["mode"], "changed-chunks", "{s}");
    bkimg_ok(&["verify", "--repo", p(&sb.repo)]);
}

/// (f): a client with a key the standby does not allow, a plain TCP client sending
/// garbage, and a client pinning the wrong server fingerprint are all refused.
#[test]
fn unauthenticated_peers_are_refused_and_logged() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 16 * MIB, 5);
    capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);

    // Wrong client key.
    let stranger = d.join("stranger-key");
    let stranger_fp = bkimg_ok(&["standby", "keygen", "--dir", p(&stranger)])
        .stdout
        .trim()
        .to_string();
    let url = net.url();
    let r = bkimg(&[
        "replicate",
        "--repo",
        p(&src),
        "--to",
        &url,
        "--key",
        p(&stranger),
        "--server-fingerprint",
        &k.server_fp,
    ]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(r.stderr.contains("refused our key"), "{}", r.stderr);

    // Plain TCP with garbage.
    let mut tcp = TcpStream::connect((net.ns_ip.as_str(), PORT)).unwrap();
    std::io::Write::write_all(&mut tcp, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf);
    assert!(
        !buf.windows(4).any(|w| w == b"HTTP"),
        "answered in plain text"
    );

    // Wrong pinned fingerprint (the client's own, say).
    let r = bkimg(&[
        "replicate",
        "--repo",
        p(&src),
        "--to",
        &url,
        "--key",
        p(&k.client),
        "--server-fingerprint",
        &k.client_fp,
    ]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(r.stderr.contains("not the pinned"), "{}", r.stderr);

    std::thread::sleep(Duration::from_millis(300));
    let log = sb.log_text();
    let host = &net.host_ip;
    assert!(
        log.lines().any(|l| l.contains("refused")
            && l.contains(host.as_str())
            && l.contains(&stranger_fp)),
        "the refused key is not logged:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("refused") && l.contains("presented no certificate")),
        "the garbage connection is not logged:\n{log}"
    );
    assert!(sb.status()["points"].as_array().unwrap().is_empty());
    assert!(!sb.replica.exists());

    // An authenticated client with a damaged chunk: the standby checks every blob and
    // refuses it; the client reports damage (exit 3) and nothing is committed.
    let chunk = fs::read_dir(src.join("chunks"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .next()
        .expect("a stored chunk");
    let mut bytes = fs::read(&chunk).unwrap();
    bytes[100] ^= 0x55;
    fs::write(&chunk, &bytes).unwrap();
    let r = replicate(&src, &net, &k, &[]);
    assert_eq!(r.code, 3, "{}\n{}", r.stderr, sb.log_text());
    assert!(r.stderr.contains("refused"), "{}", r.stderr);
    assert!(sb.status()["points"].as_array().unwrap().is_empty());
    assert!(!sb.replica.exists());
}

/// (g): after promote, new points are still received but not applied; the replica stays
/// equal to the last applied point.
#[test]
fn promote_stops_applying() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 16 * MIB, 6);
    let full = capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&full);
    let kept = d.join("kept.img");
    fs::copy(&disk, &kept).unwrap();

    let s = bkimg_ok(&["standby", "promote", "--repo", p(&sb.repo), "--json"]).json();
    assert_eq!(s["promoted"], true, "{s}");
    assert_eq!(s["applied"], full.as_str(), "{s}");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !sb.log_text().contains("promoted: not applying") {
        assert!(Instant::now() < deadline, "{}", sb.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }

    change_chunks(&disk, 40, 3, 400);
    let inc = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    std::thread::sleep(Duration::from_secs(4));
    let s = sb.status();
    assert_eq!(s["latest"], inc.as_str(), "{s}");
    assert_eq!(s["applied"], full.as_str(), "{s}");
    assert_same(&sb.replica, &kept, "promoted replica");
    assert_restores_to(&sb.repo, &full, &sb.replica, d);
}

/// (h): a restore point of two disks goes to two replicas, one per disk
/// (`--replica disk0=... --replica disk1=...`): the first apply restores both whole; an
/// incremental that changed one disk writes that disk's changed chunks and leaves the
/// other replica unwritten; a point of one disk only is reported and not applied (not
/// half-applied either); the next point of both disks is applied again.
#[test]
fn two_disks_to_two_replicas() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk0, disk1, src) = (d.join("disk0.img"), d.join("disk1.img"), d.join("src-repo"));
    gpt_disk(&disk0, 32 * MIB, 21);
    gpt_disk(&disk1, 24 * MIB, 22);
    let full = capture_disks(&src, &[&disk0, &disk1], false);
    let sb = Standby::start_with(
        &net,
        &k,
        d,
        &[],
        &[("disk0", "replica0.img"), ("disk1", "replica1.img")],
    );
    let (r0, r1) = (d.join("replica0.img"), d.join("replica1.img"));
    let s = sb.status();
    assert_eq!(s["replicas"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["replicas"][1]["disk"], "disk1", "{s}");
    assert_eq!(s["replicas"][1]["target"], p(&r1), "{s}");

    replicate_ok(&src, &net, &k, &[]);
    let s = sb.wait_applied(&full);
    assert_eq!(s["last_apply"]["mode"], "full", "{s}");
    assert_eq!(s["last_apply"]["disks"].as_array().unwrap().len(), 2, "{s}");
    for i in 0..2 {
        assert_eq!(s["replicas"][i]["holds"], full.as_str(), "{s}");
    }
    assert_same(&r0, &disk0, "replica of disk0 after the full");
    assert_same(&r1, &disk1, "replica of disk1 after the full");

    // Incremental: 4 chunks of disk0 change, disk1 does not.
    let r1_written = mtime(&r1);
    change_chunks(&disk0, 60, 4, 500);
    let inc = capture_disks(&src, &[&disk0, &disk1], true);
    let r = replicate_ok(&src, &net, &k, &[]);
    assert_eq!(r["chunks_sent"], 4, "{r}");
    let s = sb.wait_applied(&inc);
    let last = &s["last_apply"];
    assert_eq!(last["mode"], "changed-chunks", "{s}");
    assert_eq!(last["chunks_written"], 4, "{s}");
    assert_eq!(last["bytes_written"], 4 * CHUNK, "{s}");
    assert_eq!(last["disks"][0]["disk"], "disk0", "{s}");
    assert_eq!(last["disks"][0]["chunks_written"], 4, "{s}");
    assert_eq!(last["disks"][1]["disk"], "disk1", "{s}");
    assert_eq!(last["disks"][1]["chunks_written"], 0, "{s}");
    assert_eq!(
        mtime(&r1),
        r1_written,
        "the replica of the unchanged disk was written"
    );
    sb.wait_log(&format!("applied {inc} to 2 disks"));
    assert_same(&r0, &disk0, "replica of disk0 after the incremental");
    assert_same(&r1, &disk1, "replica of disk1 after the incremental");

    // A point of disk0 only: reported, nothing written.
    let kept0 = d.join("kept0.img");
    fs::copy(&disk0, &kept0).unwrap();
    change_chunks(&disk0, 90, 2, 600);
    let only0 = capture_disks(&src, &[&disk0], true);
    replicate_ok(&src, &net, &k, &[]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let s = loop {
        let s = sb.status();
        if s["not_applied"]["id"] == only0.as_str() {
            break s;
        }
        assert!(Instant::now() < deadline, "mismatch never reported: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s["applied"], inc.as_str(), "{s}");
    assert_eq!(s["apply_state"], "idle", "{s}");
    assert_eq!(
        s["not_applied"]["disks"],
        serde_json::json!(["disk0"]),
        "{s}"
    );
    let reason = s["not_applied"]["reason"].as_str().unwrap();
    assert!(reason.contains("disk0, disk1"), "{reason}");
    sb.wait_log("not applied");
    let text = bkimg_ok(&["standby", "status", "--repo", p(&sb.repo)]).stdout;
    assert!(text.contains("not applied: restore point"), "{text}");
    assert_same(&r0, &kept0, "replica of disk0 after a point of disk0 only");
    assert_same(&r1, &disk1, "replica of disk1 after a point of disk0 only");

    // The next point of both disks is applied (from what the replicas hold).
    change_chunks(&disk1, 60, 3, 700);
    let both = capture_disks(&src, &[&disk0, &disk1], true);
    replicate_ok(&src, &net, &k, &[]);
    let s = sb.wait_applied(&both);
    assert!(s["not_applied"].is_null(), "{s}");
    assert_eq!(s["last_apply"]["mode"], "changed-chunks", "{s}");
    assert_eq!(s["last_apply"]["disks"][0]["chunks_written"], 2, "{s}");
    assert_eq!(s["last_apply"]["disks"][1]["chunks_written"], 3, "{s}");
    assert_same(&r0, &disk0, "replica of disk0 after the last point");
    assert_same(&r1, &disk1, "replica of disk1 after the last point");

    bkimg_ok(&["verify", "--repo", p(&sb.repo)]);
    let (out0, out1) = (d.join("restore0.img"), d.join("restore1.img"));
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&sb.repo),
        &both,
        "--target",
        &format!("disk0={}", out0.display()),
        "--target",
        &format!("disk1={}", out1.display()),
        "--quiet",
    ]);
    assert_same(&out0, &disk0, "disk0 restored from the standby");
    assert_same(&out1, &disk1, "disk1 restored from the standby");
}

/// (i): promote, write to the promoted replica (as booting it would), undo with
/// `standby demote`: refused without --yes when not asked on a terminal; with --yes the
/// running standby restores the latest point whole over the replica, then applies the
/// next point as usual.
#[test]
fn promote_undo_resumes_applying() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 16 * MIB, 23);
    let full = capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&full);
    let text = bkimg_ok(&["standby", "status", "--repo", p(&sb.repo)]).stdout;
    assert!(text.contains("promoted: no"), "{text}");

    bkimg_ok(&["standby", "promote", "--repo", p(&sb.repo)]);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !sb.log_text().contains("promoted: not applying") {
        assert!(Instant::now() < deadline, "{}", sb.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = bkimg_ok(&["standby", "status", "--repo", p(&sb.repo)]).stdout;
    assert!(text.contains("promoted: yes, since "), "{text}");
    write_at(&sb.replica, 20 * CHUNK, &noise(CHUNK as usize, 800));
    assert!(!same_file(&sb.replica, &disk));

    // Not confirmed (stdin is not a terminal): refused, still promoted.
    let r = bkimg(&["standby", "demote", "--repo", p(&sb.repo)]);
    assert_eq!(r.code, 5, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("add --yes"), "{}", r.stderr);
    assert!(r.stderr.contains("overwrites"), "{}", r.stderr);
    assert_eq!(sb.status()["promoted"], true);

    let s = bkimg_ok(&[
        "standby",
        "demote",
        "--repo",
        p(&sb.repo),
        "--yes",
        "--json",
    ])
    .json();
    assert_eq!(s["promoted"], false, "{s}");
    assert!(
        s["applied"].is_null(),
        "the replica is not trusted any more: {s}"
    );
    let text = bkimg_ok(&["standby", "status", "--repo", p(&sb.repo)]).stdout;
    assert!(text.contains("promoted: no"), "{text}");
    let s = sb.wait_applied(&full);
    assert_eq!(s["last_apply"]["mode"], "full", "{s}");
    sb.wait_log("promotion undone");
    assert_same(&sb.replica, &disk, "replica after demote");

    change_chunks(&disk, 40, 3, 900);
    let inc = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    let s = sb.wait_applied(&inc);
    assert_eq!(s["last_apply"]["mode"], "changed-chunks", "{s}");
    assert_eq!(s["last_apply"]["chunks_written"], 3, "{s}");
    assert_same(&sb.replica, &disk, "replica after the next point");

    // Demoting what is not promoted changes nothing.
    let r = bkimg_ok(&["standby", "demote", "--repo", p(&sb.repo)]);
    assert!(r.stderr.contains("not promoted"), "{}", r.stderr);
    assert_eq!(sb.status()["applied"], inc.as_str());
}

/// Retention on both ends: a point whose parent was pruned at the source before it was
/// ever shipped arrives with that parent's prune record (the standby stores it and commits
/// the point); the replica is brought from the point it held by changed chunks only; then
/// `bkimg prune` on the standby's repository (between sessions) keeps the point the
/// replica holds, and everything still verifies and restores.
#[test]
fn pruned_parents_travel_as_records_and_the_standby_prunes_itself() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 40 * MIB, 3);
    let p1 = capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&p1);

    change_chunks(&disk, 60, 2, 300);
    let p2 = capture(&src, &disk, true);
    change_chunks(&disk, 90, 3, 400);
    let p3 = capture(&src, &disk, true);
    // p2 goes before it is shipped; p3 names it as parent.
    let pruned = bkimg_ok(&[
        "prune",
        "--repo",
        p(&src),
        "--keep-last",
        "1",
        "--keep",
        &p1,
        "--json",
    ])
    .json();
    assert_eq!(pruned["removed"][0]["id"], p2.as_str(), "{pruned}");

    let r = replicate_ok(&src, &net, &k, &[]);
    assert_eq!(r["points_sent"], serde_json::json!([p3]), "{r}");
    assert_eq!(r["chunks_sent"], 5, "{r}");
    assert!(sb.repo.join("pruned").join(&p2).is_file());
    let s = sb.wait_applied(&p3);
    assert_eq!(s["last_apply"]["mode"], "changed-chunks", "{s}");
    assert_eq!(s["last_apply"]["from"], p1.as_str(), "{s}");
    assert_eq!(s["last_apply"]["chunks_written"], 5, "{s}");
    assert_same(&sb.replica, &disk, "replica after the pruned chain");
    bkimg_ok(&["verify", "--repo", p(&sb.repo)]);

    // Both ends keep the newest only (a point pruned only on the standby would be shipped
    // again: the source ships whatever the target lacks). The replica holds the newest, so
    // nothing it needs goes.
    bkimg_ok(&["prune", "--repo", p(&src), "--keep-last", "1"]);
    let there = bkimg_ok(&[
        "prune",
        "--repo",
        p(&sb.repo),
        "--keep-last",
        "1",
        "--wait",
        "--json",
    ])
    .json();
    assert_eq!(there["removed"][0]["id"], p1.as_str(), "{there}");
    assert_eq!(there["kept"][0]["id"], p3.as_str(), "{there}");
    bkimg_ok(&["verify", "--repo", p(&sb.repo)]);
    assert_restores_to(&sb.repo, &p3, &disk, d);

    // The next point is still applied by changed chunks (from p3, which stayed).
    change_chunks(&disk, 120, 1, 500);
    let p4 = capture(&src, &disk, true);
    let r = replicate_ok(&src, &net, &k, &[]);
    assert_eq!(r["points_sent"], serde_json::json!([p4]), "{r}");
    let s = sb.wait_applied(&p4);
    assert_eq!(s["last_apply"]["mode"], "changed-chunks", "{s}");
    assert_same(&sb.replica, &disk, "replica after pruning on the standby");
}

// ------------------------------------------------------------------------------------------
// Reading a standby's repository (protocol version 2: `--repo bkimg://HOST:PORT`). These
// run the standby on 127.0.0.1 (no namespace: no faults are injected into the network).

/// `bkimg standby serve` on 127.0.0.1 without a replica, killed (SIGKILL) on drop; the
/// repository is `DIR/standby-repo`.
struct LocalStandby {
    child: Option<Child>,
    log: PathBuf,
    repo: PathBuf,
    port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl LocalStandby {
    /// Shippers `--allow k.client_fp` and the `extra` arguments (`--allow-reader FP`...).
    fn start(dir: &Path, k: &Keys, extra: &[&str]) -> LocalStandby {
        let mut args: Vec<String> = ["--allow", &k.client_fp, "--key", p(&k.server)]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        args.extend(["--repo".into(), p(&dir.join("standby-repo")).into()]);
        // The kernel picks a free port; another process may take it before the standby
        // binds it: then try another.
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut sb = LocalStandby {
                child: None,
                log: dir.join("standby.log"),
                repo: dir.join("standby-repo"),
                port,
                args: args.clone(),
                env: Vec::new(),
            };
            if sb.launch() {
                return sb;
            }
        }
        panic!("no free port for the standby")
    }

    /// Starts the process and waits for it to listen; false if it exited (port taken).
    fn launch(&mut self) -> bool {
        let seen = fs::metadata(&self.log)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let listen = format!("127.0.0.1:{}", self.port);
        let mut cmd = Command::new(bkimg_path());
        cmd.args(["standby", "serve", "--listen", &listen])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting the standby");
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if self
                .log_text()
                .get(seen..)
                .unwrap_or("")
                .contains("listening on")
            {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "standby did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts it again on the same port after `kill`.
    fn restart(&mut self) {
        assert!(
            self.launch(),
            "the standby did not restart:\n{}",
            self.log_text()
        );
    }

    fn url(&self) -> String {
        format!("bkimg://127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Ids of the restore points in the standby's repository, read locally.
    fn ids(&self) -> Vec<String> {
        let v = bkimg_ok(&["list", "--repo", p(&self.repo), "--json"]).json();
        ids_of(&v)
    }
}

impl Drop for LocalStandby {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("list --json gives an array")
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// `bkimg ARGS --repo URL --key KEY --server-fingerprint FP` (a read command on a standby).
fn over(args: &[&str], url: &str, key: &Path, server_fp: &str) -> Run {
    let mut a = args.to_vec();
    a.extend([
        "--repo",
        url,
        "--key",
        p(key),
        "--server-fingerprint",
        server_fp,
    ]);
    bkimg(&a)
}

fn over_ok(args: &[&str], url: &str, key: &Path, server_fp: &str) -> Run {
    let r = over(args, url, key, server_fp);
    assert_eq!(
        r.code, 0,
        "bkimg {args:?} on {url} failed:\n{}\n{}",
        r.stdout, r.stderr
    );
    r
}

/// An ext4 filesystem image of 48 MiB holding 24 files of 1 MiB of noise, made by
/// `mkfs.ext4 -d` from a directory (no loop device or mount needed).
fn ext4_image(path: &Path, scratch: &Path, seed: u64) {
    let files = scratch.join(format!("files-{seed}"));
    fs::create_dir_all(files.join("data")).unwrap();
    for i in 0..24u64 {
        fs::write(
            files.join(format!("data/f{i:02}")),
            noise(MIB as usize, seed * 100 + i),
        )
        .unwrap();
    }
    fs::write(
        files.join("notes.txt"),
        b"bkimg standby read test\n".repeat(100),
    )
    .unwrap();
    bkimg_tests::sparse_file(path, 48 * MIB);
    sh(
        "mkfs.ext4",
        &[
            "-F",
            "-q",
            "-L",
            "sbread",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            p(&files),
            p(path),
        ],
    );
    fs::remove_dir_all(&files).unwrap();
}

/// A source repository with one restore point of an ext4 image, shipped to a standby on
/// 127.0.0.1 that allows a reader key: (dir, keys, reader key, its fingerprint, image,
/// source repository, point id, standby).
struct Shipped {
    dir: TempDir,
    k: Keys,
    reader: PathBuf,
    reader_fp: String,
    image: PathBuf,
    src: PathBuf,
    id: String,
    sb: LocalStandby,
}

fn shipped() -> Option<Shipped> {
    if !require_root() {
        return None;
    }
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let k = keys(d);
    let (reader, reader_fp) = bkimg_tests::standby_keygen(d, "reader-key");
    let (image, src) = (d.join("fs.img"), d.join("src-repo"));
    ext4_image(&image, d, 7);
    let id = capture(&src, &image, false);
    let sb = LocalStandby::start(d, &k, &["--allow-reader", &reader_fp]);
    let url = sb.url();
    let r = bkimg(&replicate_args(p(&src), &url, &k, &[]));
    assert_eq!(r.code, 0, "replicate failed:\n{}\n{}", r.stdout, r.stderr);
    assert_eq!(sb.ids(), [id.as_str()]);
    Some(Shipped {
        dir,
        k,
        reader,
        reader_fp,
        image,
        src,
        id,
        sb,
    })
}

/// A stored chunk file of a repository (the `n`th in name order).
fn chunk_file(repo: &Path, n: usize) -> PathBuf {
    let mut all: Vec<PathBuf> = fs::read_dir(repo.join("chunks"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    all.sort();
    all[n].clone()
}

/// list, info, verify, restore and export over bkimg:// give what they give on the
/// standby's own directory; the restored image equals the source byte for byte. The key
/// and the pinned fingerprint also come from the config file's [standby].
#[test]
fn a_reader_lists_verifies_and_restores_over_bkimg() {
    let Some(s) = shipped() else { return };
    let d = s.dir.path();
    let (url, key, sfp) = (s.sb.url(), s.reader.as_path(), s.k.server_fp.as_str());

    let remote = over_ok(&["list", "--json"], &url, key, sfp).json();
    let local = bkimg_ok(&["list", "--json", "--repo", p(&s.src)]).json();
    assert_eq!(
        remote, local,
        "list over bkimg:// differs from the source's"
    );
    let info = over_ok(&["info", "--json", "latest"], &url, key, sfp).json();
    assert_eq!(info["id"], s.id.as_str(), "{info}");
    assert_eq!(
        info["manifest"]["disks"][0]["source"],
        local[0]["disks"][0]["source"]
    );

    let r = over_ok(&["verify", "--json", "--quiet"], &url, key, sfp);
    let v = r.json();
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["chunks_checked"].as_u64().unwrap() > 90, "{v}");

    let out = d.join("restored.img");
    let r = over_ok(
        &["restore", &s.id, "--target", p(&out), "--quiet"],
        &url,
        key,
        sfp,
    );
    assert!(r.stderr.contains("restored"), "{}", r.stderr);
    assert_same(&out, &s.image, "restore over bkimg://");
    sh("e2fsck", &["-fn", p(&out)]);

    // An export over bkimg:// is a repository of its own.
    let export = d.join("point.bkimg");
    over_ok(
        &["export", "--quiet", "--output", p(&export)],
        &url,
        key,
        sfp,
    );
    assert_restores_to(&export, &s.id, &s.image, d);

    // Key and fingerprint from the config file.
    let config = d.join("bkimg.toml");
    fs::write(
        &config,
        format!(
            "[standby]\nkey = \"{}\"\nserver-fingerprint = \"{}\"\n",
            key.display(),
            sfp
        ),
    )
    .unwrap();
    let r = bkimg_ok(&["--config", p(&config), "list", "--json", "--repo", &url]);
    assert_eq!(r.json(), local);

    // The standby logged the read sessions, under the reader's key.
    let log = s.sb.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("read session") && l.contains(&s.reader_fp)),
        "{log}"
    );
    // A local reader of the standby's repository agrees.
    bkimg_ok(&["verify", "--repo", p(&s.sb.repo)]);
}

/// Only allowed keys read; a reader's key never ships (the attempt is refused and logged,
/// nothing is stored); a wrong pinned fingerprint and a standby that is down are reported
/// as such; capture and prune refuse a bkimg:// repository. The standby takes its reader
/// keys from its config file here.
#[test]
fn readers_keys_read_only_and_strangers_are_refused() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let k = keys(d);
    let (reader, reader_fp) = bkimg_tests::standby_keygen(d, "reader-key");
    let (stranger, _) = bkimg_tests::standby_keygen(d, "stranger-key");
    let (image, src) = (d.join("fs.img"), d.join("src-repo"));
    ext4_image(&image, d, 8);
    let first = capture(&src, &image, false);
    let config = d.join("standby.toml");
    fs::write(
        &config,
        format!("[standby]\nallow-reader = [\"{reader_fp}\"]\n"),
    )
    .unwrap();
    let mut sb = LocalStandby::start(d, &k, &["--config", p(&config)]);
    assert!(
        sb.log_text()
            .contains("1 client key(s) allowed to ship, 1 to read only"),
        "{}",
        sb.log_text()
    );
    let url = sb.url();
    let r = bkimg(&replicate_args(p(&src), &url, &k, &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);

    // The reader reads.
    let l = over_ok(&["list", "--json"], &url, &reader, &k.server_fp).json();
    assert_eq!(ids_of(&l), [first.as_str()]);

    // A key in neither set.
    let r = over(&["list"], &url, &stranger, &k.server_fp);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(r.stderr.contains("refused our key"), "{}", r.stderr);
    assert!(r.stderr.contains("--allow-reader"), "{}", r.stderr);

    // The wrong pinned fingerprint (the reader's own).
    let r = over(&["list"], &url, &reader, &reader_fp);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(r.stderr.contains("not the pinned"), "{}", r.stderr);

    // The reader's key cannot ship a new point.
    let second = capture(&src, &image, true);
    let r = bkimg(&[
        "replicate",
        "--repo",
        p(&src),
        "--to",
        &url,
        "--key",
        p(&reader),
        "--server-fingerprint",
        &k.server_fp,
    ]);
    assert_eq!(r.code, 8, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("may only read"), "{}", r.stderr);
    assert_eq!(
        sb.ids(),
        [first.as_str()],
        "the reader's key stored something"
    );
    let log = sb.log_text();
    assert!(
        log.lines().any(|l| l.contains("refused")
            && l.contains(&reader_fp)
            && l.contains("may only read")),
        "the refused ship attempt is not logged:\n{log}"
    );
    // The shipper's key still ships it.
    let r = bkimg(&replicate_args(p(&src), &url, &k, &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sb.ids(), [first, second]);

    // Commands that write refuse a standby, and say how to get there.
    let r = bkimg(&["capture", "--repo", &url, p(&image)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("bkimg replicate --to {url}")),
        "{}",
        r.stderr
    );
    let r = bkimg(&["prune", "--repo", &url, "--keep-last", "1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("on the standby host"), "{}", r.stderr);
    assert_eq!(sb.ids().len(), 2);

    // A standby that is down: which address, and what to check.
    sb.kill();
    let r = over(&["list", "--retries", "1"], &url, &reader, &k.server_fp);
    assert_eq!(r.code, 9, "{}", r.stderr);
    assert!(r.stderr.contains(&url["bkimg://".len()..]), "{}", r.stderr);
    assert!(r.stderr.contains("bkimg standby serve"), "{}", r.stderr);
}

/// A chunk damaged and another deleted in the standby's repository: verify and restore
/// over bkimg:// find them (the reader checks every blob itself) and name them.
#[test]
fn damage_on_the_standby_is_found_by_the_reader() {
    let Some(s) = shipped() else { return };
    let d = s.dir.path();
    let (url, key, sfp) = (s.sb.url(), s.reader.as_path(), s.k.server_fp.as_str());
    let damaged = chunk_file(&s.sb.repo, 3);
    let deleted = chunk_file(&s.sb.repo, 10);
    let name = |f: &Path| f.file_name().unwrap().to_str().unwrap().to_string();
    let (damaged_id, deleted_id) = (name(&damaged), name(&deleted));
    let mut bytes = fs::read(&damaged).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x55;
    fs::write(&damaged, &bytes).unwrap();
    let kept = d.join("deleted-chunk");
    fs::rename(&deleted, &kept).unwrap();

    let r = over(&["verify", "--quiet"], &url, key, sfp);
    assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains(&damaged_id) && l.contains("damaged")),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.lines().any(|l| l.contains(&deleted_id)
            && l.contains("missing")
            && l.contains("on the standby")),
        "{}",
        r.stderr
    );

    // Restore checks that every chunk is there before writing: the missing one is named.
    let out = d.join("restored.img");
    let r = over(&["restore", "--target", p(&out), "--quiet"], &url, key, sfp);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains(&deleted_id) && r.stderr.contains("missing"),
        "{}",
        r.stderr
    );
    // With it back, the damaged one stops the restore.
    fs::rename(&kept, &deleted).unwrap();
    let _ = fs::remove_file(&out);
    let r = over(&["restore", "--target", p(&out), "--quiet"], &url, key, sfp);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains(&damaged_id) && r.stderr.contains("damaged"),
        "{}",
        r.stderr
    );
    // The standby's own verify names the same chunk; the source's is intact.
    let r = bkimg(&["verify", "--repo", p(&s.sb.repo), "--quiet"]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains(&damaged_id), "{}", r.stderr);
    bkimg_ok(&["verify", "--repo", p(&s.src), "--quiet"]);
}

/// The standby is killed while a restore from it is under way (paused by a test hook after
/// its first chunks, so that the kill falls mid-restore), and started again: the restore
/// retries on new connections and completes, byte-identical. While the restore holds its
/// sessions, a prune of the standby's repository is refused (it would delete under it).
#[test]
fn standby_killed_mid_restore_and_restarted_the_restore_completes() {
    let Some(mut s) = shipped() else { return };
    let d = s.dir.path();
    let url = s.sb.url();
    let out = d.join("restored.img");
    let paused = d.join("paused");
    let stderr_path = d.join("restore.stderr");
    let mut child = Command::new(bkimg_path())
        .args([
            "restore",
            "--repo",
            &url,
            "--key",
            p(&s.reader),
            "--server-fingerprint",
            &s.k.server_fp,
            "--target",
            p(&out),
            "--quiet",
            "--retries",
            "8",
        ])
        .env(
            "BKIMG_TEST_PAUSE",
            format!("standby-read-chunk:{}", paused.display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let stderr = || fs::read_to_string(&stderr_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !paused.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before its pause point:\n{}",
            stderr()
        );
        assert!(
            Instant::now() < deadline,
            "the restore never reached its pause point (built without --features \
             bkimg/test-hooks?)\n{}",
            stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Its read sessions hold the standby repository's shared lock.
    let r = bkimg(&["prune", "--repo", p(&s.sb.repo), "--keep-last", "1"]);
    assert_eq!(
        r.code, 10,
        "prune under a reader: {}\n{}",
        r.stdout, r.stderr
    );

    s.sb.kill();
    fs::remove_file(&paused).unwrap();
    // The restore notices (its connections are gone, new ones are refused) and waits.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stderr().contains("retrying") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore gave up without retrying:\n{}",
            stderr()
        );
        assert!(Instant::now() < deadline, "no retry:\n{}", stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    s.sb.restart();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the restore failed after the restart:\n{}\n{}",
        stderr(),
        s.sb.log_text()
    );
    assert!(stderr().contains(&url["bkimg://".len()..]), "{}", stderr());
    assert_same(&out, &s.image, "restore across a standby restart");
}

/// A replica someone put a loop device over (to mount it, say) since the last apply: the
/// incremental apply refuses to write under it, says why, and leaves it as it was; once the
/// loop device is gone, the next commit brings the replica to the newest point. (The
/// apply used to open the replica without restore's checks.)
#[test]
fn a_replica_in_use_is_not_written() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 40 * MIB, 21);
    let full = capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&full);
    let before = bkimg_tests::sha256_file(&sb.replica);

    let lo = bkimg_tests::Loop::attach(&sb.replica, 0, None, false);
    change_chunks(&disk, 10, 3, 200);
    let inc = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_log("apply failed");
    let log = sb.log_text();
    assert!(
        log.contains(&lo.dev) && log.contains("losetup -d"),
        "the standby does not say what holds the replica:\n{log}"
    );
    assert_eq!(
        bkimg_tests::sha256_file(&sb.replica),
        before,
        "the replica was written while in use"
    );
    assert_eq!(sb.status()["applied"], full.as_str());
    drop(lo);

    change_chunks(&disk, 20, 2, 201);
    let newer = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&newer);
    assert_same(&sb.replica, &disk, "replica after the loop device went");
    let _ = inc;
}

/// `bkimg standby verify` reads the replica and compares it with the point it holds:
/// equal after an apply; a byte changed behind the standby's back is found, named by disk,
/// volume and offset (exit 3); promote + demote restore it whole and it verifies again.
#[test]
fn standby_verify_finds_a_replica_changed_behind_its_back() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 40 * MIB, 31);
    let full = capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&full);
    let verify = || bkimg(&["standby", "verify", "--repo", p(&sb.repo), "--json"]);
    let r = verify();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(v["equal"], true, "{v}");
    assert!(
        v["replicas"][0]["chunks_checked"].as_u64().unwrap() >= 160,
        "{v}"
    );

    // One byte in the middle of the disk, as a stray write would.
    write_at(&sb.replica, 20 * MIB + 123, &[0xa5]);
    let r = bkimg(&["standby", "verify", "--repo", p(&sb.repo)]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("DIFFERS") && r.stdout.contains("disk0") && r.stdout.contains("1 of"),
        "{}",
        r.stdout
    );
    assert!(r.stderr.contains("standby demote --yes"), "{}", r.stderr);

    bkimg_ok(&["standby", "promote", "--repo", p(&sb.repo)]);
    bkimg_ok(&["standby", "demote", "--repo", p(&sb.repo), "--yes"]);
    let r = verify();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

/// The standby's journal, `REPO/standby/replica.json`.
fn journal(sb: &Standby) -> Value {
    serde_json::from_slice(&fs::read(sb.repo.join("standby/replica.json")).unwrap()).unwrap()
}

/// The byte offsets of the chunks the journal sampled from the first replica after its
/// last apply, checking that it names the point it holds.
fn sampled(sb: &Standby, point: &str) -> Vec<u64> {
    let j = journal(sb);
    assert_eq!(j["version"], 3, "{j}");
    let w = &j["replicas"][0]["written"];
    assert_eq!(w["point"], point, "{j}");
    assert!(w["device"]["kind"].is_string(), "no identity recorded: {j}");
    let offsets: Vec<u64> = w["chunks"]
        .as_array()
        .unwrap_or_else(|| panic!("no sampled chunks recorded: {j}"))
        .iter()
        .map(|c| c["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.len() >= 16, "{j}");
    offsets
}

/// Bytes written into the replica behind the standby's back (as a mount updating a
/// superblock would) make the next incremental a whole restore, said in one log line and
/// recorded in the journal; the replica ends equal to the new point and the point after
/// is applied as changed chunks again.
///
/// The check before an incremental reads a sample of chunks, not the whole replica (spec:
/// the first two and the last chunk of every volume, where mounts and partitioning write,
/// and 16 more spread over the disk): a write elsewhere is not seen by it and the delta
/// is applied over it; `bkimg standby verify` reads everything and finds it.
#[test]
fn a_replica_written_behind_the_standbys_back_is_restored_whole() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 40 * MIB, 41);
    let full = capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&full);
    // Partition 2 starts at 13 MiB: its first chunk holds where a filesystem's superblock
    // would be, and is always sampled.
    let p2 = 13 * MIB;
    assert!(sampled(&sb, &full).contains(&p2));
    write_at(&sb.replica, p2 + 1024, b"mounted behind the standby's back");

    change_chunks(&disk, 100, 3, 400);
    let inc = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    let s = sb.wait_applied(&inc);
    assert_eq!(s["last_apply"]["mode"], "full", "{s}");
    let why = s["last_apply"]["disks"][0]["whole_because"]
        .as_str()
        .unwrap_or_else(|| panic!("the journal does not say why: {s}"));
    assert!(why.contains(&format!("byte {p2}")), "{why}");
    sb.wait_log("to it whole instead of applying the changes");
    let line = sb
        .log_text()
        .lines()
        .find(|l| l.contains("to it whole instead of applying the changes"))
        .unwrap()
        .to_string();
    assert!(
        line.contains(p(&sb.replica)) && line.contains(&format!("byte {p2}")),
        "{line}"
    );
    assert_same(&sb.replica, &disk, "replica after the whole restore");
    let text = bkimg_ok(&["standby", "status", "--repo", p(&sb.repo)]).stdout;
    assert!(
        text.contains("restored whole: the sampled chunk at byte"),
        "{text}"
    );

    // A write outside the sample: not seen before the apply (the delta goes on), found by
    // `standby verify`.
    let offsets = sampled(&sb, &inc);
    let stray = (0..40 * MIB / CHUNK)
        .map(|c| c * CHUNK)
        .find(|o| *o > p2 && !offsets.contains(o))
        .unwrap();
    write_at(&sb.replica, stray + 77, &[0x5a; 16]);
    change_chunks(&disk, 120, 2, 401);
    let next = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    let s = sb.wait_applied(&next);
    assert_eq!(s["last_apply"]["mode"], "changed-chunks", "{s}");
    assert_eq!(s["last_apply"]["chunks_written"], 2, "{s}");
    assert!(
        s["last_apply"]["disks"][0]["whole_because"].is_null(),
        "{s}"
    );
    let r = bkimg(&["standby", "verify", "--repo", p(&sb.repo)]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!("at byte {}", stray - p2)),
        "{}",
        r.stdout
    );
}

/// The replica file swapped for another of the same size and the same bytes (a copy
/// renamed over it): not the file the standby wrote, so the next incremental restores it
/// whole rather than trust it.
#[test]
fn a_replica_file_swapped_for_a_copy_is_restored_whole() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 24 * MIB, 42);
    let full = capture(&src, &disk, false);
    let sb = Standby::start(&net, &k, d, &[]);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&full);
    sampled(&sb, &full);
    let copy = d.join("copy.img");
    fs::copy(&sb.replica, &copy).unwrap();
    fs::rename(&copy, &sb.replica).unwrap();

    change_chunks(&disk, 60, 3, 410);
    let inc = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    let s = sb.wait_applied(&inc);
    assert_eq!(s["last_apply"]["mode"], "full", "{s}");
    let why = s["last_apply"]["disks"][0]["whole_because"]
        .as_str()
        .unwrap_or_else(|| panic!("the journal does not say why: {s}"));
    assert!(why.contains("not the file"), "{why}");
    sb.wait_log("to it whole instead of applying the changes");
    assert_same(&sb.replica, &disk, "replica after the whole restore");
    sampled(&sb, &inc);
}

/// A replica named by a symlink to a loop device, re-pointed to another loop device of
/// the same size holding the same bytes: another device, restored whole; the device the
/// standby wrote before is left alone.
#[test]
fn a_replica_device_swapped_for_another_is_restored_whole() {
    let Some((dir, net, k)) = setup() else { return };
    let d = dir.path();
    let (disk, src) = (d.join("disk.img"), d.join("src-repo"));
    gpt_disk(&disk, 24 * MIB, 43);
    let full = capture(&src, &disk, false);
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    for f in [&a, &b] {
        fs::File::create(f).unwrap().set_len(24 * MIB).unwrap();
    }
    let (la, lb) = (
        bkimg_tests::Loop::attach(&a, 0, None, false),
        bkimg_tests::Loop::attach(&b, 0, None, false),
    );
    let link = d.join("replica-dev");
    std::os::unix::fs::symlink(&la.dev, &link).unwrap();
    let sb = Standby::start_with(&net, &k, d, &[], &[("", "replica-dev")]);
    replicate_ok(&src, &net, &k, &[]);
    sb.wait_applied(&full);
    sampled(&sb, &full);
    sh(
        "dd",
        &[
            &format!("if={}", la.dev),
            &format!("of={}", lb.dev),
            "bs=1M",
            "conv=fsync",
            "status=none",
        ],
    );
    let before = bkimg_tests::sha256_file(Path::new(&la.dev));
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&lb.dev, &link).unwrap();

    change_chunks(&disk, 60, 3, 420);
    let inc = capture(&src, &disk, true);
    replicate_ok(&src, &net, &k, &[]);
    let s = sb.wait_applied(&inc);
    assert_eq!(s["last_apply"]["mode"], "full", "{s}");
    let why = s["last_apply"]["disks"][0]["whole_because"]
        .as_str()
        .unwrap_or_else(|| panic!("the journal does not say why: {s}"));
    assert!(why.contains("another device"), "{why}");
    assert_eq!(
        bkimg_tests::sha256_file(Path::new(&lb.dev)),
        bkimg_tests::sha256_file(&disk),
        "the new device after the whole restore"
    );
    assert_eq!(
        bkimg_tests::sha256_file(Path::new(&la.dev)),
        before,
        "the device swapped out was written"
    );
}

// ------------------------------------------------------------------------------------------
// Protected repositories (protocol version 3).

fn bkimg_state_ok(state: &Path, args: &[&str]) -> Run {
    let r = bkimg_state(state, args);
    assert_eq!(r.code, 0, "bkimg {args:?}:\n{}\n{}", r.stdout, r.stderr);
    r
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// An encrypted repository ships to a standby that has no key (spec/standby-protocol.md
/// §6): the standby's copy holds no byte of the disk in the clear; it reads back through
/// the key, on the standby and over a read session, byte for byte; the next point ships as
/// an incremental; a passphrase changed at the source stops opening the copy after the
/// next ship; continuous mode captures and ships each cycle. A chunk damaged at the
/// source is reported there and not shipped; an
/// unprotected repository, or another encrypted one, shipping into the copy is refused
/// and changes nothing.
#[test]
fn an_encrypted_repository_ships_to_a_standby_without_its_key() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let k = keys(d);
    let state = d.join("client-state");
    let run = |args: &[&str]| bkimg_state(&state, args);
    let ok = |args: &[&str]| bkimg_state_ok(&state, args);
    let (src, pw, kf) = (d.join("src"), d.join("pw"), d.join("repo.key"));
    fs::write(&pw, "standby test passphrase\n").unwrap();
    let fast = ["--kdf-memory-mib", "1", "--kdf-iterations", "1"];
    let mut init = vec!["key", "init", "--repo", p(&src), "--password-file", p(&pw)];
    init.extend(["--key-file-out", p(&kf)]);
    init.extend(fast);
    ok(&init);

    // A disk of noise with a secret in the clear in its third chunk.
    let marker = b"root:$y$SECRET-HASH-ON-THE-STANDBY-TEST:19700:0:99999:7:::\n";
    let disk = d.join("disk.img");
    let mut data = noise(8 * MIB as usize, 31);
    for (i, b) in marker.repeat(64).iter().enumerate() {
        data[2 * CHUNK as usize + i] = *b;
    }
    fs::write(&disk, &data).unwrap();
    let capture = |parent: bool| -> String {
        let mut a = vec!["capture", "--json", "--quiet", "--repo", p(&src)];
        a.extend(["--password-file", p(&pw)]);
        if parent {
            a.extend(["--parent", "latest"]);
        }
        a.push(p(&disk));
        ok(&a).json()["id"].as_str().unwrap().to_string()
    };
    let first = capture(false);

    // A standby keeping a replica applies sealed points only through the key: without it
    // the ship is refused before anything is written (exit 8); with it the replica
    // becomes the disk.
    let rd = d.join("with-replica");
    fs::create_dir(&rd).unwrap();
    let replica = rd.join("replica.img");
    bkimg_tests::sparse_file(&replica, 8 * MIB);
    let mut with_replica = LocalStandby::start(&rd, &k, &["--replica", p(&replica)]);
    let replica_url = with_replica.url();
    let mut a = replicate_args(p(&src), &replica_url, &k, &[]);
    a.extend(["--password-file", p(&pw)]);
    let r = run(&a);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr.contains("--key-file or --password-file"),
        "{}",
        r.stderr
    );
    assert!(with_replica.ids().is_empty());
    with_replica.kill();
    with_replica
        .args
        .extend(["--key-file".into(), p(&kf).into()]);
    with_replica.restart();
    let r = run(&a);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let applied = |id: &str| {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let a = [
                "standby",
                "status",
                "--json",
                "--repo",
                p(&with_replica.repo),
            ];
            let s = ok(&a).json();
            if s["applied"] == id && s["apply_state"] == "idle" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica never got {id}: {s}\n{}",
                with_replica.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_same(&replica, &disk, "the replica of the encrypted point");
        let mut a = vec!["standby", "verify", "--repo", p(&with_replica.repo)];
        a.extend(["--key-file", p(&kf)]);
        ok(&a);
    };
    applied(&first);

    let sb = LocalStandby::start(d, &k, &[]);
    let url = sb.url();
    let ship = |extra: &[&str]| {
        let mut a = replicate_args(p(&src), &url, &k, &["--password-file", p(&pw)]);
        a.extend_from_slice(extra);
        run(&a)
    };
    let r = ship(&[]);
    assert_eq!(r.code, 0, "replicate:\n{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()["points_sent"], serde_json::json!([first]));
    assert!(
        sb.log_text().contains("now holds the encrypted repository"),
        "{}",
        sb.log_text()
    );
    for f in files_under(&sb.repo) {
        assert!(
            !contains(&fs::read(&f).unwrap(), b"SECRET-HASH-ON-THE-STANDBY"),
            "{} holds the secret in the clear",
            f.display()
        );
    }
    // On the standby: nothing without the key; everything with it.
    let r = run(&["list", "--repo", p(&sb.repo)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("passphrase"), "{}", r.stderr);
    ok(&["verify", "--repo", p(&sb.repo), "--key-file", p(&kf)]);

    // The next point: an incremental, only what changed travels.
    let mut changed = data.clone();
    changed[5 * CHUNK as usize + 7] ^= 0x5a;
    fs::write(&disk, &changed).unwrap();
    let second = capture(true);
    let r = ship(&[]);
    assert_eq!(r.code, 0, "replicate:\n{}\n{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(v["points_sent"], serde_json::json!([second]));
    assert_eq!(v["chunks_sent"], 1, "{v}");
    // The replica takes it as changed chunks, read through the key.
    let mut a = replicate_args(p(&src), &replica_url, &k, &[]);
    a.extend(["--password-file", p(&pw)]);
    ok(&a);
    applied(&second);
    let log = with_replica.log_text();
    assert!(
        log.contains(&format!(
            "applied {second} over {first}: 1 changed chunks written"
        )),
        "{log}"
    );
    drop(with_replica);

    // Over a read session, with the key file: byte for byte.
    let out = d.join("restored.img");
    let mut a = vec!["restore", "--repo", &url, &second, "--target", p(&out)];
    a.extend(["--key", p(&k.client), "--server-fingerprint", &k.server_fp]);
    a.extend(["--key-file", p(&kf), "--quiet"]);
    ok(&a);
    assert_same(&out, &disk, "restore of the second point from the standby");
    let mut a = vec!["verify", "--repo", &url, "--password-file", p(&pw)];
    a.extend(["--key", p(&k.client), "--server-fingerprint", &k.server_fp]);
    ok(&a);

    // A new passphrase at the source; after the next ship the old one opens nothing on
    // the standby and the new one does.
    let new_pw = d.join("new-pw");
    fs::write(&new_pw, "the new passphrase\n").unwrap();
    let mut passwd = vec![
        "key",
        "passwd",
        "--repo",
        p(&src),
        "--password-file",
        p(&pw),
    ];
    passwd.extend(["--new-password-file", p(&new_pw)]);
    passwd.extend(fast);
    ok(&passwd);
    let a = replicate_args(p(&src), &url, &k, &["--password-file", p(&new_pw)]);
    ok(&a);
    let r = run(&["list", "--repo", p(&sb.repo), "--password-file", p(&pw)]);
    assert_eq!(r.code, 8, "the old passphrase:\n{}", r.stderr);
    ok(&["list", "--repo", p(&sb.repo), "--password-file", p(&new_pw)]);

    // Continuous mode: each cycle captures and ships, unlocked once.
    let mut a = vec![
        "replicate",
        "--continuous",
        "--every",
        "1s",
        "--cycles",
        "2",
    ];
    a.extend(["--repo", p(&src), "--to", &url, "--key", p(&k.client)]);
    a.extend([
        "--server-fingerprint",
        &k.server_fp,
        "--password-file",
        p(&new_pw),
    ]);
    a.extend(["--json", "--quiet", p(&disk)]);
    let r = ok(&a);
    let cycles: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cycles.len(), 2, "{}\n{}", r.stdout, r.stderr);
    let mut shipped = vec![first.clone(), second.clone()];
    for c in &cycles {
        assert_eq!(c["points_sent"].as_array().unwrap().len(), 1, "{c}");
        shipped.push(c["capture"]["id"].as_str().unwrap().to_string());
    }
    let a = vec![
        "list",
        "--json",
        "--repo",
        p(&sb.repo),
        "--key-file",
        p(&kf),
    ];
    assert_eq!(ids_of(&ok(&a).json()), shipped);

    // A chunk damaged at the source: found before it leaves, nothing committed.
    fs::write(&disk, noise(8 * MIB as usize, 32)).unwrap();
    let mut a = vec!["capture", "--json", "--quiet", "--repo", p(&src)];
    a.extend(["--password-file", p(&new_pw), p(&disk)]);
    let third = ok(&a).json()["id"].as_str().unwrap().to_string();
    let chunk = files_under(&src.join("chunks"))
        .into_iter()
        .max_by_key(|f| mtime(f))
        .unwrap();
    let mut bytes = fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&chunk, &bytes).unwrap();
    let a = replicate_args(p(&src), &url, &k, &["--password-file", p(&new_pw)]);
    let r = run(&a);
    assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("chunk"), "{}", r.stderr);
    let list = ok(&[
        "list",
        "--json",
        "--repo",
        p(&sb.repo),
        "--key-file",
        p(&kf),
    ]);
    assert_eq!(ids_of(&list.json()), shipped);
    assert!(!ids_of(&list.json()).contains(&third));

    // An unprotected repository, and another encrypted one, may not ship into the copy.
    let plain = d.join("plain");
    let mut a = vec!["capture", "--quiet", "--repo", p(&plain), p(&disk)];
    ok(&a);
    let r = run(&replicate_args(p(&plain), &url, &k, &[]));
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("is a copy of the encrypted repository"),
        "{}",
        r.stderr
    );
    let other = d.join("other");
    let mut init = vec![
        "key",
        "init",
        "--repo",
        p(&other),
        "--password-file",
        p(&pw),
    ];
    init.extend(fast);
    ok(&init);
    a = vec![
        "capture",
        "--quiet",
        "--repo",
        p(&other),
        "--password-file",
        p(&pw),
    ];
    a.push(p(&disk));
    ok(&a);
    let r = run(&replicate_args(
        p(&other),
        &url,
        &k,
        &["--password-file", p(&pw)],
    ));
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("a standby repository holds one protected repository"),
        "{}",
        r.stderr
    );
    let list = ok(&[
        "list",
        "--json",
        "--repo",
        p(&sb.repo),
        "--key-file",
        p(&kf),
    ]);
    assert_eq!(ids_of(&list.json()), shipped);
    // The copy lags behind the source (the third point is not there), which is not a
    // rollback; its newest point taken away there is.
    let newest = shipped.last().unwrap();
    fs::remove_file(sb.repo.join("points").join(newest)).unwrap();
    let r = run(&["list", "--repo", p(&sb.repo), "--key-file", p(&kf)]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(r.stderr.contains("was rolled back"), "{}", r.stderr);
}

/// A signed repository ships to a standby, which checks everything but the MACs (its
/// chunks and indexes are plain); the copy reads back with the key and, asked, without.
#[test]
fn a_signed_repository_ships_to_a_standby() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let k = keys(d);
    let state = d.join("client-state");
    let run = |args: &[&str]| bkimg_state(&state, args);
    let ok = |args: &[&str]| bkimg_state_ok(&state, args);
    let (src, pw) = (d.join("src"), d.join("pw"));
    fs::write(&pw, "signing passphrase\n").unwrap();
    let mut init = vec!["key", "init", "--repo", p(&src), "--mode", "signed"];
    init.extend(["--password-file", p(&pw)]);
    init.extend(["--kdf-memory-mib", "1", "--kdf-iterations", "1"]);
    ok(&init);
    let disk = d.join("disk.img");
    fs::write(&disk, noise(4 * MIB as usize, 41)).unwrap();
    let cap = [
        "capture",
        "--quiet",
        "--repo",
        p(&src),
        "--password-file",
        p(&pw),
    ];
    ok(&[&cap[..], &[p(&disk)]].concat());
    let mut changed = fs::read(&disk).unwrap();
    changed[CHUNK as usize] ^= 1;
    fs::write(&disk, &changed).unwrap();
    ok(&[&cap[..], &["--parent", "latest", p(&disk)]].concat());

    let sb = LocalStandby::start(d, &k, &[]);
    let url = sb.url();
    let r = run(&replicate_args(
        p(&src),
        &url,
        &k,
        &["--password-file", p(&pw)],
    ));
    assert_eq!(r.code, 0, "replicate:\n{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()["points_sent"].as_array().unwrap().len(), 2);
    ok(&["verify", "--repo", p(&sb.repo), "--password-file", p(&pw)]);
    let out = d.join("restored.img");
    ok(&[
        "restore",
        "--repo",
        p(&sb.repo),
        "latest",
        "--target",
        p(&out),
        "--unauthenticated",
        "--quiet",
    ]);
    assert_same(&out, &disk, "restore of the signed copy without its key");
}
