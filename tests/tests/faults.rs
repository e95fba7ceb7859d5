//! Faults: damaged repositories, versions from the future, missing parents, refused targets,
//! killed and starved captures, sources that vanish or change, directories that are not
//! repositories.

use bkimg_tests::{
    capture_json as capture, count_files, list_json, noise, noise_image, u, CHUNK, MIB,
};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bkimg_tests::{
    bkimg, bkimg_ok, bkimg_path, p, sh, sh_status, sha256_file, Loop, Mount, Run, TempDir,
};
use serde_json::Value;

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Collects failed expectations so that one run reports every broken case, then fails.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let msg = what();
            eprintln!("CHECK FAILED: {msg}");
            self.0.push(msg);
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

fn show(r: &Run) -> String {
    format!(
        "exit {}, stdout {:?}, stderr {:?}",
        r.code, r.stdout, r.stderr
    )
}

// ------------------------------------------------------------------------------------------

/// What to damage: a name for messages, the path in the repository, and for chunks the
/// volume offset and digest verify must report.
type DamagedObject = (&'static str, PathBuf, Option<(u64, String)>);

#[derive(Clone, Copy, Debug)]
enum Damage {
    Flip,
    Truncate,
    Delete,
}

fn damage(path: &Path, how: Damage) {
    match how {
        Damage::Flip => {
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            let len = f.metadata().unwrap().len();
            let mut b = [0u8];
            f.read_exact_at(&mut b, len / 2).unwrap();
            b[0] ^= 0x5a;
            f.write_all_at(&b, len / 2).unwrap();
        }
        Damage::Truncate => {
            let f = fs::OpenOptions::new().write(true).open(path).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len / 2).unwrap();
        }
        Damage::Delete => fs::remove_file(path).unwrap(),
    }
}

#[test]
fn corrupted_objects_are_reported_and_restore_writes_nothing() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("src.img");
    let good = t.path().join("good");
    // Half noise, half text: stored chunks of both kinds (plain and zstd).
    let mut data = noise((4 * MIB) as usize, 41);
    // Numbered lines: every chunk differs (no dedup), yet compresses well.
    let mut line = 0u64;
    while (data.len() as u64) < 8 * MIB {
        data.extend(format!("line {line:010} of compressible text\n").as_bytes());
        line += 1;
    }
    data.truncate((8 * MIB) as usize);
    data[510] = 0;
    data[511] = 0;
    fs::write(&img, &data).unwrap();
    let cap = capture(&["--repo", p(&good), "--raw", p(&img)]);
    let id = cap["id"].as_str().unwrap().to_string();
    bkimg_ok(&["verify", "--repo", p(&good)]);

    let idx = entries(&good.join("indexes"));
    assert_eq!(idx.len(), 1, "one volume, one index: {idx:?}");
    let chunk_at = |n: u64| {
        let d = hex_sha256(&data[(n * CHUNK) as usize..((n + 1) * CHUNK) as usize]);
        (
            n * CHUNK,
            d.clone(),
            PathBuf::from("chunks").join(&d[..2]).join(&d),
        )
    };
    // Chunk 5 holds noise (stored plain), chunk 25 text (stored zstd).
    let objects: Vec<DamagedObject> = {
        let (o5, d5, p5) = chunk_at(5);
        let (o25, d25, p25) = chunk_at(25);
        vec![
            ("noise chunk", p5, Some((o5, d5))),
            ("zstd chunk", p25, Some((o25, d25))),
            ("index", PathBuf::from("indexes").join(&idx[0]), None),
            ("manifest", PathBuf::from("points").join(&id), None),
        ]
    };
    for (_, rel, _) in &objects {
        assert!(
            good.join(rel).is_file(),
            "{} is not in the repository",
            rel.display()
        );
    }
    // Byte 8 of a chunk blob is its compression: 0 plain, 1 zstd.
    assert_eq!(fs::read(good.join(&objects[0].1)).unwrap()[8], 0);
    assert_eq!(fs::read(good.join(&objects[1].1)).unwrap()[8], 1);

    let mut checks = Checks::default();
    let mut n = 0;
    for (kind, rel, chunk) in &objects {
        for how in [Damage::Flip, Damage::Truncate, Damage::Delete] {
            if matches!(how, Damage::Delete) && !kind.contains("chunk") {
                continue;
            }
            n += 1;
            let case = format!("{kind} {how:?}");
            let repo = t.path().join(format!("repo{n}"));
            sh("cp", &["-a", p(&good), p(&repo)]);
            damage(&repo.join(rel), how);

            // verify: exit 3, the problem names the point (and the volume, offset, chunk).
            let v = bkimg(&["verify", "--repo", p(&repo), "--json"]);
            checks.check(v.code == 3, || format!("{case}: verify: {}", show(&v)));
            let problems = serde_json::from_str::<Value>(&v.stdout)
                .ok()
                .and_then(|j| j["problems"].as_array().cloned())
                .unwrap_or_default();
            checks.check(!problems.is_empty(), || {
                format!("{case}: verify --json lists no problems: {}", show(&v))
            });
            for pr in &problems {
                checks.check(pr["point"] == id.as_str(), || {
                    format!("{case}: problem does not name point {id}: {pr}")
                });
                if *kind == "manifest" {
                    continue;
                }
                checks.check(pr["disk"] == "disk0" && pr["volume"] == "whole", || {
                    format!("{case}: problem does not name disk0/whole: {pr}")
                });
                if let Some((offset, digest)) = chunk {
                    checks.check(
                        pr["offset"].as_u64() == Some(*offset) && pr["chunk"] == digest.as_str(),
                        || format!("{case}: problem does not name offset {offset} / chunk {digest}: {pr}"),
                    );
                }
            }
            // The text form names them as well.
            let vt = bkimg(&["verify", "--repo", p(&repo)]);
            checks.check(
                vt.code == 3 && vt.stderr.contains(&format!("DAMAGED: {id}")),
                || format!("{case}: verify (text): {}", show(&vt)),
            );
            if let Some((offset, _)) = chunk {
                let want = format!("DAMAGED: {id} disk0 whole at byte {offset}:");
                checks.check(vt.stderr.contains(&want), || {
                    format!("{case}: no {want:?} in {:?}", vt.stderr)
                });
            }

            // restore to a new path: refused, and nothing written, not even the file.
            let target = t.path().join(format!("restored{n}.img"));
            let r = bkimg(&[
                "restore",
                "--repo",
                p(&repo),
                &id,
                "--target",
                p(&target),
                "--quiet",
            ]);
            let allowed: &[i32] = match (kind.contains("chunk"), how) {
                (true, Damage::Flip) => &[3],
                (true, Damage::Delete) => &[4],
                _ => &[3, 4],
            };
            checks.check(allowed.contains(&r.code), || {
                format!("{case}: restore should exit {allowed:?}: {}", show(&r))
            });
            checks.check(!target.exists(), || {
                let written = fs::read(&target).unwrap_or_default();
                format!(
                    "{case}: failed restore (exit {}) left the target behind: {} bytes at {}, {} of them \
                     non-zero (stderr: {})",
                    r.code,
                    written.len(),
                    target.display(),
                    written.iter().filter(|&&b| b != 0).count(),
                    r.stderr.trim()
                )
            });
        }
    }
    // The undamaged repository still restores (control).
    let ctl = t.path().join("control.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&good),
        &id,
        "--target",
        p(&ctl),
        "--quiet",
    ]);
    assert_eq!(sha256_file(&ctl), sha256_file(&img));
    checks.finish();
}

/// Several damaged chunks, three of them shared by two restore points: verify names every
/// damaged entry of every point (point, offset, chunk, why), in walk order, and reports the
/// same thing whatever the number of threads reading chunks.
#[test]
fn verify_reports_every_damaged_chunk() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("src.img");
    let repo = t.path().join("repo");
    let mut data = noise_image(&img, 8 * MIB, 77); // 32 chunks, all different
    let a = capture(&["--repo", p(&repo), "--raw", p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The second point changes the last two chunks and shares the other 30.
    let tail = noise((2 * CHUNK) as usize, 78);
    data[(30 * CHUNK) as usize..].copy_from_slice(&tail);
    bkimg_tests::write_at(&img, 30 * CHUNK, &tail);
    let b = capture(&["--repo", p(&repo), "--raw", "--parent", &a, p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let digest_at = |n: u64| hex_sha256(&data[(n * CHUNK) as usize..((n + 1) * CHUNK) as usize]);
    let path_of = |d: &str| repo.join("chunks").join(&d[..2]).join(d);
    // Shared chunks 3, 10 and 20 (flipped, deleted, truncated); chunk 31 of point b only.
    let damaged = [
        (3, Damage::Flip, "damaged"),
        (10, Damage::Delete, "missing"),
        (20, Damage::Truncate, "damaged"),
        (31, Damage::Flip, "damaged"),
    ];
    for (n, how, _) in damaged {
        damage(&path_of(&digest_at(n)), how);
    }
    let mut expected = Vec::new();
    for (point, chunks) in [(&a, &[3u64, 10, 20][..]), (&b, &[3, 10, 20, 31][..])] {
        for &n in chunks {
            let why = damaged.iter().find(|d| d.0 == n).unwrap().2;
            expected.push((point.clone(), n * CHUNK, digest_at(n), why));
        }
    }

    let mut outputs = Vec::new();
    for threads in [None, Some("1"), Some("3"), Some("64")] {
        let mut args = vec!["verify", "--repo", p(&repo), "--json"];
        if let Some(n) = threads {
            args.extend(["--threads", n]);
        }
        let v = bkimg(&args);
        assert_eq!(v.code, 3, "verify {threads:?}: {}", show(&v));
        let j = v.json();
        let problems = j["problems"].as_array().unwrap();
        let got: Vec<_> = problems
            .iter()
            .map(|pr| {
                assert!(
                    pr["disk"] == "disk0" && pr["volume"] == "whole",
                    "threads {threads:?}: {pr}"
                );
                (
                    pr["point"].as_str().unwrap().to_string(),
                    pr["offset"].as_u64().unwrap(),
                    pr["chunk"].as_str().unwrap().to_string(),
                    pr["error"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            got.len(),
            expected.len(),
            "threads {threads:?}: {problems:#?}"
        );
        for (g, (point, offset, chunk, why)) in got.iter().zip(&expected) {
            assert!(
                &g.0 == point && g.1 == *offset && &g.2 == chunk && g.3.contains(why),
                "threads {threads:?}: expected {point} at byte {offset} chunk {chunk} ({why}), \
                 got {g:?}; all: {problems:#?}"
            );
        }
        // 34 different chunks, 4 of them damaged: each good one counted once.
        assert_eq!(j["chunks_checked"], 30, "threads {threads:?}: {j}");
        assert_eq!(j["bytes_checked"], 30 * CHUNK, "threads {threads:?}: {j}");
        assert_eq!(j["points"], serde_json::json!([a, b]));
        outputs.push(v.stdout);
    }
    assert!(
        outputs.iter().all(|o| o == &outputs[0]),
        "verify reports differ with the number of threads: {outputs:#?}"
    );

    // The text form: one DAMAGED line per entry, in the same order, and the totals.
    let vt = bkimg(&["verify", "--repo", p(&repo), "--threads", "8"]);
    assert_eq!(vt.code, 3, "{}", show(&vt));
    let lines: Vec<&str> = vt
        .stderr
        .lines()
        .filter(|l| l.starts_with("DAMAGED: "))
        .collect();
    let want: Vec<String> = expected
        .iter()
        .map(|(point, offset, _, _)| format!("DAMAGED: {point} disk0 whole at byte {offset}: "))
        .collect();
    assert_eq!(lines.len(), want.len(), "{}", vt.stderr);
    for (l, w) in lines.iter().zip(&want) {
        assert!(l.starts_with(w.as_str()), "{l:?} should start with {w:?}");
    }
    assert!(
        vt.stderr
            .contains("2 restore point(s), 30 chunks (7.50 MiB) checked, 7 problem(s)"),
        "{}",
        vt.stderr
    );
}

// ------------------------------------------------------------------------------------------

#[test]
fn unknown_version_is_refused() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("src.img");
    let repo = t.path().join("repo");
    noise_image(&img, MIB, 51);
    let old = capture(&["--repo", p(&repo), "--raw", p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let new = capture(&["--repo", p(&repo), "--raw", p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = repo.join("points").join(&new);
    let bytes = fs::read(&manifest).unwrap();
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        1,
        "manifest version field"
    );
    let mut patched = bytes.clone();
    patched[8..12].copy_from_slice(&2u32.to_le_bytes());
    fs::write(&manifest, &patched).unwrap();

    let mut checks = Checks::default();
    let info = bkimg(&["info", "--repo", p(&repo), &new]);
    checks.check(
        info.code == 6 && info.stderr.contains("newer bkimg"),
        || format!("info of a version-2 point: {}", show(&info)),
    );
    let target = t.path().join("out.img");
    let r = bkimg(&["restore", "--repo", p(&repo), &new, "--target", p(&target)]);
    checks.check(r.code == 6 && r.stderr.contains("newer bkimg"), || {
        format!("restore of a version-2 point: {}", show(&r))
    });
    checks.check(!target.exists(), || {
        "refused restore created its target".into()
    });
    // list still shows the readable point and warns about the other (exit 3 or 6).
    let l = bkimg(&["list", "--repo", p(&repo), "--json"]);
    checks.check([3, 6].contains(&l.code), || format!("list: {}", show(&l)));
    checks.check(
        l.stderr.contains(&new) && l.stderr.contains("newer bkimg"),
        || format!("list does not warn: {}", show(&l)),
    );
    let listed: Vec<Value> = serde_json::from_str::<Value>(&l.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    checks.check(listed.len() == 1 && listed[0]["id"] == old.as_str(), || {
        format!("list --json: {}", l.stdout)
    });
    // "latest" must not silently mean an older restore point than the newest one.
    let latest = t.path().join("latest.img");
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        "latest",
        "--target",
        p(&latest),
        "--quiet",
    ]);
    checks.check(r.code == 6 || (r.code == 0 && r.stderr.contains(&new)), || {
        format!(
            "restore latest, the newest point {new} being unreadable: silently restored an older one \
             ({old}) instead of refusing or warning: {}",
            show(&r)
        )
    });
    let _ = fs::remove_file(&latest);
    // verify names it.
    let v = bkimg(&["verify", "--repo", p(&repo), &new]);
    checks.check(v.code == 3 || v.code == 6, || {
        format!("verify of a version-2 point: {}", show(&v))
    });
    checks.check(v.stderr.contains("newer bkimg"), || {
        format!("verify does not say why: {}", show(&v))
    });

    // An unknown incompatible feature bit is refused the same way.
    let mut feat = bytes.clone();
    feat[12..16].copy_from_slice(&1u32.to_le_bytes());
    fs::write(&manifest, &feat).unwrap();
    let info = bkimg(&["info", "--repo", p(&repo), &new]);
    checks.check(
        info.code == 6 && info.stderr.contains("newer bkimg"),
        || format!("info with incompat bit: {}", show(&info)),
    );
    // A compatible feature bit is ignored.
    let mut compat = bytes.clone();
    compat[16..20].copy_from_slice(&1u32.to_le_bytes());
    fs::write(&manifest, &compat).unwrap();
    let info = bkimg(&["info", "--repo", p(&repo), &new]);
    checks.check(info.code == 0, || {
        format!("info with a compat bit: {}", show(&info))
    });
    // Restored as written, it works again.
    fs::write(&manifest, &bytes).unwrap();
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &new,
        "--target",
        p(&target),
        "--quiet",
    ]);
    assert_eq!(sha256_file(&target), sha256_file(&img));
    checks.finish();
}

// ------------------------------------------------------------------------------------------

#[test]
fn missing_parent() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("src.img");
    let repo = t.path().join("repo");
    noise_image(&img, 4 * MIB, 61);

    let none = bkimg(&[
        "capture",
        "--quiet",
        "--repo",
        p(&repo),
        "--parent",
        "nonexistent",
        "--raw",
        p(&img),
    ]);
    assert_eq!(none.code, 4, "{}", show(&none));
    assert!(none.stderr.contains("nonexistent"), "{}", none.stderr);
    let latest = bkimg(&[
        "capture",
        "--quiet",
        "--repo",
        p(&repo),
        "--parent",
        "latest",
        "--raw",
        p(&img),
    ]);
    assert_eq!(
        latest.code,
        4,
        "--parent latest in an empty repository: {}",
        show(&latest)
    );
    assert!(list_json(&repo).is_empty());

    let parent = capture(&["--repo", p(&repo), "--raw", p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&noise(4096, 62), 2 * MIB)
        .unwrap();
    let child = capture(&["--repo", p(&repo), "--parent", &parent, "--raw", p(&img)]);
    let child_id = child["id"].as_str().unwrap().to_string();
    assert_eq!(child["parent"].as_str(), Some(parent.as_str()));
    bkimg_ok(&["verify", "--repo", p(&repo), &child_id]);

    fs::remove_file(repo.join("points").join(&parent)).unwrap();
    let v = bkimg(&["verify", "--repo", p(&repo), &child_id, "--json"]);
    assert_eq!(
        v.code,
        3,
        "verify of a child without its parent: {}",
        show(&v)
    );
    let problems = v.json()["problems"].as_array().cloned().unwrap();
    assert!(
        problems.iter().any(|pr| pr["point"] == child_id.as_str()
            && pr["error"].as_str().unwrap_or("").contains(&parent)),
        "no problem names the missing parent {parent}: {problems:?}"
    );
    let vt = bkimg(&["verify", "--repo", p(&repo)]);
    assert_eq!(vt.code, 3);
    assert!(
        vt.stderr.contains(&parent) && vt.stderr.contains("missing"),
        "{}",
        vt.stderr
    );

    // Incrementals carry complete indexes: the child restores without its parent.
    let target = t.path().join("out.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &child_id,
        "--target",
        p(&target),
        "--quiet",
    ]);
    assert_eq!(sha256_file(&target), sha256_file(&img));
    // Another incremental on top of the orphan works too.
    let grandchild = capture(&["--repo", p(&repo), "--parent", "latest", "--raw", p(&img)]);
    assert_eq!(grandchild["parent"].as_str(), Some(child_id.as_str()));
    assert_eq!(u(&grandchild["bytes_stored_new"]), 0);
}

// ------------------------------------------------------------------------------------------

#[test]
fn target_too_small_and_wrong_kinds() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("src.img");
    let repo = t.path().join("repo");
    let size = 4 * MIB;
    noise_image(&img, size, 71);
    let id = capture(&["--repo", p(&repo), "--raw", p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let restore = |target: &str, extra: &[&str]| {
        let mut a = vec![
            "restore",
            "--repo",
            p(&repo),
            &id,
            "--target",
            target,
            "--quiet",
        ];
        a.extend_from_slice(extra);
        bkimg(&a)
    };

    // An existing file smaller than the disk.
    let small = t.path().join("small.img");
    fs::write(&small, noise(MIB as usize, 72)).unwrap();
    let before = sha256_file(&small);
    let r = restore(p(&small), &[]);
    assert_eq!(r.code, 5, "{}", show(&r));
    assert!(
        r.stderr.contains(&size.to_string()),
        "message does not name the needed size {size}: {}",
        r.stderr
    );
    assert_eq!(fs::metadata(&small).unwrap().len(), MIB);
    assert_eq!(
        sha256_file(&small),
        before,
        "a refused restore changed the small target"
    );

    // A directory.
    let dir = t.path().join("adir");
    fs::create_dir(&dir).unwrap();
    let r = restore(p(&dir), &[]);
    assert_ne!(r.code, 0, "restore onto a directory: {}", show(&r));
    assert_eq!(r.code, 5, "{}", show(&r));
    assert!(entries(&dir).is_empty());

    // A mounted block device (ext4 on a loop device), even with --yes.
    let fsimg = t.path().join("fs.img");
    bkimg_tests::sparse_file(&fsimg, 32 * MIB);
    let lo = Loop::attach(&fsimg, 0, None, false);
    sh(
        "mkfs.ext4",
        &[
            "-F",
            "-q",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &lo.dev,
        ],
    );
    {
        let m = Mount::new(&lo.dev, "rw,noatime");
        fs::write(m.path().join("keep.txt"), b"precious\n").unwrap();
        sh("sync", &[]);
        let dev_before = sha256_file(Path::new(&lo.dev));
        let r = restore(&lo.dev, &["--yes"]);
        assert_eq!(r.code, 5, "restore onto a mounted device: {}", show(&r));
        assert!(
            r.stderr.contains("in use") || r.stderr.contains("mounted"),
            "{}",
            r.stderr
        );
        assert_eq!(
            sha256_file(Path::new(&lo.dev)),
            dev_before,
            "the mounted device changed"
        );
        assert_eq!(fs::read(m.path().join("keep.txt")).unwrap(), b"precious\n");
    }
    let (code, out) = sh_status("e2fsck", &["-fn", &lo.dev]);
    assert_eq!(
        code, 0,
        "filesystem damaged after the refused restore:\n{out}"
    );
    drop(lo);

    // An unmounted block device without --yes, stdin not a terminal: refused, untouched.
    let devimg = t.path().join("dev.img");
    fs::write(&devimg, noise((8 * MIB) as usize, 73)).unwrap();
    let dev_sha = sha256_file(&devimg);
    let lo = Loop::attach(&devimg, 0, None, false);
    let r = restore(&lo.dev, &[]);
    assert_eq!(
        r.code,
        5,
        "restore onto a block device without --yes: {}",
        show(&r)
    );
    assert!(r.stderr.contains("--yes"), "{}", r.stderr);
    assert_eq!(sha256_file(Path::new(&lo.dev)), dev_sha);
    // With --yes it is written (control): the first 4 MiB are the image.
    let r = restore(&lo.dev, &["--yes"]);
    assert_eq!(
        r.code,
        0,
        "restore --yes onto an unmounted loop device: {}",
        show(&r)
    );
    drop(lo);
    let written = fs::read(&devimg).unwrap();
    assert_eq!(hex_sha256(&written[..size as usize]), sha256_file(&img));
    assert_eq!(written.len() as u64, 8 * MIB);
}

// ------------------------------------------------------------------------------------------

#[test]
fn killed_capture_leaves_no_restore_point_and_rerun_completes() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("big.img");
    let repo = t.path().join("repo");
    // Debug builds compress noise at level 19 at a few MiB/s: 64 MiB takes well over a second.
    let size = 64 * MIB;
    noise_image(&img, size, 81);
    let total = size / CHUNK;

    let started = Instant::now();
    let mut child = Command::new(bkimg_path())
        .args([
            "capture",
            "--quiet",
            "--level",
            "19",
            "--raw",
            "--repo",
            p(&repo),
            p(&img),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it stored something (or 1 s), then kill it.
    while started.elapsed() < Duration::from_millis(1000) {
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > Duration::from_millis(300)
            && repo.join("chunks").is_dir()
            && count_files(&repo.join("chunks")) >= 2
        {
            break;
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "capture finished before it could be killed"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        LocalRepo(&repo).is_repo(),
        "the killed capture did not even create the repository"
    );
    let stored = count_files(&repo.join("chunks"));
    eprintln!(
        "killed after {:?} with {stored} of {total} chunks stored",
        started.elapsed()
    );
    assert!((stored as u64) < total);

    assert!(
        list_json(&repo).is_empty(),
        "a killed capture left a restore point"
    );
    if stored > 0 {
        // The killed writer's scratch directory is still there for the next writer to remove.
        assert!(
            !entries(&repo.join("tmp")).is_empty(),
            "no scratch left by the killed capture?"
        );
    }
    assert!(entries(&repo.join("points")).is_empty());
    let v = bkimg(&["verify", "--repo", p(&repo)]);
    assert_eq!(v.code, 0, "{}", show(&v));

    let rerun = capture(&["--repo", p(&repo), "--raw", p(&img)]);
    let new = u(&rerun["disks"][0]["chunks_new"]);
    assert_eq!(
        new,
        total - stored as u64,
        "the rerun should store exactly the chunks the killed run did not"
    );
    if stored > 0 {
        assert!(new < total);
    }
    assert_eq!(count_files(&repo.join("chunks")) as u64, total);
    assert_eq!(
        entries(&repo.join("tmp")),
        Vec::<String>::new(),
        "stale scratch left in tmp/"
    );
    assert_eq!(list_json(&repo).len(), 1);
    bkimg_ok(&["verify", "--repo", p(&repo)]);
    let out = t.path().join("out.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        "--target",
        p(&out),
        "--quiet",
    ]);
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

struct LocalRepo<'a>(&'a Path);

impl LocalRepo<'_> {
    fn is_repo(&self) -> bool {
        self.0.join("config").is_file() && self.0.join("points").is_dir()
    }
}

// ------------------------------------------------------------------------------------------

/// A tmpfs mount, unmounted on drop.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = TempDir::new().unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                p(dir.path()),
            ],
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn disk_full_while_capturing() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("src.img");
    let size = 48 * MIB;
    noise_image(&img, size, 91);
    let small = Tmpfs::new("16m");
    let repo = small.dir.path().join("repo");

    let r = bkimg(&["capture", "--quiet", "--raw", "--repo", p(&repo), p(&img)]);
    assert_eq!(r.code, 1, "capture into a full filesystem: {}", show(&r));
    assert!(
        r.stderr.contains("No space left on device") && r.stderr.contains("disk is full"),
        "the message does not say the disk is full: {}",
        r.stderr
    );
    assert!(
        list_json(&repo).is_empty(),
        "a failed capture left a restore point"
    );
    assert_eq!(
        entries(&repo.join("tmp")),
        Vec::<String>::new(),
        "failed capture left scratch behind"
    );
    let stored = count_files(&repo.join("chunks")) as u64;
    assert!(
        stored > 0 && stored < size / CHUNK,
        "{stored} chunks stored"
    );
    bkimg_ok(&["verify", "--repo", p(&repo)]);

    // Enlarged, the same command completes and reuses what was stored.
    sh("mount", &["-o", "remount,size=128m", p(small.dir.path())]);
    let ok = capture(&["--raw", "--repo", p(&repo), p(&img)]);
    assert_eq!(u(&ok["disks"][0]["chunks_new"]), size / CHUNK - stored);
    assert_eq!(list_json(&repo).len(), 1);
    let out = t.path().join("out.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        "--target",
        p(&out),
        "--quiet",
    ]);
    assert_eq!(sha256_file(&out), sha256_file(&img));
    drop(small);
    // The message says it once, not "No space left on device (os error 28): No space left on
    // device (os error 28)".
    assert_eq!(
        r.stderr.matches("No space left on device").count(),
        1,
        "the OS error is repeated in the message: {}",
        r.stderr
    );
}

// ------------------------------------------------------------------------------------------

/// Runs a slow capture (level 19, one thread) of `img` and, once it has stored its first
/// chunk (so it has opened and sized the source), calls `meddle`. Returns the run and
/// whether `meddle` ran before the capture ended.
fn capture_while(repo: &Path, img: &Path, meddle: impl FnOnce() + Send) -> (Run, bool) {
    let chunks_before = if repo.join("chunks").is_dir() {
        count_files(&repo.join("chunks"))
    } else {
        0
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return false;
                }
                if repo.join("chunks").is_dir() && count_files(&repo.join("chunks")) > chunks_before
                {
                    meddle();
                    return !done.load(std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        let r = bkimg(&[
            "capture",
            "--quiet",
            "--level",
            "19",
            "--threads",
            "1",
            "--raw",
            "--repo",
            p(repo),
            p(img),
        ]);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let in_time = watcher.join().unwrap();
        (r, in_time)
    })
}

#[test]
fn unreadable_and_changing_sources() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let repo = t.path().join("repo");

    let missing = t.path().join("no-such-disk.img");
    let r = bkimg(&["capture", "--quiet", "--repo", p(&repo), p(&missing)]);
    assert_eq!(r.code, 1, "{}", show(&r));
    assert!(
        r.stderr.contains(p(&missing)),
        "message does not name the path: {}",
        r.stderr
    );
    let r = bkimg(&["capture", "--quiet", "--repo", p(&repo), p(t.path())]);
    assert_eq!(r.code, 1, "a directory as source: {}", show(&r));
    assert!(r.stderr.contains(p(t.path())), "{}", r.stderr);

    // A source that grows while a slow capture reads it.
    let img = t.path().join("first.img");
    let size = 8 * MIB;
    noise_image(&img, size, 101);
    let (r, in_time) = capture_while(&repo, &img, || {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(&img).unwrap();
        f.write_all(&noise(MIB as usize, 103)).unwrap();
    });
    assert!(
        in_time,
        "the capture ended before the source grew: {}",
        show(&r)
    );
    assert_ne!(
        r.code,
        0,
        "capture of a growing source succeeded: {}",
        show(&r)
    );
    assert!(r.stderr.contains("changed size"), "{}", r.stderr);
    assert!(
        list_json(&repo).is_empty(),
        "a restore point was committed from a changing source"
    );
    // Once quiet, the grown source captures.
    let ok = capture(&["--repo", p(&repo), "--raw", p(&img)]);
    assert_eq!(u(&ok["bytes_read"]), size + MIB);

    // A source that shrinks while it is read: refused, and the message says why.
    let img2 = t.path().join("second.img");
    noise_image(&img2, size, 104);
    let (r, in_time) = capture_while(&repo, &img2, || {
        fs::OpenOptions::new()
            .write(true)
            .open(&img2)
            .unwrap()
            .set_len(MIB)
            .unwrap();
    });
    assert!(
        in_time,
        "the capture ended before the source shrank: {}",
        show(&r)
    );
    assert_ne!(
        r.code,
        0,
        "capture of a shrinking source succeeded: {}",
        show(&r)
    );
    assert_eq!(
        list_json(&repo).len(),
        1,
        "a restore point was committed from a shrinking source"
    );
    assert!(
        r.stderr.contains("shrink") || r.stderr.contains("changed size"),
        "the message does not say the source shrank (or failed to read): {}",
        r.stderr
    );
}

// ------------------------------------------------------------------------------------------

#[test]
fn not_a_repository() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let r = bkimg(&["list", "--repo", "/nonexistent/bkimg-repo"]);
    assert_eq!(r.code, 4, "{}", show(&r));
    assert!(r.stderr.contains("/nonexistent/bkimg-repo"), "{}", r.stderr);

    let other = t.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("letter.txt"), b"not a repository\n").unwrap();
    fs::create_dir(other.join("points")).unwrap();
    let r = bkimg(&["list", "--repo", p(&other)]);
    assert_eq!(r.code, 4, "{}", show(&r));
    assert!(r.stderr.contains("not a bkimg repository"), "{}", r.stderr);
    for cmd in [
        &["info", "--repo", p(&other)][..],
        &["verify", "--repo", p(&other)][..],
    ] {
        let r = bkimg(cmd);
        assert_eq!(r.code, 4, "{cmd:?}: {}", show(&r));
    }
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let r = bkimg(&["list", "--repo", p(&empty)]);
    assert_eq!(r.code, 4, "an empty directory: {}", show(&r));
    let file = t.path().join("file");
    fs::write(&file, b"hello").unwrap();
    let r = bkimg(&["list", "--repo", p(&file)]);
    assert_eq!(r.code, 4, "a regular file: {}", show(&r));

    // capture into a non-empty directory that is not a repository: refused, untouched.
    let img = t.path().join("src.img");
    noise_image(&img, MIB, 111);
    let before = (
        entries(&other),
        entries(&other.join("points")),
        fs::read(other.join("letter.txt")).unwrap(),
    );
    let r = bkimg(&["capture", "--quiet", "--repo", p(&other), p(&img)]);
    assert_ne!(
        r.code,
        0,
        "capture into a non-repository directory: {}",
        show(&r)
    );
    assert_eq!(r.code, 4, "{}", show(&r));
    assert!(
        r.stderr.contains("neither empty nor a bkimg repository"),
        "{}",
        r.stderr
    );
    let after = (
        entries(&other),
        entries(&other.join("points")),
        fs::read(other.join("letter.txt")).unwrap(),
    );
    assert_eq!(before, after, "the directory was changed");
    assert!(entries(&other.join("points")).is_empty());
}

/// A regular file that backs a loop device (mounted or not) is in use: restoring into it
/// would write under a filesystem or a program that has it open. Refused, untouched, with
/// the loop device named; once detached, the same restore goes through.
#[test]
fn a_file_backing_a_loop_device_is_refused() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("src.img");
    let repo = t.path().join("repo");
    noise_image(&img, 4 * MIB, 91);
    let id = capture(&["--repo", p(&repo), "--raw", p(&img)])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let target = t.path().join("busy.img");
    fs::write(&target, noise(8 * MIB as usize, 92)).unwrap();
    let before = sha256_file(&target);
    let restore = || {
        bkimg(&[
            "restore",
            "--repo",
            p(&repo),
            &id,
            "--target",
            p(&target),
            "--yes",
            "--quiet",
        ])
    };
    {
        let lo = Loop::attach(&target, 0, None, false);
        let r = restore();
        assert_eq!(r.code, 5, "{}", show(&r));
        assert!(
            r.stderr.contains(&lo.dev) && r.stderr.contains("losetup -d"),
            "the message does not name the loop device and what to do: {}",
            r.stderr
        );
        assert_eq!(sha256_file(&target), before, "the busy file was written to");
    }
    let r = restore();
    assert_eq!(r.code, 0, "{}", show(&r));
}

/// Captures with a wrong --repo or source: the right exit code, one line naming the object
/// and what to do, and nothing created (a capture used to make the repository directory
/// before finding its source missing, and to answer a file as --repo with exit 1 and an
/// I/O message).
#[test]
fn capture_into_a_file_or_from_a_missing_source() {
    let t = TempDir::new().unwrap();
    let img = t.path().join("disk.img");
    noise_image(&img, MIB, 93);
    let file = t.path().join("file");
    fs::write(&file, b"hello").unwrap();
    let r = bkimg(&["capture", "--repo", p(&file), p(&img), "-q"]);
    assert_eq!(r.code, 4, "{}", show(&r));
    assert!(
        r.stderr.contains(p(&file)) && r.stderr.contains("not a bkimg repository"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(&file).unwrap(), b"hello");

    let repo = t.path().join("new-repo");
    let missing = t.path().join("missing.img");
    let r = bkimg(&["capture", "--repo", p(&repo), p(&missing), "-q"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(p(&missing)) && r.stderr.lines().count() == 1,
        "{}",
        r.stderr
    );
    assert!(
        !repo.exists(),
        "a capture with no source created {}",
        repo.display()
    );
}

/// A capture (not live) of a mounted source is refused, naming the source and the ways
/// out; with --allow-inconsistent it goes through and the restore point says it may be
/// inconsistent; unmounted, the capture is "offline". (It used to copy a mounted disk
/// silently.)
#[test]
fn a_source_in_use_is_refused_unless_allowed() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("fs.img");
    fs::File::create(&img).unwrap().set_len(32 * MIB).unwrap();
    sh("mkfs.ext4", &["-q", "-F", p(&img)]);
    let repo = t.path().join("repo");
    let lo = Loop::attach(&img, 0, None, false);
    let consistency = |repo: &Path| {
        bkimg_ok(&["info", "--repo", p(repo), "--json"]).json()["consistency"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    {
        let _m = Mount::new(&lo.dev, "rw");
        for source in [lo.dev.as_str(), p(&img)] {
            let r = bkimg(&["capture", "--repo", p(&repo), source, "-q"]);
            assert_eq!(r.code, 5, "{source}: {}", show(&r));
            assert!(
                r.stderr.contains(source)
                    && r.stderr.contains("--live")
                    && r.stderr.contains("--allow-inconsistent"),
                "{}",
                r.stderr
            );
            assert!(!repo.exists(), "a refused capture created the repository");
        }
        bkimg_ok(&[
            "capture",
            "--repo",
            p(&repo),
            &lo.dev,
            "--allow-inconsistent",
            "-q",
        ]);
        assert_eq!(consistency(&repo), "inconsistent");
        let text = bkimg_ok(&["list", "--repo", p(&repo)]).stdout;
        assert!(text.contains("may be inconsistent"), "{text}");
    }
    // Unmounted (the loop device still attached, idle): offline.
    bkimg_ok(&["capture", "--repo", p(&repo), &lo.dev, "-q"]);
    assert_eq!(consistency(&repo), "offline");
    let text = bkimg_ok(&["info", "--repo", p(&repo)]).stdout;
    assert!(
        text.contains("offline: no disk was mounted or in use"),
        "{text}"
    );
}
