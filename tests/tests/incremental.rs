//! Incrementals: hash-diff against the parent's index, change maps (changed-blocks),
//! falling back when a change map cannot be trusted, and deduplication across sources.

use bkimg_tests::{
    capture_json as capture, count_files, list_json, noise, noise_image, restore_to, u, write_at,
    CHUNK, MIB,
};
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use bkimg_tests::{
    bkimg, bkimg_ok, p, sh, sh_status, sha256_file, sparse_file, tree_listing, Loop, Mount, TempDir,
};
use serde_json::Value;

fn disk0(v: &Value) -> &Value {
    &v["disks"][0]
}

/// Chunks touched by byte ranges after rounding them out to `block` bytes, as a change map does.
fn touched_chunks(ranges: &[(u64, u64)], block: u64, device: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for &(start, len) in ranges {
        let s = start / block * block;
        let e = ((start + len).div_ceil(block) * block).min(device);
        for c in s / CHUNK..e.div_ceil(CHUNK) {
            set.insert(c);
        }
    }
    set
}

fn index_of(repo: &Path, id: &str) -> String {
    let info = bkimg_ok(&["info", "--repo", p(repo), id, "--json"]).json();
    let vols = info["manifest"]["disks"][0]["volumes"]
        .as_array()
        .expect("volumes")
        .clone();
    assert_eq!(
        vols.len(),
        1,
        "a raw image without a table is one volume: {vols:?}"
    );
    assert_eq!(vols[0]["name"], "whole");
    vols[0]["content"]["index"]
        .as_str()
        .expect("index id")
        .to_string()
}

// ------------------------------------------------------------------------------------------

const PART_OFFSET: u64 = MIB; // sector 2048
const PART_SIZE: u64 = 64 * MIB;

/// Lists the files of the ext4 partition of `disk` (mounted read-only) and checks it with
/// `e2fsck -fn`.
fn fs_listing(disk: &Path) -> Vec<String> {
    let lo = Loop::attach(disk, PART_OFFSET, Some(PART_SIZE), true);
    let (code, out) = sh_status("e2fsck", &["-fn", &lo.dev]);
    assert_eq!(
        code,
        0,
        "e2fsck -fn on {} of {} is not clean:\n{out}",
        lo.dev,
        disk.display()
    );
    let m = Mount::new(&lo.dev, "ro");
    let listing = tree_listing(m.path());
    drop(m);
    drop(lo);
    listing
}

/// Whether every data volume of restore point `id` was captured raw (then a restore is
/// byte-identical to the source; with allocation maps, free blocks come back as zeros).
fn all_raw(repo: &Path, id: &str) -> bool {
    let info = bkimg_ok(&["info", "--repo", p(repo), id, "--json"]).json();
    info["manifest"]["disks"][0]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter(|v| v["content"]["kind"] == "data")
        .all(|v| v["content"]["mode"] == "raw")
}

#[test]
fn hash_diff_incremental_round_trip() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let disk = t.path().join("disk.img");
    let repo = t.path().join("repo");
    sparse_file(&disk, 68 * MIB);
    sh(
        "sgdisk",
        &["-o", "-n", "1:2048:+64M", "-t", "1:8300", p(&disk)],
    );

    // ext4 with files: a 24 MiB file, 40 small ones, a directory, a symlink.
    {
        let lo = Loop::attach(&disk, PART_OFFSET, Some(PART_SIZE), false);
        sh(
            "mkfs.ext4",
            &[
                "-F",
                "-q",
                "-L",
                "incr",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &lo.dev,
            ],
        );
        let m = Mount::new(&lo.dev, "rw");
        let root = m.path();
        fs::write(root.join("big.bin"), noise(24 * MIB as usize, 1)).unwrap();
        fs::create_dir(root.join("small")).unwrap();
        for i in 0..40u64 {
            fs::write(
                root.join(format!("small/f{i:02}")),
                noise(128 * 1024, 100 + i),
            )
            .unwrap();
        }
        fs::write(root.join("notes.txt"), b"hello bkimg\n".repeat(1000)).unwrap();
        std::os::unix::fs::symlink("small/f01", root.join("link")).unwrap();
        sh("sync", &[]);
        drop(m);
        drop(lo);
    }
    let original = fs_listing(&disk);
    assert!(original.len() > 40, "{original:?}");
    let original_sha = sha256_file(&disk);

    let full = capture(&["--repo", p(&repo), p(&disk)]);
    let full_id = full["id"].as_str().unwrap().to_string();
    assert_eq!(disk0(&full)["mode"], "full");
    assert!(full["parent"].is_null());
    let full_stored = u(&full["bytes_stored_new"]);
    assert!(
        full_stored > 24 * MIB,
        "the full stored only {full_stored} bytes of ~29 MiB of noise"
    );

    // Modify: overwrite 512 KiB inside the big file, add a 1 MiB file, delete a small one.
    {
        let lo = Loop::attach(&disk, PART_OFFSET, Some(PART_SIZE), false);
        let m = Mount::new(&lo.dev, "rw");
        let root = m.path();
        write_at(&root.join("big.bin"), 10 * MIB, &noise(512 * 1024, 2));
        fs::write(root.join("added.bin"), noise(MIB as usize, 3)).unwrap();
        fs::remove_file(root.join("small/f07")).unwrap();
        sh("sync", &[]);
        drop(m);
        drop(lo);
    }
    let modified = fs_listing(&disk);
    assert_ne!(modified, original);
    assert!(modified.iter().any(|l| l.starts_with("added.bin ")));
    assert!(!modified.iter().any(|l| l.starts_with("small/f07 ")));
    let modified_sha = sha256_file(&disk);

    let incr = capture(&["--repo", p(&repo), "--parent", "latest", p(&disk)]);
    let incr_id = incr["id"].as_str().unwrap().to_string();
    assert_eq!(disk0(&incr)["mode"], "hash-diff", "{incr:#}");
    assert_eq!(incr["parent"].as_str(), Some(full_id.as_str()));
    let incr_stored = u(&incr["bytes_stored_new"]);
    eprintln!("full stored {full_stored} bytes; hash-diff incremental stored {incr_stored} bytes in {} chunks", disk0(&incr)["chunks_new"]);
    assert!(
        incr_stored < full_stored / 4,
        "incremental stored {incr_stored} bytes, full {full_stored}: expected < 25%"
    );
    // 1.5 MiB of new noise cannot be stored in fewer bytes.
    assert!(
        incr_stored >= 1536 * 1024,
        "incremental stored only {incr_stored} bytes"
    );
    assert!(u(&disk0(&incr)["chunks_new"]) >= 6, "{incr:#}");

    // The incremental restores the modified filesystem.
    let r_incr = t.path().join("restored-incr.img");
    restore_to(&repo, &incr_id, &r_incr);
    assert_eq!(fs::metadata(&r_incr).unwrap().len(), 68 * MIB);
    assert_eq!(
        fs_listing(&r_incr),
        modified,
        "restored incremental differs"
    );
    // The full still restores the original.
    let r_full = t.path().join("restored-full.img");
    restore_to(&repo, &full_id, &r_full);
    assert_eq!(
        fs_listing(&r_full),
        original,
        "restored full differs from the original"
    );
    if all_raw(&repo, &full_id) && all_raw(&repo, &incr_id) {
        assert_eq!(
            sha256_file(&r_full),
            original_sha,
            "raw full restore not byte-identical"
        );
        assert_eq!(
            sha256_file(&r_incr),
            modified_sha,
            "raw incremental restore not byte-identical"
        );
    }

    // list shows the parent link.
    let list = list_json(&repo);
    assert_eq!(list.len(), 2, "{list:?}");
    let find = |id: &str| {
        list.iter()
            .find(|e| e["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed: {list:?}"))
    };
    assert!(find(&full_id)["parent"].is_null());
    assert_eq!(find(&incr_id)["parent"].as_str(), Some(full_id.as_str()));

    // Nothing changed: a second incremental stores nothing new.
    let again = capture(&["--repo", p(&repo), "--parent", "latest", p(&disk)]);
    assert_eq!(disk0(&again)["mode"], "hash-diff");
    assert_eq!(again["parent"].as_str(), Some(incr_id.as_str()));
    assert_eq!(u(&disk0(&again)["chunks_new"]), 0, "{again:#}");
    assert_eq!(u(&again["bytes_stored_new"]), 0, "{again:#}");
    assert_eq!(list_json(&repo).len(), 3);
    bkimg_ok(&["verify", "--repo", p(&repo)]);
}

fn changemap(out: &Path, size: u64, generation: &str, from: u64, to: u64, ranges: &[(u64, u64)]) {
    let mut args = vec![
        "changemap".to_string(),
        "-o".into(),
        p(out).into(),
        "--device-size".into(),
        size.to_string(),
        "--generation".into(),
        generation.into(),
        "--from-sequence".into(),
        from.to_string(),
        "--to-sequence".into(),
        to.to_string(),
    ];
    args.extend(ranges.iter().map(|(s, l)| format!("{s}+{l}")));
    bkimg_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// `capture --json --quiet --parent PARENT --changed-blocks MAP --raw IMG`, keeping stderr.
fn capture_with_map(repo: &Path, parent: &str, map: &Path, img: &Path) -> (Value, String) {
    let r = bkimg_ok(&[
        "capture",
        "--json",
        "--quiet",
        "--repo",
        p(repo),
        "--parent",
        parent,
        "--changed-blocks",
        p(map),
        "--raw",
        p(img),
    ]);
    (r.json(), r.stderr)
}

/// The tracking state (generation, sequence) restore point `id` recorded for disk0.
fn tracking(repo: &Path, id: &str) -> Option<(String, u64)> {
    let info = bkimg_ok(&["info", "--repo", p(repo), id, "--json"]).json();
    let t = &info["manifest"]["disks"][0]["tracking"];
    t["generation"]
        .as_str()
        .map(|g| (g.to_string(), t["sequence"].as_u64().expect("sequence")))
}

/// The first map of a tracker, given to an incremental whose parent recorded no tracking
/// state. bkimg may read only its ranges (older rule: a parent without tracking trusts the
/// map) or read everything (the parent was not taken at the map's start state); either way
/// the point must record the map's end state and be correct.
fn establish_tracking(repo: &Path, img: &Path, map: &Path, generation: &str, to: u64) -> Value {
    let (v, stderr) = capture_with_map(repo, "latest", map, img);
    match disk0(&v)["mode"].as_str() {
        Some("changed-blocks") => {}
        Some("hash-diff") => assert!(
            stderr.contains("falling back to hash-diff"),
            "read whole without saying why: {stderr}"
        ),
        other => panic!("first change map: mode {other:?}: {v:#}"),
    }
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        tracking(repo, id),
        Some((generation.to_string(), to)),
        "the tracking state of the map was not recorded"
    );
    v
}

#[test]
fn change_map_incremental_reads_only_changed() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("raw.img");
    let repo = t.path().join("repo");
    let size = 32 * MIB;
    let generation = "0123456789abcdef0123456789abcdef";
    noise_image(&img, size, 7);
    let original = sha256_file(&img);

    let full = capture(&["--repo", p(&repo), "--raw", p(&img)]);
    assert_eq!(disk0(&full)["mode"], "full");
    assert_eq!(u(&full["bytes_read"]), size);
    assert_eq!(u(&disk0(&full)["chunks_new"]), size / CHUNK);

    // The tracker starts: snapshot 0 -> 1, nothing changed.
    let map01 = t.path().join("01.map");
    changemap(&map01, size, generation, 0, 1, &[]);
    let base = establish_tracking(&repo, &img, &map01, generation, 1);
    let base_id = base["id"].as_str().unwrap().to_string();
    assert_eq!(u(&disk0(&base)["chunks_new"]), 0, "{base:#}");

    // Known ranges: inside chunk 0, straddling chunks 9/10, inside chunk 100, the last bytes.
    let ranges: Vec<(u64, u64)> = vec![
        (1000, 5000),
        (10 * CHUNK - 100, 300),
        (100 * CHUNK + 70_000, 4096),
        (size - 10, 10),
    ];
    for (i, &(s, l)) in ranges.iter().enumerate() {
        write_at(&img, s, &noise(l as usize, 1000 + i as u64));
    }
    let map12 = t.path().join("12.map");
    changemap(&map12, size, generation, 1, 2, &ranges);

    let touched = touched_chunks(&ranges, 65536, size);
    assert_eq!(touched, BTreeSet::from([0, 9, 10, 100, size / CHUNK - 1]));
    let (cb, stderr) = capture_with_map(&repo, "latest", &map12, &img);
    let cb_id = cb["id"].as_str().unwrap().to_string();
    assert_eq!(disk0(&cb)["mode"], "changed-blocks", "{cb:#}\n{stderr}");
    assert_eq!(u(&cb["bytes_read"]), touched.len() as u64 * CHUNK, "{cb:#}");
    assert_eq!(u(&disk0(&cb)["bytes_read"]), touched.len() as u64 * CHUNK);
    assert_eq!(u(&disk0(&cb)["chunks_new"]), touched.len() as u64, "{cb:#}");
    assert_eq!(cb["parent"].as_str(), Some(base_id.as_str()));
    assert_eq!(tracking(&repo, &cb_id), Some((generation.to_string(), 2)));

    let want = sha256_file(&img);
    let r_cb = t.path().join("restored-cb.img");
    restore_to(&repo, &cb_id, &r_cb);
    assert_eq!(
        sha256_file(&r_cb),
        want,
        "changed-blocks restore differs from the modified image"
    );

    // A hash-diff incremental of the same image from the same parent gives the same volume.
    let hd = capture(&["--repo", p(&repo), "--parent", &base_id, "--raw", p(&img)]);
    let hd_id = hd["id"].as_str().unwrap().to_string();
    assert_eq!(disk0(&hd)["mode"], "hash-diff");
    assert_eq!(u(&hd["bytes_read"]), size, "hash-diff reads everything");
    assert_eq!(
        u(&disk0(&hd)["chunks_new"]),
        0,
        "the changed chunks are already stored"
    );
    assert_eq!(
        index_of(&repo, &hd_id),
        index_of(&repo, &cb_id),
        "changed-blocks and hash-diff indexes differ"
    );
    let r_hd = t.path().join("restored-hd.img");
    restore_to(&repo, &hd_id, &r_hd);
    assert_eq!(sha256_file(&r_hd), want);
    // And the full still restores the original bytes.
    let r_full = t.path().join("restored-full.img");
    restore_to(&repo, full["id"].as_str().unwrap(), &r_full);
    assert_eq!(
        sha256_file(&r_full),
        original,
        "full restore is not the original image"
    );
}

#[test]
fn change_map_from_another_generation_falls_back() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("raw.img");
    let repo = t.path().join("repo");
    let size = 16 * MIB;
    noise_image(&img, size, 11);
    let gen_a = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let gen_b = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    capture(&["--repo", p(&repo), "--raw", p(&img)]);

    // Generation A, snapshot 0 -> 1.
    let r1 = (3 * CHUNK + 5, 1000);
    write_at(&img, r1.0, &noise(r1.1 as usize, 21));
    let map_a1 = t.path().join("a1.map");
    changemap(&map_a1, size, gen_a, 0, 1, &[r1]);
    let a1 = establish_tracking(&repo, &img, &map_a1, gen_a, 1);
    let a1_id = a1["id"].as_str().unwrap().to_string();

    // Generation A, snapshot 1 -> 2: continues exactly where the parent was taken.
    let r2 = (30 * CHUNK + 9, 2000);
    write_at(&img, r2.0, &noise(r2.1 as usize, 22));
    let map_a2 = t.path().join("a2.map");
    changemap(&map_a2, size, gen_a, 1, 2, &[r2]);
    let (a2, stderr) = capture_with_map(&repo, "latest", &map_a2, &img);
    assert!(!stderr.contains("falling back"), "{stderr}");
    assert_eq!(disk0(&a2)["mode"], "changed-blocks", "{a2:#}");
    assert_eq!(u(&a2["bytes_read"]), CHUNK);
    let a2_id = a2["id"].as_str().unwrap().to_string();
    assert_eq!(tracking(&repo, &a2_id), Some((gen_a.to_string(), 2)));

    // The next map is from generation B (the tracker lost its state): it cannot be
    // trusted, everything is read.
    let r3 = (40 * CHUNK + 77, 5000);
    write_at(&img, r3.0, &noise(r3.1 as usize, 23));
    // This change is NOT in map B: only a full read finds it.
    let hidden = (20 * CHUNK, 4096);
    write_at(&img, hidden.0, &noise(hidden.1 as usize, 24));
    let map_b = t.path().join("b.map");
    changemap(&map_b, size, gen_b, 2, 3, &[r3]);
    let (b, stderr) = capture_with_map(&repo, "latest", &map_b, &img);
    assert!(
        stderr.contains("falling back to hash-diff"),
        "stderr: {stderr}"
    );
    assert_eq!(disk0(&b)["mode"], "hash-diff", "{b:#}");
    assert_eq!(u(&b["bytes_read"]), size);
    assert_eq!(u(&disk0(&b)["chunks_new"]), 2, "{b:#}");
    let rb = t.path().join("restored-b.img");
    restore_to(&repo, b["id"].as_str().unwrap(), &rb);
    assert_eq!(
        sha256_file(&rb),
        sha256_file(&img),
        "restore after the fallback differs from the source"
    );
    // Every earlier point still restores what it captured (spot check: a2 lacks r3/hidden).
    let ra2 = t.path().join("restored-a2.img");
    restore_to(&repo, &a2_id, &ra2);
    assert_ne!(sha256_file(&ra2), sha256_file(&img));

    // Same generation but a gap: from the A/1 point, a map A 2->3 would miss snapshot 1->2.
    let map_gap = t.path().join("gap.map");
    changemap(&map_gap, size, gen_a, 2, 3, &[r3]);
    let (g, stderr) = capture_with_map(&repo, &a1_id, &map_gap, &img);
    assert!(
        stderr.contains("falling back to hash-diff"),
        "stderr: {stderr}"
    );
    assert_eq!(disk0(&g)["mode"], "hash-diff");
    assert_eq!(u(&g["bytes_read"]), size);

    let points_before = list_json(&repo).len();
    // A change map for a device of another size is refused.
    let map_wrong = t.path().join("wrong.map");
    changemap(&map_wrong, size + MIB, gen_a, 2, 3, &[r3]);
    let w = bkimg(&[
        "capture",
        "--quiet",
        "--repo",
        p(&repo),
        "--parent",
        &a2_id,
        "--changed-blocks",
        p(&map_wrong),
        "--raw",
        p(&img),
    ]);
    assert_ne!(
        w.code, 0,
        "a map of the wrong device size was accepted: {}",
        w.stdout
    );
    assert!(
        w.stderr.contains(&(size + MIB).to_string())
            && w.stderr.contains(&size.to_string())
            && w.stderr.contains("wrong map"),
        "unclear message: {}",
        w.stderr
    );
    // A file that is not a change map is refused.
    let junk = t.path().join("junk.map");
    fs::write(&junk, noise(4096, 5)).unwrap();
    let j = bkimg(&[
        "capture",
        "--quiet",
        "--repo",
        p(&repo),
        "--parent",
        "latest",
        "--changed-blocks",
        p(&junk),
        "--raw",
        p(&img),
    ]);
    assert_ne!(j.code, 0, "a junk change map was accepted");
    assert!(j.stderr.contains("change map"), "{}", j.stderr);
    assert_eq!(
        list_json(&repo).len(),
        points_before,
        "a refused capture left a restore point"
    );

    // --changed-blocks without --parent: either refused (a map is relative to an earlier
    // point), or a full capture that reads everything and records the map's end state.
    let np = bkimg(&[
        "capture",
        "--json",
        "--quiet",
        "--repo",
        p(&repo),
        "--changed-blocks",
        p(&map_a1),
        "--raw",
        p(&img),
    ]);
    if np.code == 0 {
        let v = np.json();
        assert_eq!(disk0(&v)["mode"], "full", "{v:#}");
        assert!(v["parent"].is_null());
        assert_eq!(u(&v["bytes_read"]), size, "a full must read everything");
        assert_eq!(
            tracking(&repo, v["id"].as_str().unwrap()),
            Some((gen_a.to_string(), 1))
        );
        let rn = t.path().join("restored-np.img");
        restore_to(&repo, v["id"].as_str().unwrap(), &rn);
        assert_eq!(sha256_file(&rn), sha256_file(&img));
    } else {
        assert!(np.stderr.contains("--parent"), "{}", np.stderr);
        assert_eq!(list_json(&repo).len(), points_before);
    }
}

#[test]
fn dedup_across_sources() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("a.img");
    let repo = t.path().join("repo");
    let size = 16 * MIB;
    noise_image(&img, size, 31);
    let n = size / CHUNK;

    let first = capture(&["--repo", p(&repo), "--raw", p(&img)]);
    assert_eq!(u(&disk0(&first)["chunks_new"]), n);
    assert!(u(&first["bytes_stored_new"]) >= size);
    let chunk_files = || count_files(&repo.join("chunks"));
    assert_eq!(chunk_files(), n as usize);

    // The same image again, as a new full: nothing new.
    let second = capture(&["--repo", p(&repo), "--raw", p(&img)]);
    assert_eq!(disk0(&second)["mode"], "full");
    assert_eq!(u(&second["bytes_stored_new"]), 0, "{second:#}");
    assert_eq!(u(&disk0(&second)["chunks_new"]), 0);

    // A copy under another name, and both together as a two-disk restore point: nothing new.
    let copy = t.path().join("copy.img");
    fs::copy(&img, &copy).unwrap();
    let both = capture(&["--repo", p(&repo), "--raw", p(&img), p(&copy)]);
    assert_eq!(both["disks"].as_array().unwrap().len(), 2);
    assert_eq!(u(&both["bytes_stored_new"]), 0, "{both:#}");
    assert_eq!(chunk_files(), n as usize);

    // Inside one source: an image whose second half repeats its first half stores half.
    let twice = t.path().join("twice.img");
    let mut half = noise((size / 2) as usize, 32);
    half[510] = 0;
    half[511] = 0;
    let mut data = half.clone();
    data.extend_from_slice(&half);
    fs::write(&twice, &data).unwrap();
    let tw = capture(&["--repo", p(&repo), "--raw", p(&twice)]);
    assert_eq!(u(&disk0(&tw)["chunks_new"]), n / 2, "{tw:#}");
    assert_eq!(chunk_files(), (n + n / 2) as usize);

    // Every one restores (two-disk point: one target per disk).
    let both_id = both["id"].as_str().unwrap();
    let (t0, t1) = (t.path().join("r0.img"), t.path().join("r1.img"));
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        both_id,
        "--quiet",
        "--target",
        &format!("disk0={}", p(&t0)),
        "--target",
        &format!("disk1={}", p(&t1)),
    ]);
    let want = sha256_file(&img);
    assert_eq!(sha256_file(&t0), want);
    assert_eq!(sha256_file(&t1), want);
    let rt = t.path().join("rt.img");
    restore_to(&repo, tw["id"].as_str().unwrap(), &rt);
    assert_eq!(sha256_file(&rt), sha256_file(&twice));
}

/// `--verify-cbt-every N` (the flag, else `verify-cbt-every` in the config file): the Nth
/// capture in a row that could use its change map reads the image whole instead, counts
/// the chunks the map did not list, and restores to the image's bytes.
#[test]
fn periodic_verification_of_change_maps() {
    if !bkimg_tests::require_root() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join("raw.img");
    let repo = t.path().join("repo");
    let size = 8 * MIB;
    let generation = "00112233445566778899aabbccddeeff";
    noise_image(&img, size, 11);
    let config = t.path().join("bkimg.toml");
    fs::write(&config, "verify-cbt-every = 2\n").unwrap();
    let map = |n: u64, ranges: &[(u64, u64)]| {
        let f = t.path().join(format!("{n}.map"));
        changemap(&f, size, generation, n - 1, n, ranges);
        f
    };
    let cap = |map: &Path, extra: &[&str]| {
        let mut args = vec![
            "capture",
            "--json",
            "--quiet",
            "--config",
            p(&config),
            "--repo",
            p(&repo),
            "--changed-blocks",
            p(map),
            "--raw",
        ];
        args.extend_from_slice(extra);
        args.push(p(&img));
        let r = bkimg_ok(&args);
        (r.json(), r.stderr)
    };
    let run = |v: &Value| {
        let id = v["id"].as_str().unwrap();
        let info = bkimg_ok(&["info", "--repo", p(&repo), id, "--json"]).json();
        info["manifest"]["disks"][0]["tracking"]["changed_blocks_run"]
            .as_u64()
            .unwrap_or(0)
    };

    let (full, _) = cap(&map(1, &[]), &[]);
    assert_eq!(disk0(&full)["mode"], "full");
    write_at(&img, 100, &noise(10, 1));
    let (a, _) = cap(&map(2, &[(100, 10)]), &["--parent", "latest"]);
    assert_eq!(disk0(&a)["mode"], "changed-blocks", "{a:#}");
    assert!(disk0(&a).get("missed_chunks").is_none(), "{a:#}");
    assert_eq!(run(&a), 1);

    // Chunk 20 written without the map saying so; the config file's 2 makes this capture
    // a verification.
    write_at(&img, 20 * CHUNK + 5, &noise(10, 2));
    write_at(&img, 200, &noise(10, 3));
    let (b, stderr) = cap(&map(3, &[(200, 10)]), &["--parent", "latest"]);
    assert_eq!(disk0(&b)["mode"], "hash-diff", "{b:#}");
    assert!(
        disk0(&b)["fallback"]
            .as_str()
            .unwrap()
            .contains("periodic verification (--verify-cbt-every 2)"),
        "{b:#}"
    );
    assert_eq!(u(&disk0(&b)["missed_chunks"]), 1, "{b:#}");
    assert!(
        stderr.contains("warning:") && stderr.contains("1 chunk(s) changed since the parent"),
        "{stderr}"
    );
    assert_eq!(run(&b), 0);
    let restored = t.path().join("restored.img");
    restore_to(&repo, b["id"].as_str().unwrap(), &restored);
    assert_eq!(sha256_file(&restored), sha256_file(&img));

    // The flag wins over the file: 0 never verifies.
    write_at(&img, 300, &noise(10, 4));
    let (c, _) = cap(
        &map(4, &[(300, 10)]),
        &["--parent", "latest", "--verify-cbt-every", "0"],
    );
    assert_eq!(disk0(&c)["mode"], "changed-blocks", "{c:#}");
    let (d, _) = cap(
        &map(5, &[]),
        &["--parent", "latest", "--verify-cbt-every", "0"],
    );
    assert_eq!(disk0(&d)["mode"], "changed-blocks", "{d:#}");
    assert_eq!(run(&d), 2);
    // Back to the file's 2: due, and nothing was missed this time.
    let (e, _) = cap(&map(6, &[]), &["--parent", "latest"]);
    assert_eq!(disk0(&e)["mode"], "hash-diff", "{e:#}");
    assert_eq!(u(&disk0(&e)["missed_chunks"]), 0, "{e:#}");
}
