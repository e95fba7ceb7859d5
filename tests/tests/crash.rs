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
fn count_calls(setup: &dyn Fn(&Path), args: &dyn Fn(&Path) -> Vec<String>) -> Vec<(String, u32)> {
    let dir = TempDir::new().unwrap();
    setup(dir.path());
    let log = dir.path().join("strace.log");
    let status = Command::new("strace")
        .args(["-f", "-qq", "-o", p(&log), "-e"])
        .arg(format!("trace={}", WRITE_SIDE.join(",")))
        .arg(bkimg_path())
        .args(args(dir.path()))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "the traced run failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    WRITE_SIDE
        .iter()
        .map(|s| {
            let n = text
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

fn killed_run(dir: &Path, syscall: &str, when: u32, args: &[String]) -> std::process::Output {
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={syscall}"))
        .arg("-e")
        .arg(format!("inject={syscall}:signal=SIGKILL:when={when}"))
        .arg(bkimg_path())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

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
    let counts = count_calls(setup, args);
    assert!(!counts.is_empty(), "{what}: no write-side call was traced");
    let mut failures = Vec::new();
    let mut tried = 0;
    for (syscall, count) in &counts {
        for when in positions(*count) {
            let dir = TempDir::new().unwrap();
            setup(dir.path());
            let out = killed_run(dir.path(), syscall, when, &args(dir.path()));
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
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 512 << 10], MIB).unwrap();
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
            let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &[i; 256 << 10], u64::from(i) * MIB)
                .unwrap();
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
