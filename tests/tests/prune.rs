//! Retention: `bkimg prune` keeps what its rules name, frees exactly the data only the
//! removed restore points used, leaves every kept point restorable (its digest chain now
//! ends at a prune record), refuses a repository in use, and survives being killed.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bkimg_tests::{
    bkimg, bkimg_ok, bkimg_path, capture_json, count_files, list_json, noise, noise_image, p,
    restore_to, sha256_file, u, write_at, TempDir, CHUNK, MIB,
};
use serde_json::Value;

const SIZE: u64 = 32 * MIB;
/// Each incremental rewrites one 2 MiB region: 8 chunks.
const REGION: u64 = 2 * MIB;

/// A repository with five restore points of one image: a full one, then four
/// incrementals, each rewriting its own region. Returns (ids oldest first, the image's
/// SHA-256 at each point, the image path).
fn five_points(dir: &Path) -> (Vec<String>, Vec<String>, PathBuf) {
    let img = dir.join("disk.img");
    let repo = dir.join("repo");
    noise_image(&img, SIZE, 1);
    let mut ids = Vec::new();
    let mut states = Vec::new();
    for i in 0..5u64 {
        if i > 0 {
            write_at(&img, i * 4 * MIB, &noise(REGION as usize, 100 + i));
        }
        let mut args = vec!["--repo", p(&repo)];
        if i > 0 {
            args.extend(["--parent", "latest"]);
        }
        args.push(p(&img));
        ids.push(capture_json(&args)["id"].as_str().unwrap().to_string());
        states.push(sha256_file(&img));
    }
    (ids, states, img)
}

fn prune(repo: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["prune", "--repo", p(repo), "--json"];
    args.extend_from_slice(extra);
    bkimg_ok(&args).json()
}

fn ids_of(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect()
}

fn chunk_files(repo: &Path) -> usize {
    count_files(&repo.join("chunks"))
}

#[test]
fn keeps_what_the_rules_name_and_frees_only_what_removed_points_used() {
    let dir = TempDir::new().unwrap();
    let repo = dir.path().join("repo");
    let (ids, states, img) = five_points(dir.path());
    let chunks_before = chunk_files(&repo);
    assert_eq!(chunks_before as u64, SIZE / CHUNK + 4 * REGION / CHUNK);

    // A dry run says what would go and deletes nothing.
    let dry = prune(&repo, &["--keep-last", "2", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        ids_of(&dry, "removed"),
        vec![ids[2].clone(), ids[1].clone(), ids[0].clone()]
    );
    assert_eq!(chunk_files(&repo), chunks_before);
    assert_eq!(list_json(&repo).len(), 5);

    let done = prune(&repo, &["--keep-last", "2"]);
    assert_eq!(ids_of(&done, "kept"), vec![ids[4].clone(), ids[3].clone()]);
    assert_eq!(
        done["kept"][0]["reasons"],
        serde_json::json!(["newest", "last"])
    );
    // The original chunks of the regions points 1-3 rewrote are used by no kept point;
    // every other chunk is (point 3 holds the first three rewrites, point 4 the fourth).
    let freed = 3 * REGION / CHUNK;
    assert_eq!(u(&done["chunks_removed"]), freed);
    assert_eq!(chunk_files(&repo) as u64, chunks_before as u64 - freed);
    assert_eq!(u(&done["indexes_removed"]), 3);
    assert_eq!(u(&done["prune_records_written"]), 1, "{done}");
    assert!(repo.join("pruned").join(&ids[2]).is_file());

    let listed = list_json(&repo);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["id"], ids[3].as_str());
    assert_eq!(listed[0]["parent_pruned"], true);
    assert_eq!(listed[1]["parent_pruned"], false);

    // Every kept point verifies (its chain ends at the record) and restores exactly.
    bkimg_ok(&["verify", "--repo", p(&repo)]);
    for i in [3, 4] {
        let out = dir.path().join(format!("out{i}.img"));
        restore_to(&repo, &ids[i], &out);
        assert_eq!(sha256_file(&out), states[i], "restore of point {i}");
    }
    // An export carries the record, so it verifies on its own.
    let export = dir.path().join("p3.bkimg");
    bkimg_ok(&[
        "export",
        "--repo",
        p(&repo),
        &ids[3],
        "-o",
        p(&export),
        "-q",
    ]);
    bkimg_ok(&["verify", "--repo", p(&export)]);

    // Capturing goes on from the kept newest point.
    write_at(&img, 30 * MIB, &noise(REGION as usize, 999));
    let next = capture_json(&["--repo", p(&repo), "--parent", "latest", p(&img)]);
    assert_eq!(next["parent"], ids[4].as_str());
    let next_id = next["id"].as_str().unwrap().to_string();

    // Pruning again moves the end of the chain: a record for the newly pruned parent,
    // none left for the one no remaining point names.
    let again = prune(&repo, &["--keep-last", "2"]);
    assert_eq!(ids_of(&again, "removed"), vec![ids[3].clone()]);
    assert_eq!(u(&again["prune_records_written"]), 1);
    assert_eq!(u(&again["prune_records_removed"]), 1);
    assert!(!repo.join("pruned").join(&ids[2]).exists());
    assert!(repo.join("pruned").join(&ids[3]).is_file());
    bkimg_ok(&["verify", "--repo", p(&repo)]);
    let out = dir.path().join("next.img");
    restore_to(&repo, &next_id, &out);
    assert_eq!(sha256_file(&out), sha256_file(&img));

    // Nothing left to remove: a prune with the same rules changes nothing.
    let idle = prune(&repo, &["--keep-last", "2"]);
    assert_eq!(ids_of(&idle, "removed").len(), 0);
    assert_eq!(u(&idle["chunks_removed"]), 0);
}

#[test]
fn pinned_and_recent_points_are_kept() {
    let dir = TempDir::new().unwrap();
    let repo = dir.path().join("repo");
    let (ids, states, _) = five_points(dir.path());
    // Every point is younger than an hour: --keep-within keeps them all.
    let within = prune(&repo, &["--keep-within", "1h"]);
    assert_eq!(ids_of(&within, "removed").len(), 0);
    assert_eq!(within["kept"][4]["reasons"], serde_json::json!(["within"]));
    // A pinned point (by unique prefix) survives --keep-last 1, and so does its data.
    let prefix = &ids[1][..ids[1].len() - 2];
    let pinned = prune(&repo, &["--keep-last", "1", "--keep", prefix]);
    assert_eq!(
        ids_of(&pinned, "kept"),
        vec![ids[4].clone(), ids[1].clone()]
    );
    let out = dir.path().join("p1.img");
    restore_to(&repo, &ids[1], &out);
    assert_eq!(sha256_file(&out), states[1]);
    // Point 1 is a child of the full point 0, which is gone: two records now (0 for
    // point 1, 3 for point 4).
    assert_eq!(count_files(&repo.join("pruned")), 2);
    bkimg_ok(&["verify", "--repo", p(&repo)]);
    // No rule at all is refused: pruning to nothing is never what leaving them out means.
    let r = bkimg(&["prune", "--repo", p(&repo)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("say what to keep"), "{}", r.stderr);
}

#[test]
fn refuses_a_repository_in_use_and_a_damaged_manifest() {
    let dir = TempDir::new().unwrap();
    let repo = dir.path().join("repo");
    let (ids, _, _) = five_points(dir.path());
    let chunks = chunk_files(&repo);

    // A capture, restore or replication holds the repository's lock shared: here a
    // holder that keeps it until its standard input closes, and says when it has it.
    let mut holder = Command::new("flock")
        .args(["-s", p(&repo.join("lock")), "sh", "-c", "echo held; cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "held\n");
    let r = bkimg(&["prune", "--repo", p(&repo), "--keep-last", "1"]);
    assert_eq!(r.code, 10, "{}", r.stderr);
    assert!(r.stderr.contains("is in use"), "{}", r.stderr);
    assert!(r.stderr.contains("--wait"), "{}", r.stderr);
    assert_eq!(list_json(&repo).len(), 5);
    assert_eq!(chunk_files(&repo), chunks);
    // With --wait it blocks on the lock (the kernel lists it as a waiter), and runs once
    // the holder is done.
    let waiting = Command::new(bkimg_path())
        .args([
            "prune",
            "--repo",
            p(&repo),
            "--json",
            "--keep-last",
            "4",
            "--wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let pid = waiting.id().to_string();
    while !fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("->") && l.split_whitespace().nth(5) == Some(pid.as_str()))
    {
        assert!(
            Instant::now() < deadline,
            "prune --wait never waited for the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(list_json(&repo).len(), 5, "pruned while the lock was held");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let out = waiting.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let waited: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids_of(&waited, "removed"), vec![ids[0].clone()]);

    // An unreadable manifest: its data cannot be known, so nothing is deleted.
    let m = repo.join("points").join(&ids[2]);
    let mut bytes = fs::read(&m).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 0x20;
    fs::write(&m, &bytes).unwrap();
    let chunks = chunk_files(&repo);
    let r = bkimg(&["prune", "--repo", p(&repo), "--keep-last", "1"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&ids[2]), "{}", r.stderr);
    assert!(r.stderr.contains("prune deletes nothing"), "{}", r.stderr);
    assert_eq!(chunk_files(&repo), chunks);
}

#[test]
fn a_killed_prune_leaves_a_consistent_repository_and_the_next_one_finishes() {
    let dir = TempDir::new().unwrap();
    let repo = dir.path().join("repo");
    let (ids, states, _) = five_points(dir.path());
    let chunks = chunk_files(&repo);
    // Killed after the manifests went, before any data did: the prune waits there (a
    // test hook) and says so by creating `paused`.
    let paused = dir.path().join("paused");
    let mut child = Command::new(bkimg_path())
        .args(["prune", "--repo", p(&repo), "--keep-last", "2", "--quiet"])
        .env(
            "BKIMG_TEST_PAUSE",
            format!("prune-manifests-deleted:{}", paused.display()),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !paused.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "prune ended before its pause point (built without --features bkimg/test-hooks?)"
        );
        assert!(
            Instant::now() < deadline,
            "prune never reached its pause point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        count_files(&repo.join("points")),
        2,
        "the manifests go first"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(chunk_files(&repo), chunks, "no data deleted yet");
    // What is left is consistent: the kept points verify and restore.
    bkimg_ok(&["verify", "--repo", p(&repo)]);
    let out = dir.path().join("p3.img");
    restore_to(&repo, &ids[3], &out);
    assert_eq!(sha256_file(&out), states[3]);
    // The next prune collects the garbage.
    let done = prune(&repo, &["--keep-last", "2"]);
    assert_eq!(ids_of(&done, "removed").len(), 0);
    assert_eq!(u(&done["chunks_removed"]), 3 * REGION / CHUNK);
    assert_eq!(u(&done["indexes_removed"]), 3);
    bkimg_ok(&["verify", "--repo", p(&repo)]);
}
