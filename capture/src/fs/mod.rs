//! Filesystem detection and used-block maps, so a capture can skip free space.
//!
//! A wrong map loses data, so every module answers `None` ("capture it raw") whenever the
//! filesystem is not in a state it fully understands.

use crate::region::Region;
use std::io;
use std::ops::Range;

pub mod detect;
pub mod ext4;
pub mod xfs;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Vfat,
    Swap,
    Luks,
    LvmPv,
    Btrfs,
    Unknown,
}

impl FsKind {
    /// The type name blkid uses.
    pub fn name(&self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Vfat => "vfat",
            FsKind::Swap => "swap",
            FsKind::Luks => "crypto_LUKS",
            FsKind::LvmPv => "LVM2_member",
            FsKind::Btrfs => "btrfs",
            FsKind::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsInfo {
    pub kind: FsKind,
    /// As blkid prints it.
    pub uuid: Option<String>,
    /// None when empty.
    pub label: Option<String>,
    pub block_size: Option<u32>,
}

/// Lazily produced byte ranges of a volume; an `Err` item ends the iteration.
pub type UsedRanges = Box<dyn Iterator<Item = io::Result<Range<u64>>> + Send>;

/// Identify what is on a volume by its superblock signatures. `Ok(None)` = nothing
/// recognised, or signatures of several kinds (ambiguous, like blkid's "ambivalent").
pub fn detect(vol: &Region) -> io::Result<Option<FsInfo>> {
    detect::detect(vol)
}

/// Byte ranges of `vol` (relative to its start) that the filesystem may use, ascending,
/// non-overlapping, adjacent ones merged, all within `vol.len()`. `Ok(None)` = not
/// supported or not in a state we trust: capture the volume raw. Reads lazily, one block
/// group / allocation group at a time.
pub fn used_ranges(vol: &Region, info: &FsInfo) -> io::Result<Option<UsedRanges>> {
    match info.kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => ext4::used_ranges(vol, info),
        FsKind::Xfs => xfs::used_ranges(vol, info),
        _ => Ok(None),
    }
}

/// Wraps a module's ranges so callers always get the documented shape: empty ranges
/// dropped, everything clipped to `limit`, touching or overlapping ranges joined, and a
/// range that goes backwards turned into an error instead of a silently wrong map.
pub(crate) fn coalesce<I>(inner: I, limit: u64) -> UsedRanges
where
    I: Iterator<Item = io::Result<Range<u64>>> + Send + 'static,
{
    Box::new(Coalesce {
        inner,
        pending: None,
        limit,
        done: false,
    })
}

struct Coalesce<I> {
    inner: I,
    pending: Option<Range<u64>>,
    limit: u64,
    done: bool,
}

impl<I: Iterator<Item = io::Result<Range<u64>>>> Iterator for Coalesce<I> {
    type Item = io::Result<Range<u64>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            let range = match self.inner.next() {
                None => {
                    self.done = true;
                    return self.pending.take().map(Ok);
                }
                Some(Err(e)) => return Some(self.fail(e)),
                Some(Ok(r)) => r.start.min(self.limit)..r.end.min(self.limit),
            };
            if range.is_empty() {
                continue;
            }
            match self.pending.as_mut() {
                None => self.pending = Some(range),
                Some(p) if range.start < p.start => {
                    let msg = format!("used-block map went backwards: {range:?} after {p:?}");
                    return Some(self.fail(corrupt(msg)));
                }
                Some(p) if range.start <= p.end => p.end = p.end.max(range.end),
                Some(p) => return Some(Ok(std::mem::replace(p, range))),
            }
        }
    }
}

impl<I> Coalesce<I> {
    fn fail(&mut self, e: io::Error) -> io::Result<Range<u64>> {
        self.done = true;
        self.pending = None;
        Err(e)
    }
}

/// Why a volume gets no map; kept for tests and debugging.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unsupported(pub(crate) String);

/// Internal outcome of a failed check: a real I/O error, or "capture it raw".
pub(crate) enum Bail {
    Io(io::Error),
    Unsupported(Unsupported),
}

impl From<io::Error> for Bail {
    fn from(e: io::Error) -> Self {
        Bail::Io(e)
    }
}

impl Bail {
    /// Once ranges have been handed out, "unsupported" can only be reported as an error.
    pub(crate) fn into_io(self, fs: &str) -> io::Error {
        match self {
            Bail::Io(e) => e,
            Bail::Unsupported(u) => corrupt(format!("{fs}: {}", u.0)),
        }
    }
}

pub(crate) fn unsupported<T>(why: impl Into<String>) -> Result<T, Bail> {
    Err(Bail::Unsupported(Unsupported(why.into())))
}

/// Splits a check's outcome into the public shape (`Ok(None)` for unsupported) while
/// keeping the reason for tests.
pub(crate) fn split_outcome(
    outcome: Result<UsedRanges, Bail>,
) -> io::Result<Result<UsedRanges, Unsupported>> {
    match outcome {
        Ok(ranges) => Ok(Ok(ranges)),
        Err(Bail::Unsupported(u)) => Ok(Err(u)),
        Err(Bail::Io(e)) => Err(e),
    }
}

/// The error for on-disk structures that stop making sense in the middle of a map.
pub(crate) fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Lowercase 8-4-4-4-12, as blkid prints filesystem UUIDs.
pub(crate) fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Whether `info` was detected from a filesystem with this raw UUID (blkid shows no UUID
/// when it is all zeros), so a map is never made for a volume `info` does not describe.
pub(crate) fn same_uuid(info: &FsInfo, raw: &[u8; 16]) -> bool {
    info.uuid == (*raw != [0; 16]).then(|| format_uuid(raw))
}

/// Text up to the first NUL, trailing blanks removed; None when nothing is left.
pub(crate) fn label_text(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let text = String::from_utf8_lossy(&raw[..end]);
    let text = text.trim_end_matches([' ', '\t', '\n', '\r']);
    (!text.is_empty()).then(|| text.to_string())
}

// Fixed-offset readers for buffers whose size the caller has already checked.

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    (u64::from(be32(b, off)) << 32) | u64::from(be32(b, off + 4))
}

pub(crate) fn array16(b: &[u8], off: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    a
}

const CRC32C_TABLE: [u32; 256] = reflected_table32(0x82F6_3B78);
const CRC16_TABLE: [u16; 256] = narrow(reflected_table32(0xA001));

const fn reflected_table32(poly: u32) -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ poly
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// The reflected CRC-16 table is the 32-bit one for the same polynomial: with a 16-bit
/// polynomial no bit above 15 is ever set.
const fn narrow(table: [u32; 256]) -> [u16; 256] {
    let mut out = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        out[i] = table[i] as u16;
        i += 1;
    }
    out
}

/// CRC32C register update without the usual pre/post inversion, like Linux's `crc32c()`
/// (ext4 uses it raw; the standard CRC32C is `!crc32c_update(!0, data)`).
pub(crate) fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// Standard CRC32C of `data` with the 4 bytes at `field` counted as zeros, which is how
/// XFS and btrfs checksum a block that stores its own checksum.
pub(crate) fn crc32c_skipping(data: &[u8], field: usize) -> u32 {
    let crc = crc32c_update(!0, &data[..field]);
    let crc = crc32c_update(crc, &[0; 4]);
    !crc32c_update(crc, &data[field + 4..])
}

/// Linux's `crc16()` (CRC-16/ARC polynomial, no inversion), used by ext4's gdt_csum.
pub(crate) fn crc16_update(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc = CRC16_TABLE[((crc ^ u16::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_known_answers() {
        assert_eq!(!crc32c_update(!0, b"123456789"), 0xE306_9283);
        assert_eq!(crc16_update(0, b"123456789"), 0xBB3D);
    }

    #[test]
    fn coalesce_joins_clips_and_rejects_backwards() {
        let input = vec![Ok(0..10), Ok(10..20), Ok(15..18), Ok(30..40), Ok(45..100)];
        let out: Vec<_> = coalesce(input.into_iter(), 50).collect();
        let out: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(out, vec![0..20, 30..40, 45..50]);

        let bad = vec![Ok(10..20), Ok(5..8)];
        let out: Vec<_> = coalesce(bad.into_iter(), 50).collect();
        assert!(out.last().unwrap().is_err());
    }

    #[test]
    fn uuid_and_label_formatting() {
        let b: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        assert_eq!(format_uuid(&b), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(label_text(b"abc  \0junk"), Some("abc".to_string()));
        assert_eq!(label_text(b"\0\0\0"), None);
    }
}

/// Shared helpers for the tests that build real filesystems with the system's tools.
#[cfg(test)]
pub(crate) mod testutil {
    use super::FsInfo;
    use crate::region::Region;
    use std::collections::HashMap;
    use std::fs::{self, File, OpenOptions};
    use std::io::{Read, Write};
    use std::ops::Range;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// True when every tool is installed and we are root; otherwise says why the test
    /// skips, or, in CI (CI set), fails: CI must run every filesystem test.
    pub fn tools_available(tools: &[&str]) -> bool {
        if !is_root() {
            skip("needs root");
            return false;
        }
        for tool in tools {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !found {
                skip(&format!("{tool} is not installed"));
                return false;
            }
        }
        true
    }

    /// Skips a test outside CI; fails it in CI.
    pub fn skip(why: &str) {
        assert!(
            std::env::var_os("CI").is_none(),
            "{why}: CI must run this test (.ci/test installs the tools and runs as root)"
        );
        eprintln!("skipping: {why}");
    }

    fn is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false)
    }

    /// A temporary file or directory, removed on drop.
    pub struct TempPath(pub PathBuf);

    impl TempPath {
        pub fn path(&self) -> &Path {
            &self.0
        }

        pub fn as_str(&self) -> &str {
            self.0.to_str().expect("temp paths are UTF-8")
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            if self.0.is_dir() {
                let _ = fs::remove_dir(&self.0);
            } else {
                let _ = fs::remove_file(&self.0);
            }
        }
    }

    pub fn temp_name(tag: &str) -> PathBuf {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        std::env::temp_dir().join(format!("fsdev-{}-{n}-{tag}", std::process::id()))
    }

    /// A sparse image file of `mib` MiB.
    pub fn image(tag: &str, mib: u64) -> TempPath {
        let path = TempPath(temp_name(&format!("{tag}.img")));
        File::create(path.path())
            .and_then(|f| f.set_len(mib << 20))
            .expect("create image");
        path
    }

    pub fn run_unchecked(cmd: &str, args: &[&str]) -> Output {
        Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
    }

    pub fn run(cmd: &str, args: &[&str]) -> String {
        let out = run_unchecked(cmd, args);
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn region(path: &Path) -> Region {
        let file = File::open(path).expect("open image");
        let len = file.metadata().expect("stat image").len();
        Region::new(Arc::new(file), 0, len)
    }

    /// A loop mount, unmounted on drop.
    pub struct Mounted {
        dir: TempPath,
    }

    impl Mounted {
        pub fn dir(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }

    pub fn mount(image: &Path, options: &str) -> Mounted {
        let dir = TempPath(temp_name("mnt"));
        fs::create_dir(dir.path()).expect("create mount point");
        let opts = format!("loop,{options}");
        let image = image.to_str().expect("UTF-8 path");
        run("mount", &["-o", &opts, image, dir.as_str()]);
        Mounted { dir }
    }

    pub fn blkid(image: &Path) -> HashMap<String, String> {
        let image = image.to_str().expect("UTF-8 path");
        let out = run_unchecked("blkid", &["-p", "-o", "export", image]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), unescape(v)))
            .collect()
    }

    /// `blkid -o export` escapes blanks and the like with a backslash.
    fn unescape(v: &str) -> String {
        let mut out = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            out.push(if c == '\\' {
                chars.next().unwrap_or(c)
            } else {
                c
            });
        }
        out
    }

    /// Asserts that detect() agrees with blkid on type, UUID and label.
    pub fn assert_matches_blkid(image: &Path, info: &FsInfo) {
        let b = blkid(image);
        assert_eq!(
            b.get("TYPE").map(String::as_str),
            Some(info.kind.name()),
            "{b:?}"
        );
        assert_eq!(b.get("UUID"), info.uuid.as_ref(), "{b:?}");
        assert_eq!(b.get("LABEL"), info.label.as_ref(), "{b:?}");
    }

    /// Deterministic pseudo-random bytes (xorshift64*), so contents can be regenerated.
    pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    pub struct FileSpec {
        pub name: String,
        pub seed: u64,
        pub len: usize,
    }

    fn write_file(dir: &Path, spec: &FileSpec) {
        let path = dir.join(&spec.name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        let mut f = File::create(&path).expect("create file");
        f.write_all(&pattern(spec.seed, spec.len))
            .expect("write file");
    }

    /// Writes files of many sizes, deletes some, writes more into the freed space, and
    /// returns the files that remain.
    pub fn populate(dir: &Path, small_files: usize) -> Vec<FileSpec> {
        let sizes = [
            0usize,
            1,
            1000,
            4096,
            4097,
            65536,
            300_000,
            1 << 20,
            (3 << 20) + 123,
            9 << 20,
        ];
        let mut files: Vec<FileSpec> = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let name = format!("big/f{i}");
            files.push(FileSpec {
                name,
                seed: i as u64 + 1,
                len,
            });
        }
        for i in 0..small_files {
            let name = format!("small/d{}/s{i}", i % 7);
            let len = 500 + (i * 977) % 9000;
            files.push(FileSpec {
                name,
                seed: 1000 + i as u64,
                len,
            });
        }
        for f in &files {
            write_file(dir, f);
        }
        sync(dir);
        let (gone, mut kept): (Vec<_>, Vec<_>) =
            files.into_iter().enumerate().partition(|(i, _)| i % 3 == 1);
        for (_, f) in &gone {
            fs::remove_file(dir.join(&f.name)).expect("delete");
        }
        sync(dir);
        let mut kept: Vec<FileSpec> = kept.drain(..).map(|(_, f)| f).collect();
        for i in 0..3 {
            let spec = FileSpec {
                name: format!("late/l{i}"),
                seed: 5000 + i,
                len: (5 << 20) + i as usize * 4099,
            };
            write_file(dir, &spec);
            kept.push(spec);
        }
        sync(dir);
        kept
    }

    fn sync(dir: &Path) {
        run("sync", &["-f", dir.to_str().expect("UTF-8 path")]);
    }

    pub fn verify_files(dir: &Path, files: &[FileSpec]) {
        for f in files {
            let mut data = Vec::new();
            File::open(dir.join(&f.name))
                .and_then(|mut h| h.read_to_end(&mut data))
                .unwrap_or_else(|e| panic!("read {}: {e}", f.name));
            assert!(
                data == pattern(f.seed, f.len),
                "{} differs after copy",
                f.name
            );
        }
    }

    pub fn collect(iter: super::UsedRanges) -> Vec<Range<u64>> {
        iter.map(|r| r.expect("range")).collect()
    }

    /// Ascending, non-overlapping, not touching, non-empty, within `len`.
    pub fn assert_shape(ranges: &[Range<u64>], len: u64) {
        for r in ranges {
            assert!(r.start < r.end && r.end <= len, "bad range {r:?}");
        }
        for w in ranges.windows(2) {
            assert!(
                w[0].end < w[1].start,
                "unordered or touching {:?} {:?}",
                w[0],
                w[1]
            );
        }
    }

    pub fn total(ranges: &[Range<u64>]) -> u64 {
        ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// A same-size sparse image holding only `ranges` of `src`.
    pub fn copy_ranges(src: &Path, ranges: &[Range<u64>]) -> TempPath {
        let dst = TempPath(temp_name("copy.img"));
        let input = File::open(src).expect("open source");
        let len = input.metadata().expect("stat").len();
        let output = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dst.path())
            .expect("create copy");
        output.set_len(len).expect("size copy");
        let mut buf = vec![0u8; 1 << 20];
        for r in ranges {
            let mut pos = r.start;
            while pos < r.end {
                let n = ((r.end - pos) as usize).min(buf.len());
                input.read_exact_at(&mut buf[..n], pos).expect("read");
                output.write_all_at(&buf[..n], pos).expect("write");
                pos += n as u64;
            }
        }
        output.sync_all().expect("sync copy");
        dst
    }
}
