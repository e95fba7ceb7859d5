//! Round trips through the real `bkimg` binary: build disks with the real tools (GPT and
//! msdos tables, FAT, swap, ext4, XFS, bare filesystem images), capture them, restore them
//! to image files and block devices, and check the result with the real tools again
//! (sgdisk/sfdisk, fsck, blkid, mounted trees, mtools, byte comparisons of the gaps).

use bkimg_tests::{restore_to as restore, write_at, MIB};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{chown, lchown, symlink, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bkimg_tests::{
    bkimg, bkimg_ok, noise, p, require_root, sh, sh_status, sha256_file, sparse_file, tree_listing,
    Loop, Mount, TempDir,
};
use serde_json::Value;

const SECTOR: u64 = 512;

/// Fixed swap identity: restore must recreate exactly this.
const SWAP_UUID: &str = "5a7e0c1d-2b3a-4c5d-8e9f-0a1b2c3d4e5f";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fs {
    Vfat,
    Swap,
    Ext4,
    Xfs,
}

impl Fs {
    fn name(self) -> &'static str {
        match self {
            Fs::Vfat => "vfat",
            Fs::Swap => "swap",
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }
}

/// A formatted partition (or a whole filesystem image) and what it held before capture.
#[derive(Clone, Debug)]
struct Vol {
    /// Partition number (0 for a whole-device filesystem).
    number: u32,
    offset: u64,
    size: u64,
    fs: Fs,
    /// blkid -p of the original (TYPE, UUID, LABEL, ...).
    ident: BTreeMap<String, String>,
    /// What the original held: tree listing (ext4/XFS), mdir + file hashes (FAT).
    content: Vec<String>,
}

/// A built disk image and its formatted volumes.
struct Disk {
    path: PathBuf,
    size: u64,
    vols: Vec<Vol>,
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn workdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("bkimg-roundtrip-")
        .tempdir()
        .expect("temp dir")
}

fn capture(repo: &Path, sources: &[&Path]) -> String {
    let mut args = vec!["capture", "--repo", p(repo), "--quiet"];
    args.extend(sources.iter().map(|s| p(s)));
    let r = bkimg_ok(&args);
    let id = r.stdout.trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "capture printed no single id on stdout: {:?}",
        r.stdout
    );
    id
}

fn verify_ok(repo: &Path) {
    let r = bkimg(&["verify", "--repo", p(repo), "--quiet"]);
    assert_eq!(
        r.code, 0,
        "bkimg verify found problems:\n{}{}",
        r.stdout, r.stderr
    );
}

/// Runs an mtools command on a FAT image (mtools' geometry checks do not fit partitions).
fn mtools(tool: &str, args: &[&str]) -> String {
    let mut a = vec!["MTOOLS_SKIP_CHECK=1", tool];
    a.extend_from_slice(args);
    sh("env", &a)
}

fn file_size(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").len()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(path).expect("open for reading");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("reading");
    buf
}

/// Asserts `len` bytes at `offset` are the same in both files.
fn assert_same_bytes(a: &Path, b: &Path, offset: u64, len: u64, what: &str) {
    let (fa, fb) = (
        fs::File::open(a).expect("open a"),
        fs::File::open(b).expect("open b"),
    );
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(4 * MIB) as usize;
        let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
        fa.read_exact_at(&mut x, offset + done).expect("reading a");
        fb.read_exact_at(&mut y, offset + done).expect("reading b");
        if x != y {
            let i = x.iter().zip(&y).position(|(u, v)| u != v).unwrap();
            panic!(
                "{what}: {} and {} differ at byte {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                offset + done + i as u64,
                x[i],
                y[i]
            );
        }
        done += n as u64;
    }
}

/// Equal line lists, with a readable message naming the first differences.
fn assert_lines_eq(what: &str, want: &[String], got: &[String]) {
    if want == got {
        return;
    }
    let missing: Vec<_> = want.iter().filter(|l| !got.contains(l)).take(8).collect();
    let extra: Vec<_> = got.iter().filter(|l| !want.contains(l)).take(8).collect();
    panic!(
        "{what}: contents differ ({} vs {} lines)\n  only in original: {missing:#?}\n  only in restored: {extra:#?}",
        want.len(),
        got.len()
    );
}

/// Partitions of an image as (number, byte offset, byte size), extended containers left out.
fn partitions(img: &Path) -> Vec<(u32, u64, u64)> {
    let t = table_json(img);
    let node_prefix = p(img).to_string();
    t["partitions"]
        .as_array()
        .expect("partitions array")
        .iter()
        .filter(|e| {
            let ty = e["type"].as_str().unwrap_or("");
            !matches!(ty, "5" | "f" | "85")
        })
        .map(|e| {
            let node = e["node"].as_str().expect("node");
            let number = node
                .strip_prefix(&node_prefix)
                .expect("node named after the image")
                .trim_start_matches('p')
                .parse()
                .expect("partition number");
            (
                number,
                e["start"].as_u64().unwrap() * SECTOR,
                e["size"].as_u64().unwrap() * SECTOR,
            )
        })
        .collect()
}

fn table_json(img: &Path) -> Value {
    let v: Value = serde_json::from_str(&sh("sfdisk", &["-J", p(img)])).expect("sfdisk -J JSON");
    v["partitiontable"].clone()
}

/// Byte ranges of a disk outside every (non-extended) partition.
fn gaps(img: &Path, disk_size: u64) -> Vec<(u64, u64)> {
    let mut parts: Vec<(u64, u64)> = partitions(img).iter().map(|&(_, o, s)| (o, s)).collect();
    parts.sort();
    let mut out = Vec::new();
    let mut pos = 0;
    for (o, s) in parts {
        if o > pos {
            out.push((pos, o - pos));
        }
        pos = pos.max(o + s);
    }
    if pos < disk_size {
        out.push((pos, disk_size - pos));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Filesystems: make, fill, describe, check

/// mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under xfstests.
fn mkfs_xfs(dev: &str, label: &str, uuid: Option<&str>) {
    let uuid_opt = uuid.map(|u| format!("uuid={u}"));
    let mut a = vec![
        "TEST_DIR=1",
        "TEST_DEV=1",
        "QA_CHECK_FS=1",
        "mkfs.xfs",
        "-f",
        "-q",
        "-L",
        label,
    ];
    if let Some(u) = &uuid_opt {
        a.extend(["-m", u.as_str()]);
    }
    a.push(dev);
    sh("env", &a);
}

fn mkfs_ext4(dev: &str, label: &str, uuid: Option<&str>) {
    let mut a = vec![
        "-q",
        "-F",
        "-L",
        label,
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
    ];
    if let Some(u) = uuid {
        a.extend(["-U", u]);
    }
    a.push(dev);
    sh("mkfs.ext4", &a);
}

fn mount_opts(fs: Fs, rw: bool) -> &'static str {
    match (fs, rw) {
        (Fs::Xfs, false) => "ro,nouuid",
        (Fs::Xfs, true) => "rw,nouuid",
        (_, false) => "ro",
        (_, true) => "rw",
    }
}

/// Formats `[offset, offset+size)` of `img` as `fs` and fills it; returns its description.
fn make_volume(
    img: &Path,
    number: u32,
    offset: u64,
    size: u64,
    fs: Fs,
    label: &str,
    seed: u64,
) -> Vol {
    {
        let lo = Loop::attach(img, offset, Some(size), false);
        match fs {
            Fs::Vfat => {
                sh("mkfs.vfat", &["-n", label, &lo.dev]);
            }
            Fs::Swap => {
                sh("mkswap", &["-U", SWAP_UUID, "-L", label, &lo.dev]);
            }
            Fs::Ext4 | Fs::Xfs => {
                if fs == Fs::Ext4 {
                    mkfs_ext4(&lo.dev, label, None);
                } else {
                    mkfs_xfs(&lo.dev, label, None);
                }
                let m = Mount::new(&lo.dev, mount_opts(fs, true));
                fill_tree(m.path(), seed);
            }
        }
    }
    if fs == Fs::Vfat {
        fill_fat(img, offset, seed);
    }
    describe(img, number, offset, size, fs)
}

/// Reads what a formatted volume holds now (the original, before capture).
fn describe(img: &Path, number: u32, offset: u64, size: u64, fs: Fs) -> Vol {
    fsck(img, offset, size, fs, "the original");
    Vol {
        number,
        offset,
        size,
        fs,
        ident: ident(img, offset, size),
        content: content(img, offset, size, fs),
    }
}

/// A varied tree: text, incompressible files of several sizes, a sparse file, symlinks,
/// a hard link, directories with modes and owners, and deleted files whose blocks are
/// free but not zero.
fn fill_tree(root: &Path, seed: u64) {
    let dir = |rel: &str, mode: u32, uid: u32, gid: u32| {
        let path = root.join(rel);
        fs::create_dir_all(&path).unwrap();
        chown(&path, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    };
    let file = |rel: &str, data: &[u8], mode: u32, uid: u32, gid: u32| {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, data).unwrap();
        chown(&path, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    };
    let touch = |rel: &str, when: &str| {
        sh("touch", &["-h", "-d", when, p(&root.join(rel))]);
    };

    dir("etc", 0o755, 0, 0);
    file(
        "etc/hostname",
        format!("host-{seed}\n").as_bytes(),
        0o644,
        0,
        0,
    );
    let text: String = (0..3000)
        .map(|i| format!("{i:05} the quick brown fox jumps over the lazy dog (seed {seed})\n"))
        .collect();
    file("etc/services.txt", text.as_bytes(), 0o644, 0, 0);
    file("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640, 0, 42);
    dir("home/alice", 0o700, 1000, 1000);
    file(
        "home/alice/notes.md",
        "# notes\n\nnon-ASCII: données, 日本語\n".as_bytes(),
        0o600,
        1000,
        1000,
    );
    file(
        "home/alice/ünïcödé name.txt",
        b"unicode file name\n",
        0o644,
        1000,
        1000,
    );
    dir("tmp", 0o1777, 0, 0);
    dir("srv/data", 0o2775, 33, 33);
    let sizes = [1usize, 4095, 4096, 65_537, 1 << 20, (3 << 20) + 123];
    for (i, size) in sizes.iter().enumerate() {
        file(
            &format!("srv/data/blob{i}"),
            &noise(*size, seed * 1000 + i as u64),
            0o640,
            33,
            33,
        );
    }
    file("usr/bin/tool", &noise(200_000, seed + 77), 0o4755, 0, 0);
    file("var/empty-file", b"", 0o644, 0, 0);

    // A sparse file: holes around two data extents.
    let sparse = root.join("srv/sparse.img");
    {
        let f = fs::File::create(&sparse).unwrap();
        f.set_len(24 * MIB).unwrap();
        f.write_all_at(&noise(300_000, seed + 5), 5 * MIB).unwrap();
        f.write_all_at(&noise(4096, seed + 6), 20 * MIB).unwrap();
    }

    symlink("hostname", root.join("etc/hostname.link")).unwrap();
    symlink("/nonexistent/dangling/target", root.join("etc/dangling")).unwrap();
    symlink("../../srv/data/blob4", root.join("home/alice/blob-link")).unwrap();
    lchown(root.join("home/alice/blob-link"), Some(1000), Some(1000)).unwrap();
    fs::hard_link(
        root.join("srv/data/blob4"),
        root.join("srv/data/blob4.hardlink"),
    )
    .unwrap();

    dir("a/b/c/d/e/f", 0o755, 0, 0);
    file("a/b/c/d/e/f/deep.txt", b"deep\n", 0o444, 0, 0);
    dir("many", 0o755, 0, 0);
    for i in 0..150 {
        file(
            &format!("many/f{i:03}"),
            format!("small file {i}\n").as_bytes(),
            0o644,
            0,
            0,
        );
    }

    // Free-but-dirty blocks: write incompressible data, then delete some of it.
    dir("junk", 0o755, 0, 0);
    for i in 0..4 {
        file(
            &format!("junk/big{i}"),
            &noise(2 << 20, seed * 7919 + i),
            0o644,
            0,
            0,
        );
    }
    sh("sync", &["-f", p(&root.join("junk"))]);
    fs::remove_file(root.join("junk/big1")).unwrap();
    fs::remove_file(root.join("junk/big3")).unwrap();
    for i in 10..30 {
        fs::remove_file(root.join(format!("many/f{i:03}"))).unwrap();
    }

    // Fixed times, directories last (creating entries changes their mtime).
    touch("etc/hostname", "@1234567890");
    touch("etc/hostname.link", "@1300000000");
    touch("srv/data/blob2", "2001-02-03 04:05:06.789");
    touch("a/b/c/d/e/f", "@1000000000");
    touch("home/alice", "@1600000000");
}

/// Fills a FAT filesystem at `offset` of `img` with mtools: directories, text, random
/// data, a long name, an empty directory, and a deleted file.
fn fill_fat(img: &Path, offset: u64, seed: u64) {
    let stage = workdir();
    let s = stage.path();
    fs::create_dir_all(s.join("EFI/BOOT")).unwrap();
    fs::create_dir_all(s.join("EFI/debian")).unwrap();
    fs::create_dir_all(s.join("loader/entries")).unwrap();
    fs::write(s.join("EFI/BOOT/BOOTX64.EFI"), noise(300_000, seed + 11)).unwrap();
    fs::write(
        s.join("EFI/debian/grubx64.efi"),
        noise(1_200_000, seed + 12),
    )
    .unwrap();
    fs::write(
        s.join("EFI/debian/grub.cfg"),
        format!("search --fs-uuid --set=root {seed}\nconfigfile $prefix/grub.cfg\n"),
    )
    .unwrap();
    fs::write(
        s.join("loader/entries/linux.conf"),
        "title Linux\nlinux /vmlinuz\ninitrd /initrd.img\n",
    )
    .unwrap();
    fs::write(s.join("Long Name With Spaces.txt"), b"long file name\n").unwrap();
    fs::write(s.join("junk.bin"), noise(2_000_000, seed + 13)).unwrap();
    let i = format!("{}@@{offset}", p(img));
    mtools(
        "mcopy",
        &[
            "-s",
            "-m",
            "-i",
            &i,
            p(&s.join("EFI")),
            p(&s.join("loader")),
            p(&s.join("Long Name With Spaces.txt")),
            p(&s.join("junk.bin")),
            "::/",
        ],
    );
    mtools("mmd", &["-i", &i, "::/empty-dir"]);
    mtools("mdel", &["-i", &i, "::/junk.bin"]);
}

/// A FAT filesystem's listing (mdir: names, sizes, dates, label, serial, free space)
/// and the path, size and SHA-256 of every file, read with mtools.
fn fat_content(img: &Path, offset: u64) -> Vec<String> {
    let i = format!("{}@@{offset}", p(img));
    let mut lines: Vec<String> = mtools("mdir", &["-/", "-a", "-i", &i, "::"])
        .lines()
        .map(|l| format!("mdir: {l}"))
        .collect();
    let out = workdir();
    mtools("mcopy", &["-s", "-n", "-i", &i, "::/*", p(out.path())]);
    let mut files = Vec::new();
    hash_files(out.path(), out.path(), &mut files);
    files.sort();
    lines.extend(files);
    lines
}

fn hash_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        if path.is_dir() {
            out.push(format!("file: {rel}/"));
            hash_files(root, &path, out);
        } else {
            out.push(format!(
                "file: {rel} size={} sha256={}",
                file_size(&path),
                sha256_file(&path)
            ));
        }
    }
}

/// What a volume holds, for comparing original and restored.
fn content(img: &Path, offset: u64, size: u64, fs: Fs) -> Vec<String> {
    match fs {
        Fs::Ext4 | Fs::Xfs => {
            let lo = Loop::attach(img, offset, Some(size), true);
            let m = Mount::new(&lo.dev, mount_opts(fs, false));
            let listing = tree_listing(m.path());
            assert!(!listing.is_empty(), "tree of {} is empty", fs.name());
            listing
        }
        Fs::Vfat => fat_content(img, offset),
        Fs::Swap => Vec::new(),
    }
}

/// blkid's low-level probe of a byte range: TYPE, UUID, LABEL, VERSION, ...
fn ident(img: &Path, offset: u64, size: u64) -> BTreeMap<String, String> {
    let out = sh(
        "blkid",
        &[
            "-p",
            "-o",
            "export",
            "-O",
            &offset.to_string(),
            "--size",
            &size.to_string(),
            p(img),
        ],
    );
    out.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| *k != "DEVNAME")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Read-only filesystem check of a byte range; panics with the checker's output.
fn fsck(img: &Path, offset: u64, size: u64, fs: Fs, what: &str) {
    if fs == Fs::Swap {
        return;
    }
    let lo = Loop::attach(img, offset, Some(size), true);
    let (code, out) = match fs {
        Fs::Ext4 => sh_status("e2fsck", &["-fn", &lo.dev]),
        Fs::Xfs => sh_status("xfs_repair", &["-n", &lo.dev]),
        Fs::Vfat => sh_status("fsck.vfat", &["-n", &lo.dev]),
        Fs::Swap => unreachable!(),
    };
    assert_eq!(
        code,
        0,
        "{} check of {what} ({} at byte {offset}) is not clean:\n{out}",
        fs.name(),
        img.display()
    );
}

/// Every volume of `vols` is found in `restored` at its offset unchanged: fsck clean,
/// same blkid identity, same files.
fn check_volumes(vols: &[Vol], restored: &Path, what: &str) {
    for v in vols {
        check_volume_at(v, restored, v.offset, &format!("{what} p{}", v.number));
    }
}

fn check_volume_at(v: &Vol, restored: &Path, offset: u64, what: &str) {
    fsck(restored, offset, v.size, v.fs, what);
    let got = ident(restored, offset, v.size);
    assert_eq!(
        got,
        v.ident,
        "{what}: blkid identity of the {} volume",
        v.fs.name()
    );
    if v.fs == Fs::Swap {
        assert_eq!(
            got.get("UUID").map(String::as_str),
            Some(SWAP_UUID),
            "{what}: swap UUID"
        );
    }
    let c = content(restored, offset, v.size, v.fs);
    assert_lines_eq(&format!("{what} ({})", v.fs.name()), &v.content, &c);
}

// ---------------------------------------------------------------------------------------
// Disks

/// A GPT disk: `sgdisk -o` plus `layout` (sgdisk arguments), then `fs` formatted per
/// partition number.
fn build_gpt(
    dir: &Path,
    name: &str,
    size: u64,
    layout: &[&str],
    fs: &[(u32, Fs, &str)],
    seed: u64,
) -> Disk {
    let path = dir.join(name);
    sparse_file(&path, size);
    let mut a = vec!["-o"];
    a.extend_from_slice(layout);
    a.push(p(&path));
    sh("sgdisk", &a);
    let parts = partitions(&path);
    let vols = fs
        .iter()
        .map(|&(n, kind, label)| {
            let &(_, off, sz) = parts
                .iter()
                .find(|(num, _, _)| *num == n)
                .unwrap_or_else(|| panic!("partition {n} in {parts:?}"));
            make_volume(&path, n, off, sz, kind, label, seed + u64::from(n))
        })
        .collect();
    Disk { path, size, vols }
}

/// A small GPT disk: FAT partition 1 (40 MiB) and ext4 partition 2 (the rest).
fn small_gpt(dir: &Path, name: &str, size: u64, seed: u64) -> Disk {
    build_gpt(
        dir,
        name,
        size,
        &[
            "-n",
            "1:2048:+40M",
            "-t",
            "1:ef00",
            "-c",
            "1:ESP",
            "-n",
            "2:0:0",
            "-t",
            "2:8300",
            "-c",
            "2:root",
        ],
        &[(1, Fs::Vfat, "SMALLESP"), (2, Fs::Ext4, "smallroot")],
        seed,
    )
}

/// A bare filesystem image (no partition table).
fn bare_fs(dir: &Path, name: &str, size: u64, fs: Fs, label: &str, uuid: &str, seed: u64) -> Disk {
    let path = dir.join(name);
    sparse_file(&path, size);
    {
        let lo = Loop::attach(&path, 0, None, false);
        match fs {
            Fs::Ext4 => mkfs_ext4(&lo.dev, label, Some(uuid)),
            Fs::Xfs => mkfs_xfs(&lo.dev, label, Some(uuid)),
            _ => unreachable!("bare images are ext4 or XFS here"),
        }
        let m = Mount::new(&lo.dev, mount_opts(fs, true));
        fill_tree(m.path(), seed);
    }
    let v = describe(&path, 0, 0, size, fs);
    Disk {
        path,
        size,
        vols: vec![v],
    }
}

fn sgdisk_info(img: &Path, n: u32) -> String {
    sh("sgdisk", &["-i", &n.to_string(), p(img)])
}

/// `sgdisk -p` with the image's path taken out.
fn sgdisk_print(img: &Path) -> String {
    sh("sgdisk", &["-p", p(img)]).replace(p(img), "IMG")
}

fn disk_guid(img: &Path) -> String {
    sgdisk_print(img)
        .lines()
        .find_map(|l| l.strip_prefix("Disk identifier (GUID): "))
        .expect("disk GUID line")
        .trim()
        .to_string()
}

/// The GPT partition table of `restored` is the original's: same disk GUID, and
/// `sgdisk -i` identical for every partition.
fn check_gpt_entries(orig: &Disk, restored: &Path) {
    assert_eq!(disk_guid(restored), disk_guid(&orig.path), "disk GUID");
    for (n, _, _) in partitions(&orig.path) {
        assert_eq!(
            sgdisk_info(restored, n),
            sgdisk_info(&orig.path, n),
            "sgdisk -i {n} of {}",
            restored.display()
        );
    }
    assert_eq!(
        partitions(restored),
        partitions(&orig.path),
        "partition numbers and extents"
    );
}

/// Every byte outside the partitions is the same.
fn check_gaps_equal(orig: &Disk, restored: &Path) {
    for (o, l) in gaps(&orig.path, orig.size) {
        assert_same_bytes(
            &orig.path,
            restored,
            o,
            l,
            &format!("gap at byte {o} (+{l})"),
        );
    }
}

fn info_json(repo: &Path, id: &str) -> Value {
    bkimg_ok(&["info", "--repo", p(repo), id, "--json"]).json()
}

fn manifest_volume<'a>(info: &'a Value, disk: usize, name: &str) -> &'a Value {
    info["manifest"]["disks"][disk]["volumes"]
        .as_array()
        .expect("volumes array")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name} in {:#}", info["manifest"]["disks"][disk]))
}

/// The manifest describes `v` with its filesystem type, UUID and label, and stores it the
/// right way: used blocks for ext4/XFS, identity only for swap.
fn check_manifest_volume(info: &Value, disk: usize, name: &str, v: &Vol) {
    let mv = manifest_volume(info, disk, name);
    let f = &mv["filesystem"];
    assert_eq!(f["type"], v.fs.name(), "{name}: filesystem type in {mv:#}");
    let uuid = v.ident.get("UUID").expect("blkid UUID");
    assert_eq!(
        f["uuid"].as_str().map(str::to_lowercase),
        Some(uuid.to_lowercase()),
        "{name}: filesystem UUID in {mv:#}"
    );
    if let Some(label) = v.ident.get("LABEL") {
        assert_eq!(
            f["label"].as_str(),
            Some(label.as_str()),
            "{name}: label in {mv:#}"
        );
    }
    match v.fs {
        Fs::Swap => {
            assert_eq!(
                mv["content"]["kind"], "swap",
                "{name}: swap content in {mv:#}"
            );
            assert_eq!(
                mv["content"]["uuid"], SWAP_UUID,
                "{name}: swap UUID in {mv:#}"
            );
        }
        Fs::Ext4 | Fs::Xfs => {
            assert_eq!(mv["content"]["kind"], "data", "{name}: content in {mv:#}");
            assert_eq!(
                mv["content"]["mode"],
                "used-blocks",
                "{name}: an {} volume is stored by its used blocks: {mv:#}",
                v.fs.name()
            );
        }
        Fs::Vfat => assert_eq!(mv["content"]["kind"], "data", "{name}: content in {mv:#}"),
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn gpt_disk_round_trip_same_and_larger() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let size = 256 * MIB;
    let disk = build_gpt(
        w.path(),
        "gpt.img",
        size,
        &[
            "-n",
            "1:2048:+34M",
            "-t",
            "1:ef00",
            "-c",
            "1:EFI system partition",
            "-A",
            "1:set:0",
            "-n",
            "2:0:+16M",
            "-t",
            "2:8200",
            "-c",
            "2:swap",
            // 1 MiB of free space before partition 3, filled with noise below.
            "-n",
            "3:106496:+96M",
            "-t",
            "3:8304",
            "-c",
            "3:root données ü",
            "-A",
            "3:set:2",
            "-A",
            "3:set:60",
            "-A",
            "3:set:63",
            // Slot 4 stays empty; partition 5 takes the rest with a 36-character name.
            "-n",
            "5:0:0",
            "-t",
            "5:8300",
            "-c",
            "5:data-partition-with-a-36-char-name!!",
            "-A",
            "5:set:1",
        ],
        &[
            (1, Fs::Vfat, "ESP"),
            (2, Fs::Swap, "swaplabel"),
            (3, Fs::Ext4, "rootfs"),
            (5, Fs::Xfs, "datafs"),
        ],
        1,
    );
    // Boot code: the protective MBR's code area, the sectors between the GPT entries and
    // the first partition, and the free space between partitions 2 and 3.
    write_at(&disk.path, 0, &noise(440, 901));
    write_at(
        &disk.path,
        34 * SECTOR,
        &noise(((2048 - 34) * SECTOR) as usize, 902),
    );
    write_at(&disk.path, 104_448 * SECTOR, &noise(MIB as usize, 903));
    let (code, out) = sh_status("sgdisk", &["-v", p(&disk.path)]);
    assert!(
        code == 0 && out.contains("No problems found"),
        "original: {out}"
    );

    let repo = w.path().join("repo");
    let id = capture(&repo, &[&disk.path]);

    // Same size.
    let same = w.path().join("same.img");
    restore(&repo, &id, &same);
    assert_eq!(
        file_size(&same),
        size,
        "a new target is the source disk's size"
    );
    assert_eq!(sgdisk_print(&same), sgdisk_print(&disk.path), "sgdisk -p");
    check_gpt_entries(&disk, &same);
    check_gaps_equal(&disk, &same);
    let (code, out) = sh_status("sgdisk", &["-v", p(&same)]);
    assert!(
        code == 0 && out.contains("No problems found"),
        "same-size restore: {out}"
    );
    check_volumes(&disk.vols, &same, "same-size restore");

    // 64 MiB larger.
    let big = w.path().join("big.img");
    let big_size = size + 64 * MIB;
    sparse_file(&big, big_size);
    restore(&repo, &id, &big);
    assert_eq!(
        file_size(&big),
        big_size,
        "an existing target keeps its size"
    );
    check_gpt_entries(&disk, &big);
    let (code, out) = sh_status("sgdisk", &["-v", p(&big)]);
    assert!(
        code == 0 && out.contains("No problems found") && !out.to_lowercase().contains("problem:"),
        "larger restore: sgdisk -v:\n{out}"
    );
    let big_sectors = big_size / SECTOR;
    let t = table_json(&big);
    assert_eq!(
        t["lastlba"].as_u64(),
        Some(big_sectors - 34),
        "last usable LBA follows the new end"
    );
    assert_eq!(t["firstlba"].as_u64(), Some(34));
    // The backup header is at the new last sector, and points back to LBA 1.
    let backup = read_at(&big, big_size - SECTOR, 92);
    assert_eq!(
        &backup[0..8],
        b"EFI PART",
        "backup GPT header at the new end"
    );
    assert_eq!(
        u64::from_le_bytes(backup[24..32].try_into().unwrap()),
        big_sectors - 1
    );
    assert_eq!(u64::from_le_bytes(backup[32..40].try_into().unwrap()), 1);
    // No stale backup header is left at the old end.
    assert_ne!(
        &read_at(&big, size - SECTOR, 8)[..],
        b"EFI PART",
        "stale backup header at the old end"
    );
    // The protective MBR covers the new disk.
    let mbr = read_at(&big, 0, 512);
    assert_eq!(mbr[446 + 4], 0xee, "protective MBR entry");
    assert_eq!(
        u32::from_le_bytes(mbr[446 + 12..446 + 16].try_into().unwrap()) as u64,
        big_sectors - 1,
        "protective MBR size"
    );
    assert_eq!(&mbr[510..512], &[0x55, 0xaa]);
    // Boot code and the free-space noise are back.
    assert_same_bytes(&disk.path, &big, 0, 440, "MBR boot code");
    assert_same_bytes(
        &disk.path,
        &big,
        34 * SECTOR,
        (2048 - 34) * SECTOR,
        "boot code gap",
    );
    assert_same_bytes(
        &disk.path,
        &big,
        104_448 * SECTOR,
        MIB,
        "gap between partitions 2 and 3",
    );
    check_volumes(&disk.vols, &big, "larger restore");

    verify_ok(&repo);

    // What the manifest says about the volumes.
    let info = info_json(&repo, &id);
    assert_eq!(info["id"], id.as_str());
    let d = &info["manifest"]["disks"][0];
    assert_eq!(d["table"]["kind"], "gpt", "{d:#}");
    assert_eq!(
        d["table"]["disk_guid"].as_str().map(str::to_uppercase),
        Some(disk_guid(&disk.path)),
        "disk GUID in the manifest"
    );
    assert_eq!(d["size"].as_u64(), Some(size));
    for v in &disk.vols {
        check_manifest_volume(&info, 0, &format!("p{}", v.number), v);
    }
    let gap0 = manifest_volume(&info, 0, "gap0");
    assert_eq!(gap0["role"], "gap");
    assert_eq!(
        gap0["content"]["mode"], "raw",
        "gaps are captured raw: {gap0:#}"
    );
}

#[test]
fn msdos_disk_with_logical_partitions() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let size = 256 * MIB;
    let path = w.path().join("msdos.img");
    sparse_file(&path, size);
    let script = "label: dos\nlabel-id: 0x5eedbeef\nunit: sectors\n\n\
        start=2048, size=131072, type=83, bootable\n\
        start=133120, size=81920, type=c\n\
        start=215040, type=5\n\
        start=217088, size=163840, type=83\n\
        start=382976, type=82\n";
    let script_file = w.path().join("layout.sfdisk");
    fs::write(&script_file, script).unwrap();
    sh(
        "sh",
        &[
            "-c",
            &format!("sfdisk -q '{}' < '{}'", p(&path), p(&script_file)),
        ],
    );
    let parts = partitions(&path);
    assert_eq!(
        parts.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 2, 5, 6],
        "sfdisk made 2 primaries and 2 logicals"
    );
    let plan = [
        (1, Fs::Ext4, "first"),
        (2, Fs::Vfat, "FATPART"),
        (5, Fs::Ext4, "logical5"),
        (6, Fs::Swap, "logswap"),
    ];
    let vols: Vec<Vol> = plan
        .iter()
        .map(|&(n, fs, label)| {
            let &(_, o, s) = parts.iter().find(|x| x.0 == n).unwrap();
            make_volume(&path, n, o, s, fs, label, 100 + u64::from(n))
        })
        .collect();
    let disk = Disk {
        path: path.clone(),
        size,
        vols,
    };

    // Noise in every byte outside the partitions except the tables themselves: the MBR's
    // boot code, sectors 1..2047, and each extended boot record's code area and slack.
    let mut keep: Vec<(u64, Vec<u8>)> = vec![(440, read_at(&path, 440, 72))];
    let ext_start = 215_040u64;
    let mut ebr = ext_start;
    loop {
        keep.push((ebr * SECTOR + 446, read_at(&path, ebr * SECTOR + 446, 66)));
        let next = read_at(&path, ebr * SECTOR + 446 + 16, 16);
        let rel = u32::from_le_bytes(next[8..12].try_into().unwrap()) as u64;
        if next[4] == 0 || rel == 0 {
            break;
        }
        ebr = ext_start + rel;
    }
    assert_eq!(keep.len(), 3, "two extended boot records");
    let before = sh("sfdisk", &["-d", p(&path)]);
    for (i, (o, l)) in gaps(&path, size).into_iter().enumerate() {
        write_at(&path, o, &noise(l as usize, 500 + i as u64));
    }
    for (o, bytes) in &keep {
        write_at(&path, *o, bytes);
    }
    assert_eq!(
        sh("sfdisk", &["-d", p(&path)]),
        before,
        "the noise left the table alone"
    );

    let repo = w.path().join("repo");
    let id = capture(&repo, &[&path]);
    let restored = w.path().join("restored.img");
    restore(&repo, &id, &restored);
    assert_eq!(file_size(&restored), size);

    assert_eq!(
        sh("sfdisk", &["-d", p(&restored)]).replace(p(&restored), "IMG"),
        before.replace(p(&path), "IMG"),
        "sfdisk -d"
    );
    assert_eq!(
        sh("sfdisk", &["--disk-id", p(&restored)]).trim(),
        "0x5eedbeef",
        "disk signature"
    );
    check_gaps_equal(&disk, &restored);
    check_volumes(&disk.vols, &restored, "msdos restore");
    verify_ok(&repo);

    let info = info_json(&repo, &id);
    let d = &info["manifest"]["disks"][0];
    assert_eq!(d["table"]["kind"], "msdos", "{d:#}");
    assert_eq!(d["table"]["disk_signature"].as_u64(), Some(0x5eed_beef));
    for v in &disk.vols {
        check_manifest_volume(&info, 0, &format!("p{}", v.number), v);
    }
}

#[test]
fn single_filesystem_without_table() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let repo = w.path().join("repo");
    let cases = [
        (
            Fs::Ext4,
            96 * MIB,
            "bare-ext4",
            "0c8d7f6e-5a4b-4c3d-9e2f-1a0b9c8d7e6f",
        ),
        (
            Fs::Xfs,
            160 * MIB,
            "bare-xfs",
            "7b6a5948-3726-4150-8f9e-8d7c6b5a4938",
        ),
    ];
    // Round trips first, then what the manifest says (a wrong description must not hide
    // a wrong restore).
    let mut captured = Vec::new();
    for (i, &(fs, size, label, uuid)) in cases.iter().enumerate() {
        let disk = bare_fs(
            w.path(),
            &format!("{}.img", fs.name()),
            size,
            fs,
            label,
            uuid,
            300 + i as u64,
        );
        assert_eq!(
            disk.vols[0].ident.get("UUID").map(String::as_str),
            Some(uuid)
        );
        let id = capture(&repo, &[&disk.path]);
        let restored = w.path().join(format!("{}-restored.img", fs.name()));
        restore(&repo, &id, &restored);
        assert_eq!(file_size(&restored), size);
        check_volumes(&disk.vols, &restored, &format!("bare {}", fs.name()));
        captured.push((id, disk));
    }
    verify_ok(&repo);

    for ((id, disk), &(_, size, label, uuid)) in captured.iter().zip(&cases) {
        let info = info_json(&repo, id);
        assert_eq!(info["disks"][0]["table"], "none", "summary: {info:#}");
        let d = &info["manifest"]["disks"][0];
        assert_eq!(d["table"]["kind"], "none", "{d:#}");
        let vols = d["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 1, "one volume: {d:#}");
        assert_eq!(vols[0]["name"], "whole");
        assert_eq!(vols[0]["role"], "whole");
        assert_eq!(vols[0]["offset"].as_u64(), Some(0));
        assert_eq!(vols[0]["size"].as_u64(), Some(size));
        check_manifest_volume(&info, 0, "whole", &disk.vols[0]);
        assert_eq!(vols[0]["filesystem"]["uuid"], uuid);
        assert_eq!(vols[0]["filesystem"]["label"], label);
    }
}

#[test]
fn multi_disk_restore_point() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let gpt = small_gpt(w.path(), "gpt.img", 128 * MIB, 400);
    let bare = bare_fs(
        w.path(),
        "bare.img",
        64 * MIB,
        Fs::Ext4,
        "second",
        "3f2e1d0c-b9a8-4776-a5b4-c3d2e1f00112",
        410,
    );
    let repo = w.path().join("repo");
    let id = capture(&repo, &[&gpt.path, &bare.path]);

    let list = bkimg_ok(&["list", "--repo", p(&repo), "--json"]).json();
    let arr = list.as_array().expect("list --json is an array");
    assert_eq!(arr.len(), 1, "one restore point for both disks: {list:#}");
    assert_eq!(arr[0]["id"], id.as_str());
    let disks = arr[0]["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2, "{list:#}");
    assert_eq!(disks[0]["name"], "disk0");
    assert_eq!(disks[0]["table"], "gpt");
    assert_eq!(disks[0]["size"].as_u64(), Some(128 * MIB));
    assert_eq!(disks[1]["name"], "disk1");
    assert_eq!(disks[1]["table"], "none");
    assert_eq!(disks[1]["size"].as_u64(), Some(64 * MIB));

    let a = w.path().join("a.img");
    let b = w.path().join("b.img");
    let ta = format!("disk0={}", p(&a));
    let tb = format!("disk1={}", p(&b));
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        &ta,
        "--target",
        &tb,
        "--quiet",
    ]);
    assert_eq!(file_size(&a), 128 * MIB);
    assert_eq!(file_size(&b), 64 * MIB);
    assert_eq!(sgdisk_print(&a), sgdisk_print(&gpt.path));
    check_gpt_entries(&gpt, &a);
    check_gaps_equal(&gpt, &a);
    check_volumes(&gpt.vols, &a, "disk0");
    check_volumes(&bare.vols, &b, "disk1");

    // One plain target for a two-disk restore point: refused, naming the disks.
    let x = w.path().join("x.img");
    let r = bkimg(&["restore", "--repo", p(&repo), &id, "--target", p(&x)]);
    assert_ne!(
        r.code, 0,
        "a plain --target on a 2-disk restore point must fail"
    );
    assert!(
        r.stderr.contains("disk0") && r.stderr.contains("disk1"),
        "the message names the disks: {}",
        r.stderr
    );
    assert!(
        !x.exists(),
        "nothing is created when the targets do not match"
    );

    // Restoring only one disk of the point.
    let c = w.path().join("c.img");
    let tc = format!("disk1={}", p(&c));
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        &tc,
        "--quiet",
    ]);
    assert_eq!(
        sha256_file(&c),
        sha256_file(&b),
        "disk1 alone equals disk1 restored with disk0"
    );

    // An unknown disk name.
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        &format!("disk7={}", p(&x)),
    ]);
    assert_ne!(r.code, 0, "disk7 does not exist");
    assert!(!x.exists());
    verify_ok(&repo);
}

#[test]
fn volume_restore_and_dry_run() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let disk = build_gpt(
        w.path(),
        "disk.img",
        160 * MIB,
        &[
            "-n",
            "1:2048:+40M",
            "-t",
            "1:ef00",
            "-n",
            "2:0:+8M",
            "-t",
            "2:8200",
            "-n",
            "3:0:0",
            "-t",
            "3:8300",
        ],
        &[
            (1, Fs::Vfat, "VOLESP"),
            (2, Fs::Swap, "volswap"),
            (3, Fs::Ext4, "volroot"),
        ],
        600,
    );
    write_at(
        &disk.path,
        34 * SECTOR,
        &noise(((2048 - 34) * SECTOR) as usize, 601),
    );
    let repo = w.path().join("repo");
    let id = capture(&repo, &[&disk.path]);
    let vol = |n: u32| disk.vols.iter().find(|v| v.number == n).unwrap();

    // --volume 3: the partition alone, as an image of its own.
    let v3 = w.path().join("p3.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--volume",
        "3",
        "--target",
        p(&v3),
        "--quiet",
    ]);
    assert_eq!(
        file_size(&v3),
        vol(3).size,
        "a volume restore is the volume's size"
    );
    check_volume_at(vol(3), &v3, 0, "--volume 3");
    let v3b = w.path().join("p3b.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--volume",
        "p3",
        "--target",
        p(&v3b),
        "--quiet",
    ]);
    assert_eq!(
        sha256_file(&v3b),
        sha256_file(&v3),
        "--volume p3 and --volume 3 are the same"
    );

    // The FAT and swap partitions, and the boot code gap.
    let v1 = w.path().join("p1.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--volume",
        "p1",
        "--target",
        p(&v1),
        "--quiet",
    ]);
    assert_eq!(file_size(&v1), vol(1).size);
    check_volume_at(vol(1), &v1, 0, "--volume p1");
    let v2 = w.path().join("p2.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--volume",
        "p2",
        "--target",
        p(&v2),
        "--quiet",
    ]);
    assert_eq!(file_size(&v2), vol(2).size);
    check_volume_at(vol(2), &v2, 0, "--volume p2");
    let g0 = w.path().join("gap0.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--volume",
        "gap0",
        "--target",
        p(&g0),
        "--quiet",
    ]);
    assert_eq!(
        file_size(&g0),
        2048 * SECTOR,
        "gap0 is everything before partition 1"
    );
    assert_same_bytes(&disk.path, &g0, 0, 2048 * SECTOR, "gap0");

    // An existing target smaller than the volume is refused and left alone.
    let small = w.path().join("small.img");
    fs::write(&small, noise(MIB as usize, 602)).unwrap();
    let before = sha256_file(&small);
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--volume",
        "3",
        "--target",
        p(&small),
    ]);
    assert_eq!(r.code, 5, "too small a target: exit 5\n{}", r.stderr);
    assert_eq!(
        sha256_file(&small),
        before,
        "the refused target is unchanged"
    );

    // No such volume: refused, naming the ones there are.
    let none = w.path().join("none.img");
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--volume",
        "p9",
        "--target",
        p(&none),
    ]);
    assert_ne!(r.code, 0, "--volume p9 does not exist");
    assert!(
        r.stderr.contains("p3") && r.stderr.contains("gap0"),
        "names the volumes: {}",
        r.stderr
    );
    assert!(!none.exists());

    // Dry runs: a plan on stdout, nothing written or created.
    let plan_target = w.path().join("plan.img");
    let r = bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        p(&plan_target),
        "--dry-run",
    ]);
    for word in ["p1", "p2", "p3", "gap0", p(&plan_target)] {
        assert!(
            r.stdout.contains(word),
            "the plan mentions {word}:\n{}",
            r.stdout
        );
    }
    assert!(
        !plan_target.exists(),
        "--dry-run created {}",
        plan_target.display()
    );
    let r = bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--volume",
        "3",
        "--target",
        p(&plan_target),
        "--dry-run",
    ]);
    assert!(r.stdout.contains("p3"), "the plan names p3:\n{}", r.stdout);
    assert!(
        !r.stdout.contains("p1"),
        "a volume plan is about that volume only:\n{}",
        r.stdout
    );
    assert!(
        !plan_target.exists(),
        "--dry-run --volume created the target"
    );
    let r = bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        p(&plan_target),
        "--dry-run",
        "--json",
    ]);
    let j = r.json();
    assert_eq!(j["dry_run"], true, "{j:#}");
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["disks"][0]["disk"], "disk0");
    assert!(!plan_target.exists());
    // A dry run onto an existing file leaves it byte for byte alone.
    let existing = w.path().join("existing.img");
    fs::write(&existing, noise(MIB as usize, 603)).unwrap();
    let before = sha256_file(&existing);
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        p(&existing),
        "--dry-run",
    ]);
    assert!(
        r.code == 0 || r.code == 5,
        "dry run onto a small file: {} {}",
        r.code,
        r.stderr
    );
    assert_eq!(
        sha256_file(&existing),
        before,
        "--dry-run wrote to an existing target"
    );
    assert_eq!(file_size(&existing), MIB);
}

#[test]
fn export_file_is_a_repository() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let disk = small_gpt(w.path(), "disk.img", 96 * MIB, 700);
    let repo = w.path().join("repo");
    let id = capture(&repo, &[&disk.path]);
    let from_repo = w.path().join("from-repo.img");
    restore(&repo, &id, &from_repo);
    check_gpt_entries(&disk, &from_repo);
    check_volumes(&disk.vols, &from_repo, "restore from the repository");

    let export = w.path().join("point.bkimg");
    bkimg_ok(&[
        "export",
        "--repo",
        p(&repo),
        &id,
        "-o",
        p(&export),
        "--quiet",
    ]);
    assert!(export.is_file());

    let list = bkimg_ok(&["list", "--repo", p(&export), "--json"]).json();
    let arr = list.as_array().expect("array");
    assert_eq!(arr.len(), 1, "{list:#}");
    assert_eq!(arr[0]["id"], id.as_str());
    let info = info_json(&export, &id);
    assert_eq!(info["id"], id.as_str());
    assert_eq!(
        info["manifest"],
        info_json(&repo, &id)["manifest"],
        "same manifest"
    );
    let latest = info_json(&export, "latest");
    assert_eq!(latest["id"], id.as_str());
    verify_ok(&export);
    let v = bkimg_ok(&["verify", "--repo", p(&export), &id, "--json"]).json();
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");

    let from_export = w.path().join("from-export.img");
    restore(&export, &id, &from_export);
    assert_eq!(
        sha256_file(&from_export),
        sha256_file(&from_repo),
        "restore from the export equals restore from the repository"
    );

    // Exporting over an existing file is refused and leaves it alone.
    let existing = w.path().join("existing.bkimg");
    fs::write(&existing, b"keep me").unwrap();
    let r = bkimg(&[
        "export",
        "--repo",
        p(&repo),
        &id,
        "-o",
        p(&existing),
        "--quiet",
    ]);
    assert_ne!(r.code, 0, "export over an existing file");
    assert_eq!(fs::read(&existing).unwrap(), b"keep me");
}

#[test]
fn json_outputs() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let disk = bare_fs(
        w.path(),
        "fs.img",
        64 * MIB,
        Fs::Ext4,
        "jsonfs",
        "9d8c7b6a-5f4e-4d3c-8b2a-190817263544",
        800,
    );
    let repo = w.path().join("repo");

    let c1 = bkimg_ok(&["capture", "--repo", p(&repo), "--json", p(&disk.path)]).json();
    let id1 = c1["id"]
        .as_str()
        .expect("capture --json has an id")
        .to_string();
    assert!(c1["parent"].is_null(), "{c1:#}");
    assert!(c1["created"].is_string(), "{c1:#}");
    assert!(c1["seconds"].is_number(), "{c1:#}");
    assert!(c1["bytes_read"].as_u64().unwrap() > 0, "{c1:#}");
    assert!(c1["bytes_stored_new"].as_u64().unwrap() > 0, "{c1:#}");
    assert_eq!(c1["disks"][0]["disk"], "disk0", "{c1:#}");
    assert_eq!(c1["disks"][0]["mode"], "full", "{c1:#}");
    assert_eq!(c1["disks"][0]["source"], p(&disk.path), "{c1:#}");

    // Change the filesystem and take an incremental.
    {
        let lo = Loop::attach(&disk.path, 0, None, false);
        let m = Mount::new(&lo.dev, "rw");
        fs::write(m.path().join("added-later.bin"), noise(500_000, 801)).unwrap();
        fs::remove_file(m.path().join("srv/data/blob3")).unwrap();
    }
    let changed = describe(&disk.path, 0, 0, 64 * MIB, Fs::Ext4);
    let c2 = bkimg_ok(&[
        "capture",
        "--repo",
        p(&repo),
        "--json",
        "--parent",
        "latest",
        p(&disk.path),
    ])
    .json();
    let id2 = c2["id"].as_str().expect("id").to_string();
    assert_ne!(id1, id2);
    assert_eq!(c2["parent"], id1.as_str(), "{c2:#}");
    assert_eq!(c2["disks"][0]["mode"], "hash-diff", "{c2:#}");

    let list = bkimg_ok(&["list", "--repo", p(&repo), "--json"]).json();
    let arr = list.as_array().expect("list --json is an array");
    assert_eq!(arr.len(), 2, "{list:#}");
    assert_eq!(arr[0]["id"], id1.as_str(), "oldest first: {list:#}");
    assert_eq!(arr[1]["id"], id2.as_str(), "oldest first: {list:#}");
    let find = |id: &str| {
        arr.iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {list:#}"))
    };
    assert!(
        find(&id1)["parent"].is_null(),
        "a full restore point has parent null"
    );
    assert_eq!(find(&id2)["parent"], id1.as_str());
    for e in arr {
        assert!(e.get("parent").is_some(), "parent key present: {e:#}");
        let created = e["created"].as_str().expect("created");
        assert!(
            created.contains('T') && created.len() >= 20,
            "RFC 3339 created: {created}"
        );
    }

    let info = info_json(&repo, &id2);
    assert_eq!(info["id"], id2.as_str());
    assert_eq!(info["manifest"]["id"], id2.as_str());
    assert_eq!(info["manifest"]["parent"]["id"], id1.as_str());
    assert_eq!(
        info["manifest"]["disks"][0]["size"].as_u64(),
        Some(64 * MIB)
    );

    let v = bkimg_ok(&["verify", "--repo", p(&repo), "--json"]).json();
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
    let points: Vec<&str> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        points.contains(&id1.as_str()) && points.contains(&id2.as_str()),
        "{v:#}"
    );

    let r1 = w.path().join("r1.img");
    let rj = bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id1,
        "--target",
        p(&r1),
        "--json",
    ])
    .json();
    assert_eq!(rj["id"], id1.as_str(), "{rj:#}");
    assert!(
        rj["report"]["bytes_written"].as_u64().unwrap() > 0,
        "{rj:#}"
    );
    check_volumes(&disk.vols, &r1, "the full restore point");
    let r2 = w.path().join("r2.img");
    restore(&repo, &id2, &r2);
    check_volumes(&[changed], &r2, "the incremental restore point");

    // Not found: exit 4.
    let r = bkimg(&[
        "info",
        "--repo",
        p(&repo),
        "20000101T000000Z-ffffff",
        "--json",
    ]);
    assert_eq!(r.code, 4, "unknown restore point: {}", r.stderr);
}

#[test]
fn restore_to_block_device() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let size = 96 * MIB;
    let disk = small_gpt(w.path(), "disk.img", size, 900);
    write_at(
        &disk.path,
        34 * SECTOR,
        &noise(((2048 - 34) * SECTOR) as usize, 901),
    );
    let repo = w.path().join("repo");
    let id = capture(&repo, &[&disk.path]);
    let reference = w.path().join("reference.img");
    restore(&repo, &id, &reference);
    check_volumes(&disk.vols, &reference, "image restore");

    // A device full of old data.
    let dev_file = w.path().join("device.img");
    sparse_file(&dev_file, size);
    for (i, at) in [0, 3 * MIB, 20 * MIB, 50 * MIB, 80 * MIB, size - 2 * MIB]
        .into_iter()
        .enumerate()
    {
        write_at(&dev_file, at, &noise(2 * MIB as usize, 910 + i as u64));
    }
    let lo = Loop::attach(&dev_file, 0, None, false);
    let dev = PathBuf::from(&lo.dev);
    let before = sha256_file(&dev);

    let r = bkimg(&["restore", "--repo", p(&repo), &id, "--target", &lo.dev]);
    assert_eq!(
        r.code, 5,
        "a block device without --yes and no tty: exit 5\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("--yes"),
        "the message says how to go on: {}",
        r.stderr
    );
    assert_eq!(sha256_file(&dev), before, "the refused device is unchanged");

    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        &lo.dev,
        "--yes",
        "--quiet",
    ]);
    assert_eq!(
        sha256_file(&dev),
        sha256_file(&reference),
        "the device holds exactly what the image restore holds (old data zeroed)"
    );
    drop(lo);
    check_gpt_entries(&disk, &dev_file);
    check_volumes(&disk.vols, &dev_file, "block device restore");

    // An existing image file full of old data is overwritten the same way.
    let old_file = w.path().join("old-data.img");
    fs::copy(&dev_file, &old_file).unwrap();
    write_at(&old_file, 0, &noise(size as usize, 930));
    restore(&repo, &id, &old_file);
    assert_eq!(
        sha256_file(&old_file),
        sha256_file(&reference),
        "an existing image file holds exactly what a new one holds"
    );

    // A smaller device is refused even with --yes, and left alone.
    let small_file = w.path().join("small-device.img");
    sparse_file(&small_file, size - MIB);
    write_at(&small_file, 0, &noise(MIB as usize, 920));
    let small = Loop::attach(&small_file, 0, None, false);
    let before = sha256_file(Path::new(&small.dev));
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        &small.dev,
        "--yes",
    ]);
    assert_eq!(r.code, 5, "too small a device: exit 5\n{}", r.stderr);
    assert_eq!(
        sha256_file(Path::new(&small.dev)),
        before,
        "the small device is unchanged"
    );
    drop(small);

    // And so is a smaller image file.
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        p(&small_file),
    ]);
    assert_eq!(r.code, 5, "too small an image file: exit 5\n{}", r.stderr);
    assert_eq!(file_size(&small_file), size - MIB);
    verify_ok(&repo);
}

#[test]
fn one_path_for_two_disks_is_refused() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let a = w.path().join("a.img");
    let b = w.path().join("b.img");
    fs::write(&a, noise((8 * MIB) as usize, 1001)).unwrap();
    fs::write(&b, noise((4 * MIB) as usize, 1002)).unwrap();
    let repo = w.path().join("repo");
    let id = capture(&repo, &[&a, &b]);

    // Both disks of the point onto one file: each would overwrite the other.
    let same = w.path().join("same.img");
    let t0 = format!("disk0={}", p(&same));
    let t1 = format!("disk1={}", p(&same));
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        &t0,
        "--target",
        &t1,
    ]);
    let outcome = if same.exists() {
        format!(
            "disk0 restored intact: {}",
            sha256_file(&same) == sha256_file(&a)
        )
    } else {
        "no file".into()
    };
    assert_ne!(
        r.code,
        0,
        "two disks restored onto the same file {} must be refused, got exit 0 ({outcome})\n{}",
        same.display(),
        r.stderr
    );
}

#[test]
fn export_to_a_name_ending_in_partial() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let a = w.path().join("a.img");
    fs::write(&a, noise((4 * MIB) as usize, 1101)).unwrap();
    let repo = w.path().join("repo");
    let id = capture(&repo, &[&a]);
    // The export writes OUTPUT with its extension replaced by ".partial" first: an OUTPUT
    // that already ends in ".partial" must still work.
    let out = w.path().join("nightly.partial");
    let r = bkimg(&["export", "--repo", p(&repo), &id, "-o", p(&out), "--quiet"]);
    assert_eq!(r.code, 0, "export -o {}: {}", out.display(), r.stderr);
    assert!(out.is_file(), "the export file exists");
    let restored = w.path().join("restored.img");
    restore(&out, &id, &restored);
    assert_eq!(sha256_file(&restored), sha256_file(&a));
}

/// Attaches a whole file as a loop device with the given logical sector size.
fn loop_with_sector_size(image: &Path, sector: u64) -> Loop {
    let dev = sh(
        "losetup",
        &["-f", "--show", "-b", &sector.to_string(), p(image)],
    )
    .trim()
    .to_string();
    Loop { dev }
}

#[test]
fn four_k_sector_disk() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let size = 64 * MIB;
    let src_file = w.path().join("src4k.img");
    sparse_file(&src_file, size);
    let src = loop_with_sector_size(&src_file, 4096);
    sh(
        "sgdisk",
        &[
            "-o",
            "-n",
            "1:256:+20M",
            "-c",
            "1:first",
            "-A",
            "1:set:63",
            "-n",
            "2:0:0",
            "-c",
            "2:second",
            &src.dev,
        ],
    );
    // Recognisable data in both partitions and in the gap after the GPT.
    write_at(&src_file, 6 * 4096, &noise(200 * 4096, 1201));
    write_at(&src_file, 256 * 4096, &noise((2 * MIB) as usize, 1202));
    write_at(&src_file, 5376 * 4096, &noise((2 * MIB) as usize, 1203));
    let repo = w.path().join("repo");
    let id = capture(&repo, &[Path::new(&src.dev)]);
    let info = info_json(&repo, &id);
    assert_eq!(
        info["manifest"]["disks"][0]["logical_sector_size"].as_u64(),
        Some(4096)
    );
    assert_eq!(
        info["manifest"]["disks"][0]["table"]["kind"], "gpt",
        "{info:#}"
    );

    // Onto another 4096-byte-sector device: the same disk.
    let dst_file = w.path().join("dst4k.img");
    sparse_file(&dst_file, size);
    let dst = loop_with_sector_size(&dst_file, 4096);
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        &dst.dev,
        "--yes",
        "--quiet",
    ]);
    let print = |dev: &str| sh("sgdisk", &["-p", dev]).replace(dev, "DEV");
    assert_eq!(
        print(&dst.dev),
        print(&src.dev),
        "sgdisk -p on the 4K device"
    );
    for n in ["1", "2"] {
        assert_eq!(
            sh("sgdisk", &["-i", n, &dst.dev]),
            sh("sgdisk", &["-i", n, &src.dev])
        );
    }
    drop(dst);
    assert_eq!(
        sha256_file(&dst_file),
        sha256_file(&src_file),
        "every byte restored"
    );

    // Onto a 512-byte-sector device: the partition table's LBAs would mean other bytes
    // there, so the device is the wrong kind of target.
    let f512 = w.path().join("dst512.img");
    sparse_file(&f512, 2 * size);
    write_at(&f512, 0, &noise(MIB as usize, 1204));
    let d512 = Loop::attach(&f512, 0, None, false);
    let before = sha256_file(Path::new(&d512.dev));
    let r = bkimg(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        &d512.dev,
        "--yes",
    ]);
    let (_, sg) = sh_status("sgdisk", &["-p", &d512.dev]);
    assert_eq!(
        r.code,
        5,
        "restoring a 4096-byte-sector disk onto a 512-byte-sector device must be refused; \
         got exit {} ({}), and the device now reads:\n{sg}",
        r.code,
        r.stderr.trim()
    );
    assert_eq!(
        sha256_file(Path::new(&d512.dev)),
        before,
        "the refused device is unchanged"
    );
}

/// A filesystem smaller than its partition: the bytes after the filesystem's last block
/// are not free space of that filesystem, they are outside it. Real case: md RAID1 with
/// metadata 1.0 (or 0.90) keeps its superblock in the last 64 KiB of the partition, after
/// the ext4/XFS it holds; losing it leaves a restored array member that never assembles.
#[test]
fn bytes_after_the_filesystem_end_are_kept() {
    if !require_root() {
        return;
    }
    let w = workdir();
    let path = w.path().join("tail.img");
    sparse_file(&path, 256 * MIB);
    sh(
        "sgdisk",
        &["-o", "-n", "1:2048:+64M", "-n", "2:0:0", p(&path)],
    );
    let parts = partitions(&path);
    let (_, o1, s1) = parts[0];
    let (_, o2, s2) = parts[1];
    {
        let lo = Loop::attach(&path, o1, Some(s1), false);
        sh(
            "mkfs.ext4",
            &["-q", "-F", "-L", "short-ext4", &lo.dev, "48M"],
        );
        let m = Mount::new(&lo.dev, "rw");
        fs::write(m.path().join("file"), noise(300_000, 1301)).unwrap();
    }
    {
        let lo = Loop::attach(&path, o2, Some(s2), false);
        sh(
            "env",
            &[
                "TEST_DIR=1",
                "TEST_DEV=1",
                "QA_CHECK_FS=1",
                "mkfs.xfs",
                "-f",
                "-q",
                "-L",
                "short-xfs",
                "-d",
                "size=150m",
                &lo.dev,
            ],
        );
        let m = Mount::new(&lo.dev, "rw,nouuid");
        fs::write(m.path().join("file"), noise(300_000, 1302)).unwrap();
    }
    // The last MiB of each partition: well past each filesystem's end.
    write_at(&path, o1 + s1 - MIB, &noise(MIB as usize, 1303));
    write_at(&path, o2 + s2 - MIB, &noise(MIB as usize, 1304));
    let v1 = describe(&path, 1, o1, s1, Fs::Ext4);
    let v2 = describe(&path, 2, o2, s2, Fs::Xfs);

    let repo = w.path().join("repo");
    let id = capture(&repo, &[&path]);
    let restored = w.path().join("restored.img");
    restore(&repo, &id, &restored);
    check_volumes(
        &[v1, v2],
        &restored,
        "filesystems smaller than their partitions",
    );
    assert_same_bytes(
        &path,
        &restored,
        o1 + s1 - MIB,
        MIB,
        "ext4 partition's last MiB (after the filesystem)",
    );
    assert_same_bytes(
        &path,
        &restored,
        o2 + s2 - MIB,
        MIB,
        "XFS partition's last MiB (after the filesystem)",
    );
}
