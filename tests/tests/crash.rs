//! Killed at every write-side system call: whatever a capture, prune or export was doing
//! when SIGKILL came, the repository verifies afterwards and running the command again
//! completes. strace's fault injection kills the process at the Nth call of one system
//! call; each command is first traced once to count its calls, then killed at each of
//! them (spread out when there are many).

use std::path::{Path, PathBuf};
use std::process::Command;

use bkimg_tests::{bkimg, bkimg_ok, bkimg_path, noise_image, p, Run, TempDir, MIB};

/// The calls that change a repository's state on disk.
const WRITE_SIDE: &[&str] = &[
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "fsync",
    "fdatasync",
    "write",
    "pwrite64",
    "ftruncate",
];
/// Most kill positions per system call (first and last always among them).
const POSITIONS: u32 = 10;

fn have_strace() -> bool {
    let ok = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "CI must run the crash tests: strace is missing"
    );
    ok
}

/// How often `args` makes each write-side call, traced once (in a scratch copy of the
/// state `setup` makes).
fn count_calls(
    setup: &dyn Fn(&Path) -> Guard,
    args: &dyn Fn(&Path) -> Vec<String>,
    env: &dyn Fn(&Path) -> Vec<(String, String)>,
) -> Vec<(String, u32)> {
    let dir = TempDir::new().unwrap();
    let _guard = setup(dir.path());
    let log = dir.path().join("strace.log");
    let status = Command::new("strace")
        .args(["-f", "-qq", "-o", p(&log), "-e"])
        .arg(format!("trace={}", WRITE_SIDE.join(",")))
        .arg(bkimg_path())
        .args(args(dir.path()))
        .envs(env(dir.path()))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "the traced run failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    write_side_calls(&std::fs::read_to_string(&log).unwrap())
}

/// How many times each write-side call starts in an `strace -f` log ("PID name(...").
fn write_side_calls(log: &str) -> Vec<(String, u32)> {
    WRITE_SIDE
        .iter()
        .map(|s| {
            let n = log
                .lines()
                .filter(|l| {
                    l.split_once(' ')
                        .map(|(_, rest)| rest.trim_start())
                        .is_some_and(|rest| rest.starts_with(&format!("{s}(")))
                })
                .count() as u32;
            (s.to_string(), n)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn positions(count: u32) -> Vec<u32> {
    if count <= POSITIONS {
        return (1..=count).collect();
    }
    let mut v: Vec<u32> = (0..POSITIONS)
        .map(|i| 1 + i * (count - 1) / (POSITIONS - 1))
        .collect();
    v.dedup();
    v
}

fn killed_run(
    dir: &Path,
    syscall: &str,
    when: u32,
    args: &[String],
    env: Vec<(String, String)>,
) -> std::process::Output {
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={syscall}"))
        .arg("-e")
        .arg(format!("inject={syscall}:signal=SIGKILL:when={when}"))
        .arg(bkimg_path())
        .args(args)
        .envs(env)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// What a setup keeps alive while its state is used (a server it started).
type Guard = Box<dyn std::any::Any>;

fn show(r: &Run) -> String {
    format!("exit {}: {}{}", r.code, r.stdout, r.stderr)
}

/// For every write-side call of the command and each kill position: a fresh state from
/// `setup`, the command killed there, then `check` (the repository verifies, the rerun
/// completes). Returns how many kills were tried; fails listing every case that broke.
fn kill_everywhere(
    what: &str,
    setup: &dyn Fn(&Path),
    args: &dyn Fn(&Path) -> Vec<String>,
    check: &dyn Fn(&Path) -> Result<(), String>,
) -> usize {
    kill_everywhere_with(
        what,
        &|d| {
            setup(d);
            Box::new(())
        },
        args,
        &|_| Vec::new(),
        check,
    )
}

/// As `kill_everywhere`, with the environment `env` gives the command, and a setup that
/// returns what must live while the state is used.
fn kill_everywhere_with(
    what: &str,
    setup: &dyn Fn(&Path) -> Guard,
    args: &dyn Fn(&Path) -> Vec<String>,
    env: &dyn Fn(&Path) -> Vec<(String, String)>,
    check: &dyn Fn(&Path) -> Result<(), String>,
) -> usize {
    let counts = count_calls(setup, args, env);
    assert!(!counts.is_empty(), "{what}: no write-side call was traced");
    let mut failures = Vec::new();
    let mut tried = 0;
    for (syscall, count) in &counts {
        for when in positions(*count) {
            let dir = TempDir::new().unwrap();
            let _guard = setup(dir.path());
            let out = killed_run(
                dir.path(),
                syscall,
                when,
                &args(dir.path()),
                env(dir.path()),
            );
            tried += 1;
            if let Err(e) = check(dir.path()) {
                failures.push(format!(
                    "{what}, killed at {syscall} #{when} of {count} (exit {:?}): {e}",
                    out.status.code()
                ));
            }
        }
    }
    eprintln!("{what}: {tried} kills at {counts:?}");
    assert!(
        failures.is_empty(),
        "{} of {tried} kills broke the repository:\n{}",
        failures.len(),
        failures.join("\n")
    );
    tried
}

/// The repository at `repo` verifies (or was never created), and `rerun` completes and
/// leaves it verifying.
fn verifies_and_reruns(repo: &Path, rerun: &[String]) -> Result<(), String> {
    if repo.join("config").exists() {
        let v = bkimg(&["verify", "--repo", p(repo), "-q"]);
        if v.code != 0 {
            return Err(format!("verify after the kill: {}", show(&v)));
        }
    }
    let args: Vec<&str> = rerun.iter().map(String::as_str).collect();
    let r = bkimg(&args);
    if r.code != 0 {
        return Err(format!("the rerun: {}", show(&r)));
    }
    let v = bkimg(&["verify", "--repo", p(repo), "-q"]);
    if v.code != 0 {
        return Err(format!("verify after the rerun: {}", show(&v)));
    }
    Ok(())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn image(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let path = dir.join(name);
    noise_image(&path, 4 * MIB, seed);
    path
}

/// A capture creating its repository, killed anywhere: the rerun finishes the repository
/// (it used to be refused as "neither empty nor a bkimg repository" for good).
#[test]
fn a_capture_creating_its_repository_killed_anywhere() {
    if !have_strace() {
        return;
    }
    let setup = |d: &Path| {
        image(d, "disk.img", 1);
    };
    let args = |d: &Path| {
        strings(&[
            "capture",
            "--repo",
            p(&d.join("repo")),
            p(&d.join("disk.img")),
            "-q",
        ])
    };
    kill_everywhere("capture into a new repository", &setup, &args, &|d| {
        verifies_and_reruns(&d.join("repo"), &args(d))
    });
}

/// Full and incremental captures into an existing repository, killed anywhere.
#[test]
fn captures_into_a_repository_killed_anywhere() {
    if !have_strace() {
        return;
    }
    let setup = |d: &Path| {
        let disk = image(d, "disk.img", 2);
        bkimg_ok(&["capture", "--repo", p(&d.join("repo")), p(&disk), "-q"]);
        // Change an eighth of it for the incremental.
        bkimg_tests::write_at(&disk, MIB, &[0x5a; 512 << 10]);
        image(d, "other.img", 3);
    };
    let full = |d: &Path| {
        strings(&[
            "capture",
            "--repo",
            p(&d.join("repo")),
            p(&d.join("other.img")),
            "-q",
        ])
    };
    kill_everywhere("a full capture", &setup, &full, &|d| {
        verifies_and_reruns(&d.join("repo"), &full(d))
    });
    let incremental = |d: &Path| {
        strings(&[
            "capture",
            "--repo",
            p(&d.join("repo")),
            "--parent",
            "latest",
            p(&d.join("disk.img")),
            "-q",
        ])
    };
    kill_everywhere("an incremental capture", &setup, &incremental, &|d| {
        verifies_and_reruns(&d.join("repo"), &incremental(d))
    });
}

/// A prune of a chain killed anywhere (it used to leave, killed between two manifests, a
/// point whose parent was gone without a record: verify said DAMAGED).
#[test]
fn a_prune_killed_anywhere() {
    if !have_strace() {
        return;
    }
    let setup = |d: &Path| {
        let disk = image(d, "disk.img", 4);
        let repo = d.join("repo");
        for i in 0..4u8 {
            bkimg_tests::write_at(&disk, u64::from(i) * MIB, &[i; 256 << 10]);
            let mut args = vec!["capture", "--repo", p(&repo), p(&disk), "-q"];
            if i > 0 {
                args.extend(["--parent", "latest"]);
            }
            bkimg_ok(&args);
        }
    };
    let args = |d: &Path| {
        strings(&[
            "prune",
            "--repo",
            p(&d.join("repo")),
            "--keep-last",
            "1",
            "-q",
        ])
    };
    kill_everywhere("prune --keep-last 1 of a chain of 4", &setup, &args, &|d| {
        verifies_and_reruns(&d.join("repo"), &args(d))
    });
}

/// An export killed anywhere leaves no file that looks complete, and the rerun makes one
/// that restores.
#[test]
fn an_export_killed_anywhere() {
    if !have_strace() {
        return;
    }
    let setup = |d: &Path| {
        let disk = image(d, "disk.img", 5);
        bkimg_ok(&["capture", "--repo", p(&d.join("repo")), p(&disk), "-q"]);
    };
    let args = |d: &Path| {
        strings(&[
            "export",
            "--repo",
            p(&d.join("repo")),
            "-o",
            p(&d.join("out.bkimg")),
            "-q",
        ])
    };
    kill_everywhere("export", &setup, &args, &|d| {
        let out = d.join("out.bkimg");
        if out.exists() {
            // Finished before the kill came: it must be whole (a rerun would refuse to
            // overwrite it).
            let v = bkimg(&["verify", "--repo", p(&out), "-q"]);
            if v.code != 0 {
                return Err(format!(
                    "a killed export left {} that does not verify: {}",
                    out.display(),
                    show(&v)
                ));
            }
            return Ok(());
        }
        verifies_and_reruns(&d.join("repo"), &args(d))?;
        let v = bkimg(&["verify", "--repo", p(&out), "-q"]);
        if v.code != 0 {
            return Err(format!("the rerun's export: {}", show(&v)));
        }
        Ok(())
    });
}

/// A restore into a new image file killed anywhere: the rerun (with `--yes`, the target
/// now existing) completes and the image equals the disk. Before the file was created
/// whole, a kill between its creation and its sizing left a 0-byte file that every rerun
/// refused as too small.
#[test]
fn a_restore_to_a_new_file_killed_anywhere() {
    if !have_strace() {
        return;
    }
    let setup = |d: &Path| {
        let disk = image(d, "disk.img", 11);
        bkimg_ok(&["capture", "--repo", p(&d.join("repo")), p(&disk), "-q"]);
    };
    let args = |d: &Path| {
        strings(&[
            "restore",
            "--repo",
            p(&d.join("repo")),
            "latest",
            "--target",
            p(&d.join("out.img")),
            "-q",
        ])
    };
    kill_everywhere("restore", &setup, &args, &|d| {
        let mut rerun = args(d);
        rerun.push("--yes".into());
        let r = bkimg(&rerun.iter().map(String::as_str).collect::<Vec<_>>());
        if r.code != 0 {
            return Err(format!("the rerun: {}", show(&r)));
        }
        let (a, b) = (
            std::fs::read(d.join("disk.img")).unwrap(),
            std::fs::read(d.join("out.img")).unwrap(),
        );
        if a != b {
            return Err("the restored image differs from the disk".into());
        }
        Ok(())
    });
}

/// Two captures creating the same new repository at once both succeed, into one
/// repository (the config is linked into place by one of them, never replaced).
#[test]
fn two_captures_creating_one_repository_at_once() {
    let dir = TempDir::new().unwrap();
    let a = image(dir.path(), "a.img", 6);
    let b = image(dir.path(), "b.img", 7);
    for round in 0..5 {
        let repo = dir.path().join(format!("repo{round}"));
        let spawn = |img: &Path| {
            Command::new(bkimg_path())
                .args(["capture", "--repo", p(&repo), p(img), "-q"])
                .output()
                .unwrap()
        };
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| spawn(&a));
            let tb = s.spawn(|| spawn(&b));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        for r in [&ra, &rb] {
            assert!(
                r.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&r.stderr)
            );
        }
        let list = bkimg_tests::list_json(&repo);
        assert_eq!(list.len(), 2, "round {round}: {list:?}");
        bkimg_ok(&["verify", "--repo", p(&repo), "-q"]);
    }
}

/// Runs `args` until it reaches the test pause point `point`, sends it `signal`, and
/// returns its exit code and error output.
fn signalled(
    dir: &Path,
    point: &str,
    signal: nix_signal::Signal,
    args: &[String],
) -> (Option<i32>, String) {
    let paused = dir.join(format!("paused-{point}"));
    let _ = std::fs::remove_file(&paused);
    let mut child = Command::new(bkimg_path())
        .args(args)
        .env("BKIMG_TEST_PAUSE", format!("{point}:{}", paused.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !paused.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{args:?} ended before its pause point {point} (built without --features \
             bkimg/test-hooks?)"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{args:?} never reached {point}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args([&format!("-{}", signal.name()), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&paused);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Tiny stand-in for the signal names `kill` takes.
mod nix_signal {
    #[derive(Clone, Copy, Debug)]
    pub enum Signal {
        Int,
        Term,
    }
    impl Signal {
        pub fn name(self) -> &'static str {
            match self {
                Signal::Int => "INT",
                Signal::Term => "TERM",
            }
        }
    }
}

/// Ctrl-C or SIGTERM to a capture, restore, export or prune: exit 130 (as docs/cli.md
/// says; a capture used to die of SIGTERM, 143), a line saying what is left, and nothing
/// half-made: no restore point, no export file, a repository that verifies; the rerun
/// completes.
#[test]
fn signals_stop_long_commands_with_130() {
    use nix_signal::Signal;
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let disk = image(d, "disk.img", 8);
    let repo = d.join("repo");
    let capture = strings(&["capture", "--repo", p(&repo), p(&disk), "-q"]);
    for signal in [Signal::Term, Signal::Int] {
        let (code, err) = signalled(d, "capture-reading", signal, &capture);
        assert_eq!(code, Some(130), "capture, SIG{}: {err}", signal.name());
        assert!(err.contains("interrupted"), "{err}");
        if repo.join("config").exists() {
            assert!(bkimg_tests::list_json(&repo).is_empty());
        }
    }
    bkimg_ok(&capture.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(bkimg_tests::list_json(&repo).len(), 1);

    let target = d.join("restored.img");
    let restore = strings(&[
        "restore",
        "--repo",
        p(&repo),
        "--target",
        p(&target),
        "--yes",
        "-q",
    ]);
    let (code, err) = signalled(d, "restore-writing", Signal::Term, &restore);
    assert_eq!(code, Some(130), "restore: {err}");
    assert!(err.contains("partly written"), "{err}");

    let out = d.join("out.bkimg");
    let export = strings(&["export", "--repo", p(&repo), "-o", p(&out), "-q"]);
    let (code, err) = signalled(d, "export-writing", Signal::Int, &export);
    assert_eq!(code, Some(130), "export: {err}");
    assert!(
        !out.exists(),
        "an interrupted export left {}",
        out.display()
    );
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");

    bkimg_ok(&["capture", "--repo", p(&repo), p(&disk), "-q"]);
    let prune = strings(&["prune", "--repo", p(&repo), "--keep-last", "1", "-q"]);
    let (code, err) = signalled(d, "prune-manifests-deleted", Signal::Term, &prune);
    assert_eq!(code, Some(130), "prune: {err}");
    bkimg_ok(&["verify", "--repo", p(&repo), "-q"]);
    bkimg_ok(&prune.iter().map(String::as_str).collect::<Vec<_>>());
    bkimg_ok(&["verify", "--repo", p(&repo), "-q"]);
}

// ---- replication: the sender killed anywhere, and the standby killed anywhere ----------

/// A source repository with a full point and an incremental of it, made once.
fn source_repository(dir: &Path) -> PathBuf {
    let disk = image(dir, "disk.img", 9);
    let repo = dir.join("source");
    bkimg_ok(&["capture", "--repo", p(&repo), p(&disk), "-q"]);
    bkimg_tests::write_at(&disk, 2 * MIB, &[7; 512 << 10]);
    bkimg_ok(&[
        "capture",
        "--repo",
        p(&repo),
        "--parent",
        "latest",
        p(&disk),
        "-q",
    ]);
    repo
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

fn wait_listening(port: u16, child: &mut std::process::Child) {
    assert!(
        listening_or_ended(port, child),
        "the server ended before it listened on {port}"
    );
}

/// Waits until something listens on `port` (true) or `child` ends first (false).
fn listening_or_ended(port: u16, child: &mut std::process::Child) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            std::time::Instant::now() < until,
            "nothing listens on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `bkimg ARGS` with extra environment.
fn bkimg_env(args: &[String], env: &[(String, String)]) -> Run {
    let out = Command::new(bkimg_path())
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The replica at `url` verifies, or holds nothing yet (exit 4); the rerun completes and
/// it verifies.
fn remote_verifies_and_reruns(
    url: &str,
    rerun: &[String],
    env: &[(String, String)],
    verify_extra: &[String],
) -> Result<(), String> {
    let mut verify = strings(&["verify", "--repo", url, "-q"]);
    verify.extend(verify_extra.iter().cloned());
    let v = bkimg_env(&verify, env);
    if v.code != 0 && v.code != 4 {
        return Err(format!("verify after the kill: {}", show(&v)));
    }
    let r = bkimg_env(rerun, env);
    if r.code != 0 {
        return Err(format!("the rerun: {}", show(&r)));
    }
    let v = bkimg_env(&verify, env);
    if v.code != 0 {
        return Err(format!("verify after the rerun: {}", show(&v)));
    }
    Ok(())
}

/// `bkimg replicate --to s3://...` killed anywhere: the bucket shows only complete points
/// and the rerun resumes.
#[test]
fn a_replication_to_s3_killed_anywhere() {
    if !have_strace() || !bkimg_tests::require_root() {
        return;
    }
    let top = TempDir::new().unwrap();
    let source = source_repository(top.path());
    let root = top.path().join("s3");
    std::fs::create_dir_all(root.join("backups")).unwrap();
    let port = free_port();
    let mut server = Killed(
        Command::new(bkimg_tests::s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                "crashkey",
                "--secret-key",
                "crash-secret-0123456789",
            ])
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port, &mut server.0);
    let env = move |_: &Path| {
        [
            ("AWS_ACCESS_KEY_ID", "crashkey".to_string()),
            (
                "AWS_SECRET_ACCESS_KEY",
                "crash-secret-0123456789".to_string(),
            ),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_CONFIG_FILE", "/nonexistent/bkimg-test".to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/bkimg-test".to_string(),
            ),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect::<Vec<_>>()
    };
    // Each kill ships into a prefix of its own.
    let url = |d: &Path| {
        format!(
            "s3://backups/{}",
            d.file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches('.')
        )
    };
    let args = |d: &Path| strings(&["replicate", "--repo", p(&source), "--to", &url(d), "-q"]);
    kill_everywhere_with("replicate to S3", &|_| Box::new(()), &args, &env, &|d| {
        remote_verifies_and_reruns(&url(d), &args(d), &env(d), &[])
    });
}

/// Keys of a standby and of the host shipping to it.
struct StandbyKeys {
    server: PathBuf,
    server_fp: String,
    client: PathBuf,
    client_fp: String,
}

fn standby_keys(dir: &Path) -> StandbyKeys {
    let (server, server_fp) = bkimg_tests::standby_keygen(dir, "standby-key");
    let (client, client_fp) = bkimg_tests::standby_keygen(dir, "client-key");
    StandbyKeys {
        server,
        server_fp,
        client,
        client_fp,
    }
}

fn serve_args(k: &StandbyKeys, port: u16, repo: &Path) -> Vec<String> {
    strings(&[
        "standby",
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--repo",
        p(repo),
        "--key",
        p(&k.server),
        "--allow",
        &k.client_fp,
    ])
}

fn ship_args(k: &StandbyKeys, port: u16, source: &Path) -> Vec<String> {
    strings(&[
        "replicate",
        "--repo",
        p(source),
        "--to",
        &format!("bkimg://127.0.0.1:{port}"),
        "--key",
        p(&k.client),
        "--server-fingerprint",
        &k.server_fp,
        "-q",
    ])
}

/// The sender to a standby killed anywhere: the standby holds only complete points and
/// the rerun completes.
#[test]
fn a_replication_to_a_standby_killed_anywhere() {
    if !have_strace() {
        return;
    }
    let top = TempDir::new().unwrap();
    let source = source_repository(top.path());
    let keys = standby_keys(top.path());
    let port_of = |d: &Path| -> u16 {
        std::fs::read_to_string(d.join("port"))
            .unwrap()
            .parse()
            .unwrap()
    };
    let setup = |d: &Path| -> Guard {
        let port = free_port();
        std::fs::write(d.join("port"), port.to_string()).unwrap();
        let mut child = Killed(
            Command::new(bkimg_path())
                .args(serve_args(&keys, port, &d.join("standby")))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_listening(port, &mut child.0);
        Box::new(child)
    };
    let args = |d: &Path| ship_args(&keys, port_of(d), &source);
    kill_everywhere_with(
        "replicate to a standby",
        &setup,
        &args,
        &|_| Vec::new(),
        &|d| {
            verifies_and_reruns(&d.join("standby"), &args(d))?;
            let a = bkimg_tests::list_json(&source);
            let b = bkimg_tests::list_json(&d.join("standby"));
            if a.len() != b.len() {
                return Err(format!(
                    "the standby holds {} points, not {}",
                    b.len(),
                    a.len()
                ));
            }
            Ok(())
        },
    );
}

/// The standby killed anywhere while it receives: restarted, it holds only complete
/// points and takes the rest.
#[test]
fn a_standby_killed_anywhere_while_receiving() {
    if !have_strace() {
        return;
    }
    let top = TempDir::new().unwrap();
    let source = source_repository(top.path());
    let keys = standby_keys(top.path());
    // One traced, undisturbed session counts the standby's calls.
    let serve = |d: &Path, port: u16, inject: Option<(&str, u32)>| -> Killed {
        let mut c = Command::new("strace");
        c.args(["-f", "-qq"]);
        match inject {
            None => {
                c.args(["-o", p(&d.join("strace.log")), "-e"])
                    .arg(format!("trace={}", WRITE_SIDE.join(",")));
            }
            Some((syscall, when)) => {
                c.args(["-o", "/dev/null", "-e"])
                    .arg(format!("trace={syscall}"))
                    .arg("-e")
                    .arg(format!("inject={syscall}:signal=SIGKILL:when={when}"));
            }
        }
        let mut child = Killed(
            c.arg(bkimg_path())
                .args(serve_args(&keys, port, &d.join("standby")))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Killed while starting (creating its repository) is a case too.
        let up = listening_or_ended(port, &mut child.0);
        assert!(up || inject.is_some(), "the standby did not start");
        child
    };
    let counts = {
        let d = TempDir::new().unwrap();
        let port = free_port();
        let server = serve(d.path(), port, None);
        bkimg_ok(
            &ship_args(&keys, port, &source)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        drop(server);
        write_side_calls(&std::fs::read_to_string(d.path().join("strace.log")).unwrap())
    };
    let mut failures = Vec::new();
    let mut tried = 0;
    for (syscall, count) in &counts {
        for when in positions(*count) {
            let d = TempDir::new().unwrap();
            let port = free_port();
            let server = serve(d.path(), port, Some((syscall, when)));
            // No retries: the standby is dead once killed.
            let mut ship = ship_args(&keys, port, &source);
            ship.extend(strings(&["--retries", "0"]));
            let first = bkimg_env(&ship, &[]);
            drop(server);
            tried += 1;
            // Restarted without faults: what it holds verifies, the rerun completes.
            let port = free_port();
            let mut again = Killed(
                Command::new(bkimg_path())
                    .args(serve_args(&keys, port, &d.path().join("standby")))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            wait_listening(port, &mut again.0);
            let repo = d.path().join("standby");
            let result = verifies_and_reruns(&repo, &ship_args(&keys, port, &source));
            drop(again);
            if let Err(e) = result {
                failures.push(format!(
                    "standby killed at {syscall} #{when} of {count} (sender exit {}): {e}",
                    first.code
                ));
            }
        }
    }
    eprintln!("standby receiving: {tried} kills at {counts:?}");
    assert!(
        failures.is_empty(),
        "{} of {tried} kills broke the standby:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The latest restore point of a repository.
fn latest_id(repo: &Path) -> String {
    let out = bkimg_ok(&["info", "--repo", p(repo), "latest", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["id"].as_str().expect("id").to_string()
}

/// Waits (generously) until the standby's replica holds `want` and reads as that point,
/// or until `server` (if given) has ended; `Err` with what it last saw otherwise.
fn replica_holds(
    standby_repo: &Path,
    want: &str,
    mut server: Option<&mut std::process::Child>,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let r = bkimg(&["standby", "verify", "--repo", p(standby_repo), "--json"]);
        let seen = serde_json::from_str::<serde_json::Value>(&r.stdout).ok();
        let ok = seen.as_ref().is_some_and(|v| {
            v["equal"] == serde_json::json!(true) && v["replicas"][0]["point"] == *want
        });
        if ok {
            return Ok(());
        }
        let ended = server
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some());
        if ended || std::time::Instant::now() > deadline {
            return Err(format!(
                "the replica does not hold {want}: standby verify exit {}: {}{}",
                r.code, r.stdout, r.stderr
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The standby killed anywhere while it receives and applies to a replica: restarted, it
/// finishes, and the replica holds the latest point, chunk for chunk.
#[test]
fn a_standby_killed_anywhere_while_applying() {
    if !have_strace() {
        return;
    }
    let top = TempDir::new().unwrap();
    let source = source_repository(top.path());
    let latest = latest_id(&source);
    let keys = standby_keys(top.path());
    let args = |d: &Path, port: u16| -> Vec<String> {
        let mut a = serve_args(&keys, port, &d.join("standby"));
        a.extend(strings(&["--replica", p(&d.join("replica.img"))]));
        a
    };
    let spawn = |c: &mut Command| {
        Killed(
            c.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    // One traced, undisturbed session counts the calls of receiving and applying.
    let counts = {
        let d = TempDir::new().unwrap();
        let port = free_port();
        let mut server = spawn(
            Command::new("strace")
                .args(["-f", "-qq", "-o", p(&d.path().join("strace.log")), "-e"])
                .arg(format!("trace={}", WRITE_SIDE.join(",")))
                .arg(bkimg_path())
                .args(args(d.path(), port)),
        );
        wait_listening(port, &mut server.0);
        bkimg_ok(
            &ship_args(&keys, port, &source)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        replica_holds(&d.path().join("standby"), &latest, None).unwrap();
        drop(server);
        write_side_calls(&std::fs::read_to_string(d.path().join("strace.log")).unwrap())
    };
    let mut failures = Vec::new();
    let mut tried = 0;
    for (syscall, count) in &counts {
        for when in positions(*count) {
            let d = TempDir::new().unwrap();
            let port = free_port();
            let mut server = spawn(
                Command::new("strace")
                    .args(["-f", "-qq", "-o", "/dev/null", "-e"])
                    .arg(format!("trace={syscall}"))
                    .arg("-e")
                    .arg(format!("inject={syscall}:signal=SIGKILL:when={when}"))
                    .arg(bkimg_path())
                    .args(args(d.path(), port)),
            );
            let mut ship = ship_args(&keys, port, &source);
            ship.extend(strings(&["--retries", "0"]));
            if listening_or_ended(port, &mut server.0) {
                bkimg_env(&ship, &[]);
                // Killed after the sender finished: while applying. Until it is killed or
                // done.
                let _ = replica_holds(&d.path().join("standby"), &latest, Some(&mut server.0));
            }
            drop(server);
            tried += 1;
            // Restarted without faults: it completes, and the replica is the point.
            let port = free_port();
            let log = d.path().join("restart.log");
            let mut again = Killed(
                Command::new(bkimg_path())
                    .args(args(d.path(), port))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap(),
            );
            if !listening_or_ended(port, &mut again.0) {
                failures.push(format!(
                    "standby killed at {syscall} #{when} of {count}: the restarted standby \
                     ended: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
                continue;
            }
            let repo = d.path().join("standby");
            let result = verifies_and_reruns(&repo, &ship_args(&keys, port, &source))
                .and_then(|()| replica_holds(&repo, &latest, None));
            drop(again);
            if let Err(e) = result {
                failures.push(format!(
                    "standby killed at {syscall} #{when} of {count}: {e}"
                ));
            }
        }
    }
    eprintln!("standby applying: {tried} kills at {counts:?}");
    assert!(
        failures.is_empty(),
        "{} of {tried} kills broke the standby or its replica:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
