//! The command line as a user meets it: the repository from BKIMG_REPOSITORY or the config
//! file, the config file's retention and its precedence below flags, a bad config file
//! refused with its place, sizes and durations in human units (and absurd ones refused),
//! old option names, shell completions, man pages, and `--json` of `changemap` and `demo`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use bkimg_tests::{bkimg_path, noise_image, p, sh_status, Run, TempDir, MIB};
use serde_json::Value;

/// Runs bkimg with `args` and environment `env` (on top of a clean one for bkimg's own
/// variables, so that the caller's shell or /etc/bkimg/bkimg.toml cannot change the outcome).
fn run(args: &[&str], env: &[(&str, &str)], empty_config: &Path) -> Run {
    let mut cmd = Command::new(bkimg_path());
    cmd.args(args)
        .env_remove("BKIMG_REPOSITORY")
        .env("BKIMG_CONFIG", empty_config)
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

struct Env {
    dir: TempDir,
    empty: std::path::PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = TempDir::new().unwrap();
        let empty = dir.path().join("empty.toml");
        fs::write(&empty, "").unwrap();
        Env { dir, empty }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        run(args, env, &self.empty)
    }

    fn ok(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let r = self.run(args, env);
        assert_eq!(
            r.code, 0,
            "bkimg {args:?} failed with {}:\n{}\n{}",
            r.code, r.stdout, r.stderr
        );
        r
    }

    /// An 8 MiB image of noise.
    fn image(&self) -> std::path::PathBuf {
        let img = self.path("disk.img");
        noise_image(&img, 8 * MIB, 7);
        img
    }
}

fn json(r: &Run) -> Value {
    r.json()
}

fn kept(v: &Value) -> usize {
    v["kept"].as_array().unwrap().len()
}

#[test]
fn repository_from_the_environment() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let img = e.image();
    let repo = e.path("repo");
    let env = [("BKIMG_REPOSITORY", p(&repo))];
    let id = json(&e.ok(&["capture", "--json", "--quiet", p(&img)], &env))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let list = json(&e.ok(&["list", "--json"], &env));
    assert_eq!(list[0]["id"], id.as_str());
    e.ok(&["verify", "--quiet"], &env);
    e.ok(&["info", &id], &env);
    // --repo wins over the environment.
    let other = e.path("other");
    let r = e.run(&["list", "--repo", p(&other)], &env);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains(p(&other)), "{}", r.stderr);
    // Set but empty is unset: then nothing names a repository.
    let r = e.run(&["list"], &[("BKIMG_REPOSITORY", "")]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    for way in ["--repo", "BKIMG_REPOSITORY", "repository = ", "config file"] {
        assert!(r.stderr.contains(way), "{way} not in: {}", r.stderr);
    }
}

#[test]
fn config_file_gives_repository_and_retention() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let img = e.image();
    let repo = e.path("repo");
    let config = e.path("bkimg.toml");
    fs::write(
        &config,
        format!(
            "# test\nrepository = \"{}\"\nthreads = 2\n\n[retention]\nkeep-last = 1\n",
            p(&repo)
        ),
    )
    .unwrap();
    let cfg = ["--config", p(&config)];
    for i in 0..3u64 {
        bkimg_tests::write_at(&img, i * MIB, &bkimg_tests::noise(4096, 50 + i));
        let mut args = vec!["capture", "--quiet", p(&img)];
        args.extend(cfg);
        e.ok(&args, &[]);
    }
    let mut list = vec!["list", "--json"];
    list.extend(cfg);
    assert_eq!(json(&e.ok(&list, &[])).as_array().unwrap().len(), 3);

    // The file's rule alone; a flag replaces that rule; the environment names the file too.
    let dry = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["prune", "--dry-run", "--json"];
        args.extend_from_slice(extra);
        json(&e.ok(&args, env))
    };
    assert_eq!(kept(&dry(&cfg, &[])), 1);
    let two = dry(&["--config", p(&config), "--keep-last", "2"], &[]);
    assert_eq!(kept(&two), 2);
    assert_eq!(kept(&dry(&[], &[("BKIMG_CONFIG", p(&config))])), 1);
    // --repo wins over the file's repository.
    let elsewhere = e.path("elsewhere");
    let mut args = vec!["list", "--repo", p(&elsewhere)];
    args.extend(cfg);
    assert_eq!(e.run(&args, &[]).code, 4);

    let mut args = vec!["prune", "--json"];
    args.extend(cfg);
    let done = json(&e.ok(&args, &[]));
    assert_eq!(done["removed"].as_array().unwrap().len(), 2);
    assert_eq!(json(&e.ok(&list, &[])).as_array().unwrap().len(), 1);
}

#[test]
fn bad_config_file_is_refused_with_its_place() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let img = e.image();
    let repo = e.path("repo");
    let config = e.path("bad.toml");
    fs::write(
        &config,
        format!(
            "repository = \"{}\"\n[retention]\nkeep-dayly = 3\n",
            p(&repo)
        ),
    )
    .unwrap();
    for env in [vec![], vec![("BKIMG_CONFIG", p(&config))]] {
        let mut args = vec!["capture", "--quiet", p(&img)];
        if env.is_empty() {
            args.extend(["--config", p(&config)]);
        }
        let r = e.run(&args, &env);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(
            r.stderr.contains(&format!(
                "{} line 3, column 1: unknown field `keep-dayly`",
                p(&config)
            )),
            "{}",
            r.stderr
        );
        assert!(!repo.exists(), "nothing is done with a bad config file");
    }
    // A bad value is refused at its line too.
    fs::write(&config, "[retention]\nkeep-within = \"soon\"\n").unwrap();
    let r = e.run(&["list", "--config", p(&config)], &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("line 2, column 15"), "{}", r.stderr);
    // A config file that is named must exist.
    let missing = e.path("missing.toml");
    let r = e.run(&["list", "--repo", p(&repo), "--config", p(&missing)], &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains(p(&missing)), "{}", r.stderr);
}

#[test]
fn sizes_and_durations_in_human_units() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let img = e.image();
    let repo = e.path("repo");
    let capture = json(&e.ok(
        &[
            "capture",
            "--repo",
            p(&repo),
            "--chunk-size",
            "64KiB",
            "--json",
            "--quiet",
            p(&img),
        ],
        &[],
    ));
    let id = capture["id"].as_str().unwrap();
    let info = json(&e.ok(&["info", "--repo", p(&repo), id, "--json"], &[]));
    assert_eq!(info["manifest"]["chunk_size"], 65536);
    // The old name of the same option.
    let old = e.ok(
        &[
            "capture",
            "--repo",
            p(&repo),
            "--chunk-kib",
            "64",
            "--quiet",
            p(&img),
        ],
        &[],
    );
    assert!(old.stderr.contains("committed"), "{}", old.stderr);

    let within = json(&e.ok(
        &[
            "prune",
            "--repo",
            p(&repo),
            "--keep-within",
            "1h 30m",
            "--dry-run",
            "--json",
        ],
        &[],
    ));
    assert_eq!(kept(&within), 2);
    assert!(within["kept"][0]["reasons"]
        .as_array()
        .unwrap()
        .contains(&Value::from("within")));

    // Parsed, then refused for what is missing (a key), not for the units.
    let r = e.run(
        &[
            "replicate",
            "--repo",
            p(&repo),
            "--to",
            "bkimg://127.0.0.1:9",
            "--timeout",
            "1h 30m",
            "--bwlimit",
            "1GiB",
            "--parallel",
            "4",
        ],
        &[],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("--key DIR is needed"), "{}", r.stderr);

    let map = e.path("map");
    let v = json(&e.ok(
        &[
            "changemap",
            "-o",
            p(&map),
            "--device-size",
            "1GiB",
            "--block-size",
            "64K",
            "0+4096",
            "1048576+65537",
            "--json",
        ],
        &[],
    ));
    assert_eq!(v["device_size"], 1u64 << 30);
    assert_eq!(v["block_size"], 65536);
    assert_eq!(v["ranges"], 2);
    assert_eq!(v["bytes_changed"], 3 * 65536);
    assert_eq!(v["output"], p(&map));
    assert!(map.is_file());
}

#[test]
fn absurd_sizes_and_durations_are_refused() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let img = e.image();
    let repo = e.path("repo");
    for (args, what) in [
        (
            vec![
                "capture",
                "--repo",
                p(&repo),
                "--chunk-size",
                "99999999999T",
                p(&img),
            ],
            "\"99999999999T\" is too large",
        ),
        (
            vec![
                "capture",
                "--repo",
                p(&repo),
                "--chunk-size",
                "18446744073709551615",
                p(&img),
            ],
            "is too large",
        ),
        (
            vec![
                "replicate",
                "--repo",
                p(&repo),
                "--to",
                "s3://b",
                "--bwlimit",
                "20EiB",
            ],
            "is too large",
        ),
        (
            vec!["changemap", "-o", "/dev/null", "--device-size", "0"],
            "at least one byte",
        ),
        (
            vec!["prune", "--repo", p(&repo), "--keep-within", "1000y"],
            "too long a duration",
        ),
        (
            vec!["prune", "--repo", p(&repo), "--keep-within", "5 parsecs"],
            "is not a duration",
        ),
    ] {
        let r = e.run(&args, &[]);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(what), "{args:?}: {}", r.stderr);
    }
    // A size that fits in 64 bits but is no chunk size: refused after parsing.
    let r = e.run(
        &["capture", "--repo", p(&repo), "--chunk-size", "1T", p(&img)],
        &[],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--chunk-size must be"), "{}", r.stderr);
    assert!(!repo.exists());
}

#[test]
fn completions_are_valid_shell() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let bash = e.ok(&["completions", "bash"], &[]);
    assert!(bash.stdout.contains("bkimg"));
    let script = e.path("bkimg.bash");
    fs::write(&script, &bash.stdout).unwrap();
    let (code, out) = sh_status("bash", &["-n", p(&script)]);
    assert_eq!(code, 0, "bash -n: {out}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let r = e.ok(&["completions", shell], &[]);
        assert!(r.stdout.contains("standby"), "{shell}");
    }
    assert_eq!(e.run(&["completions", "tcsh"], &[]).code, 2);
}

#[test]
fn man_pages_for_every_command() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let dir = e.path("man1");
    e.ok(&["man", "--dir", p(&dir)], &[]);
    for page in [
        "bkimg.1",
        "bkimg-capture.1",
        "bkimg-restore.1",
        "bkimg-prune.1",
        "bkimg-standby.1",
        "bkimg-standby-serve.1",
        "bkimg-cbt-map.1",
        "bkimg-completions.1",
    ] {
        assert!(dir.join(page).is_file(), "{page} missing");
    }
    let page = dir.join("bkimg-restore.1");
    let out = Command::new("man")
        .args(["-P", "cat", "-l", p(&page)])
        .env("MANWIDTH", "100")
        .output()
        .expect("running man (apt-get install man-db)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("bkimg-restore"), "{text}");
    assert!(text.contains("--target"), "{text}");
    assert!(text.contains("BKIMG_REPOSITORY"), "{text}");
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", p(&page)])
        .output()
        .expect("running groff (apt-get install groff-base)");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "groff warnings");
}

#[test]
fn demo_json() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let dir = e.path("demo");
    let r = e.ok(&["demo", "--dir", p(&dir), "--json"], &[]);
    let v = json(&r);
    assert_eq!(v["dir"], p(&dir));
    assert!(v["id"].is_string() && v["recaptured"].is_string());
    let volumes: Vec<&str> = v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["filesystem"].as_str())
        .collect();
    assert_eq!(volumes, ["vfat", "swap", "ext4"]);
    // The commentary went to stderr.
    assert!(r.stderr.contains("==> capturing it"), "{}", r.stderr);
}

#[test]
fn standby_keys_from_the_config_file() {
    if !bkimg_tests::require_root() {
        return;
    }
    let e = Env::new();
    let img = e.image();
    let repo = e.path("repo");
    let key = e.path("key");
    let config = e.path("bkimg.toml");
    fs::write(&config, format!("[standby]\nkey = \"{}\"\n", p(&key))).unwrap();
    let env = [("BKIMG_CONFIG", p(&config))];
    let made = e.ok(&["standby", "keygen", "--json"], &env);
    let fp = json(&made)["fingerprint"].as_str().unwrap().to_string();
    assert!(key.join("standby.crt").is_file());
    let again = e.ok(&["standby", "fingerprint", "--json"], &env);
    assert_eq!(json(&again)["fingerprint"], fp.as_str());
    let r = e.run(&["standby", "fingerprint"], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    // With the key and the server's fingerprint from the file, replicate gets as far as
    // the network (nothing listens on port 9: unreachable, exit 9).
    fs::write(
        &config,
        format!(
            "[standby]\nkey = \"{}\"\nserver-fingerprint = \"{fp}\"\n",
            p(&key)
        ),
    )
    .unwrap();
    e.ok(&["capture", "--repo", p(&repo), "--quiet", p(&img)], &env);
    let r = e.run(
        &[
            "replicate",
            "--repo",
            p(&repo),
            "--to",
            "bkimg://127.0.0.1:9",
            "--retries",
            "0",
            "--timeout",
            "5s",
        ],
        &env,
    );
    assert_eq!(r.code, 9, "{}", r.stderr);
}
