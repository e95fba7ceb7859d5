//! Export files: one restore point and everything it needs, in a single file.
//!
//! ```text
//! header (64)   magic, version, flags
//! objects       chunk blobs, index objects and manifests, back to back
//! directory     56-byte entries sorted by (kind, key): kind u8, 7 zero bytes,
//!               key [32], offset u64, length u64
//! trailer (64)  magic, version, 4 zero bytes, directory offset u64, entry count u64,
//!               SHA-256 of the directory [32]
//! ```
//! Keys: a chunk's or index's digest; SHA-256 of the id for manifests. Lookups binary-search
//! the directory on disk, so memory does not grow with the number of chunks.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::StoreRead;
use crate::chunk::{u32_at, u64_at};
use crate::digest::{Digest, Hasher};
use crate::error::{FormatError, IoContext, Result};
use crate::magic;
use crate::manifest::Manifest;

pub const HEADER_LEN: u64 = 64;
pub const TRAILER_LEN: u64 = 64;
pub const ENTRY_LEN: u64 = 56;
pub const VERSION: u32 = 1;
/// Header and trailer flag: the export holds a protected (encrypted or signed) restore
/// point as stored, with the repository's config and key slots (spec/format.md §10.3).
pub const FLAG_PROTECTED: u32 = 1;

/// Object kinds in an export's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKind {
    Chunk = 1,
    Index = 2,
    /// The manifest of the exported restore point.
    Manifest = 3,
    /// Manifests of its ancestors, kept so the digest chain can be checked.
    AncestorManifest = 4,
    /// The prune record that ends the digest chain, when the oldest ancestor was pruned.
    PruneRecord = 5,
    /// The repository config (protected exports; key: 32 zero bytes).
    Config = 6,
    /// A key slot (protected exports; key: SHA-256 of the slot id).
    KeySlot = 7,
    /// The id of a kind-3 restore point, whose sealed manifest cannot be read without the
    /// key (protected exports; key: SHA-256 of the id, as kind 3).
    PointId = 8,
}

impl ObjectKind {
    fn from_u8(b: u8) -> Option<ObjectKind> {
        Some(match b {
            1 => ObjectKind::Chunk,
            2 => ObjectKind::Index,
            3 => ObjectKind::Manifest,
            4 => ObjectKind::AncestorManifest,
            5 => ObjectKind::PruneRecord,
            6 => ObjectKind::Config,
            7 => ObjectKind::KeySlot,
            8 => ObjectKind::PointId,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    kind: ObjectKind,
    key: Digest,
    offset: u64,
    len: u64,
}

fn manifest_key(id: &str) -> Digest {
    Digest::of_bytes(id.as_bytes())
}

pub struct ExportFile {
    path: PathBuf,
    file: File,
    dir_offset: u64,
    dir_count: u64,
    protected: bool,
}

impl ExportFile {
    /// Whether the file starts like an export (cheap test used to pick a reader).
    pub fn looks_like_export(path: &Path) -> bool {
        let mut head = [0u8; 8];
        File::open(path)
            .and_then(|f| f.read_exact_at(&mut head, 0))
            .is_ok()
            && head == magic::EXPORT_HEAD
    }

    pub fn open(path: &Path) -> Result<ExportFile> {
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        ExportFile::from_file(path, file)
    }

    /// [`ExportFile::open`] on a file already open (any readable file: a memfd in the
    /// fuzz tests); `path` names it in messages.
    pub fn from_file(path: &Path, file: File) -> Result<ExportFile> {
        let what = format!("export file {}", path.display());
        let bad = |d: String| FormatError::corrupt(what.clone(), d);
        let size = file
            .metadata()
            .ctx(|| format!("reading {}", path.display()))?
            .len();
        if size < HEADER_LEN + TRAILER_LEN {
            return Err(bad(format!("{size} bytes is too short (truncated?)")));
        }
        let mut head = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut head, 0)
            .ctx(|| format!("reading {}", path.display()))?;
        if head[..8] != magic::EXPORT_HEAD {
            return Err(bad("wrong magic number".into()));
        }
        let flags = check_version(&head[8..16], &what)?;
        if head[16..].iter().any(|&b| b != 0) {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        let mut tail = [0u8; TRAILER_LEN as usize];
        file.read_exact_at(&mut tail, size - TRAILER_LEN)
            .ctx(|| format!("reading {}", path.display()))?;
        if tail[..8] != magic::EXPORT_TAIL {
            return Err(bad(
                "no trailer at the end (truncated or still being written?)".into(),
            ));
        }
        if check_version(&tail[8..16], &what)? != flags {
            return Err(bad("the header's and the trailer's flags differ".into()));
        }
        let dir_offset = u64_at(&tail, 16);
        let dir_count = u64_at(&tail, 24);
        let dir_end = dir_count
            .checked_mul(ENTRY_LEN)
            .and_then(|n| n.checked_add(dir_offset));
        if dir_offset < HEADER_LEN || dir_end != Some(size - TRAILER_LEN) {
            return Err(bad("directory position does not match the file size".into()));
        }
        // Hash the directory once, streaming, so a damaged directory is never trusted.
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = dir_offset;
        let mut prev: Option<(u8, [u8; 32])> = None;
        while pos < size - TRAILER_LEN {
            let n = ((size - TRAILER_LEN - pos) as usize).min(buf.len() / 56 * 56);
            file.read_exact_at(&mut buf[..n], pos)
                .ctx(|| format!("reading {}", path.display()))?;
            hasher.update(&buf[..n]);
            for e in buf[..n].chunks_exact(ENTRY_LEN as usize) {
                let entry = parse_entry(e).ok_or_else(|| bad("bad directory entry".into()))?;
                if entry.offset < HEADER_LEN
                    || entry
                        .offset
                        .checked_add(entry.len)
                        .is_none_or(|end| end > dir_offset)
                {
                    return Err(bad("directory entry points outside the object area".into()));
                }
                let order = (e[0], entry.key.0);
                if prev.is_some_and(|p| p >= order) {
                    return Err(bad("directory is not sorted".into()));
                }
                prev = Some(order);
            }
            pos += n as u64;
        }
        if hasher.finish().0 != tail[32..64] {
            return Err(bad("directory does not match its SHA-256 digest".into()));
        }
        Ok(ExportFile {
            path: path.to_path_buf(),
            file,
            dir_offset,
            dir_count,
            protected: flags & FLAG_PROTECTED != 0,
        })
    }

    /// Whether the export holds a protected restore point (read it through its key).
    pub fn is_protected(&self) -> bool {
        self.protected
    }

    /// The repository config of a protected export.
    pub fn config_bytes(&self) -> Result<Vec<u8>> {
        let e = self
            .find(ObjectKind::Config, &Digest([0; 32]))?
            .ok_or_else(|| {
                FormatError::missing(format!("the repository config in {}", self.path.display()))
            })?;
        self.read_small(&e, "its repository config is larger than any config may be")
    }

    /// A document-sized object (config, key slot), or corrupt with `too_large`.
    fn read_small(&self, e: &Entry, too_large: &str) -> Result<Vec<u8>> {
        if e.len > crate::sealed::MAX_BODY_LEN + 64 {
            return Err(FormatError::corrupt(
                format!("export file {}", self.path.display()),
                too_large,
            ));
        }
        let mut buf = Vec::new();
        self.read_entry(e, &mut buf)?;
        Ok(buf)
    }

    /// The repository config of a protected export, decoded; it must be protected too.
    pub fn repo_config(&self) -> Result<super::local::RepoConfig> {
        let what = format!("export file {}", self.path.display());
        let config = super::local::parse_config(
            &self.config_bytes()?,
            &what,
            &format!("the repository config in {what}"),
            true,
        )?;
        if config.encryption.is_none() {
            return Err(FormatError::corrupt(
                what,
                "it is marked protected but its repository config is not",
            ));
        }
        Ok(config)
    }

    /// The key slots of a protected export: (slot id, stored bytes).
    pub fn key_slots(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for e in self.entries_of(ObjectKind::KeySlot)? {
            let buf = self.read_small(&e, "a key slot is larger than any key slot may be")?;
            let id = crate::keys::Slot::decode(&buf)?.slot_id;
            if Digest::of_bytes(id.as_bytes()) != e.key {
                return Err(FormatError::corrupt(
                    format!("key slot {id}"),
                    "it is filed under another slot's id in the export",
                ));
            }
            out.push((id, buf));
        }
        out.sort();
        Ok(out)
    }

    fn entry_at(&self, i: u64) -> Result<Entry> {
        let mut e = [0u8; ENTRY_LEN as usize];
        self.file
            .read_exact_at(&mut e, self.dir_offset + i * ENTRY_LEN)
            .ctx(|| format!("reading {}", self.path.display()))?;
        parse_entry(&e).ok_or_else(|| {
            FormatError::corrupt(format!("export file {}", self.path.display()), "bad entry")
        })
    }

    fn find(&self, kind: ObjectKind, key: &Digest) -> Result<Option<Entry>> {
        let (mut lo, mut hi) = (0u64, self.dir_count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.entry_at(mid)?;
            match (e.kind, e.key).cmp(&(kind, *key)) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(e)),
            }
        }
        Ok(None)
    }

    fn read_entry(&self, e: &Entry, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.resize(e.len as usize, 0);
        self.file
            .read_exact_at(out, e.offset)
            .ctx(|| format!("reading {}", self.path.display()))
    }

    fn entries_of(&self, kind: ObjectKind) -> Result<Vec<Entry>> {
        // Manifests are few and sit after all chunks and indexes: scan from the end.
        let mut out = Vec::new();
        let mut i = self.dir_count;
        while i > 0 {
            i -= 1;
            let e = self.entry_at(i)?;
            if e.kind < kind {
                break;
            }
            if e.kind == kind {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// Checks a version and flags field; returns the flags.
fn check_version(b: &[u8], what: &str) -> Result<u32> {
    let version = u32_at(b, 0);
    if version != VERSION {
        return Err(FormatError::unsupported(
            what,
            format!("export format version {version}"),
        ));
    }
    let flags = u32_at(b, 4);
    if flags & !FLAG_PROTECTED != 0 {
        return Err(FormatError::unsupported(
            what,
            format!("unknown export flags {:#x}", flags & !FLAG_PROTECTED),
        ));
    }
    Ok(flags)
}

fn parse_entry(e: &[u8]) -> Option<Entry> {
    if e[1..8] != [0; 7] {
        return None;
    }
    Some(Entry {
        kind: ObjectKind::from_u8(e[0])?,
        key: Digest(e[8..40].try_into().ok()?),
        offset: u64_at(e, 40),
        len: u64_at(e, 48),
    })
}

impl StoreRead for ExportFile {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn list_manifests(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut buf = Vec::new();
        for e in self.entries_of(ObjectKind::Manifest)? {
            if self.protected {
                // The manifest is sealed: its id is filed beside it (checked when the
                // manifest is opened, which binds the id).
                let id = self.find(ObjectKind::PointId, &e.key)?.ok_or_else(|| {
                    FormatError::corrupt(
                        format!("export file {}", self.path.display()),
                        "a restore point of a protected export has no id entry",
                    )
                })?;
                if id.len > 64 {
                    return Err(FormatError::corrupt(
                        format!("export file {}", self.path.display()),
                        "a restore point id entry is longer than any id",
                    ));
                }
                self.read_entry(&id, &mut buf)?;
                let id = String::from_utf8(std::mem::take(&mut buf))
                    .ok()
                    .filter(|id| manifest_key(id) == e.key)
                    .ok_or_else(|| {
                        FormatError::corrupt(
                            format!("export file {}", self.path.display()),
                            "a restore point id entry does not match its manifest",
                        )
                    })?;
                ids.push(id);
                continue;
            }
            if e.len > crate::sealed::MAX_BODY_LEN + 64 {
                return Err(FormatError::corrupt(
                    format!("export file {}", self.path.display()),
                    "a manifest entry is larger than any manifest may be",
                ));
            }
            self.read_entry(&e, &mut buf)?;
            ids.push(Manifest::decode(&buf)?.id);
        }
        Ok(ids)
    }

    fn read_manifest(&self, id: &str) -> Result<Vec<u8>> {
        let key = manifest_key(id);
        for kind in [ObjectKind::Manifest, ObjectKind::AncestorManifest] {
            if let Some(e) = self.find(kind, &key)? {
                if e.len > crate::sealed::MAX_BODY_LEN + 64 {
                    return Err(FormatError::corrupt(
                        format!("manifest {id}"),
                        "larger than any manifest may be",
                    ));
                }
                let mut buf = Vec::new();
                self.read_entry(&e, &mut buf)?;
                return Ok(buf);
            }
        }
        Err(FormatError::missing(format!("restore point {id}")))
    }

    fn open_index(&self, id: &Digest) -> Result<Box<dyn Read + Send>> {
        let e = self
            .find(ObjectKind::Index, id)?
            .ok_or_else(|| FormatError::missing(format!("volume index {id}")))?;
        let file = self
            .file
            .try_clone()
            .ctx(|| format!("reading {}", self.path.display()))?;
        Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            RangeReader {
                file,
                pos: e.offset,
                end: e.offset + e.len,
            },
        )))
    }

    fn read_chunk(&self, digest: &Digest, out: &mut Vec<u8>) -> Result<()> {
        let e = self
            .find(ObjectKind::Chunk, digest)?
            .ok_or_else(|| FormatError::missing(format!("chunk {digest}")))?;
        let envelope = if self.protected {
            crate::crypto::ENVELOPE_OVERHEAD as u64
        } else {
            0
        };
        if e.len > crate::chunk::HEADER_LEN as u64 + u64::from(crate::MAX_CHUNK_SIZE) + envelope {
            return Err(FormatError::corrupt(
                format!("chunk {digest}"),
                "larger than any chunk can be",
            ));
        }
        self.read_entry(&e, out)
    }

    fn has_chunk(&self, digest: &Digest) -> Result<bool> {
        Ok(self.find(ObjectKind::Chunk, digest)?.is_some())
    }

    fn read_prune_record(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let Some(e) = self.find(ObjectKind::PruneRecord, &manifest_key(id))? else {
            return Ok(None);
        };
        if e.len > crate::sealed::MAX_BODY_LEN + 64 {
            return Err(FormatError::corrupt(
                format!("prune record of {id}"),
                "larger than any prune record may be",
            ));
        }
        let mut buf = Vec::new();
        self.read_entry(&e, &mut buf)?;
        Ok(Some(buf))
    }
}

/// Positioned reads of one object's byte range.
struct RangeReader {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = ((self.end - self.pos) as usize).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// Writes an export file: objects first, then the sorted directory and the trailer.
/// The directory is kept in memory while writing (56 bytes per object).
pub struct ExportWriter<W: Write> {
    out: W,
    pos: u64,
    entries: Vec<Entry>,
    seen: std::collections::HashSet<(u8, Digest)>,
    flags: u32,
}

impl<W: Write> ExportWriter<W> {
    pub fn new(out: W) -> io::Result<Self> {
        Self::with_flags(out, 0)
    }

    /// A writer whose header and trailer carry `flags` ([`FLAG_PROTECTED`]).
    pub fn with_flags(mut out: W, flags: u32) -> io::Result<Self> {
        let mut head = [0u8; HEADER_LEN as usize];
        head[..8].copy_from_slice(&magic::EXPORT_HEAD);
        head[8..12].copy_from_slice(&VERSION.to_le_bytes());
        head[12..16].copy_from_slice(&flags.to_le_bytes());
        out.write_all(&head)?;
        Ok(ExportWriter {
            out,
            pos: HEADER_LEN,
            entries: Vec::new(),
            seen: Default::default(),
            flags,
        })
    }

    /// Whether an object is already in the file.
    pub fn contains(&self, kind: ObjectKind, key: &Digest) -> bool {
        self.seen.contains(&(kind as u8, *key))
    }

    pub fn add(&mut self, kind: ObjectKind, key: Digest, bytes: &[u8]) -> io::Result<()> {
        if !self.seen.insert((kind as u8, key)) {
            return Ok(());
        }
        self.out.write_all(bytes)?;
        self.entries.push(Entry {
            kind,
            key,
            offset: self.pos,
            len: bytes.len() as u64,
        });
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Copies an object from a reader (large indexes) without holding it in memory.
    pub fn add_from(
        &mut self,
        kind: ObjectKind,
        key: Digest,
        mut src: impl Read,
    ) -> io::Result<()> {
        if !self.seen.insert((kind as u8, key)) {
            return Ok(());
        }
        let len = io::copy(&mut src, &mut self.out)?;
        self.entries.push(Entry {
            kind,
            key,
            offset: self.pos,
            len,
        });
        self.pos += len;
        Ok(())
    }

    pub fn add_manifest(&mut self, kind: ObjectKind, id: &str, bytes: &[u8]) -> io::Result<()> {
        self.add(kind, manifest_key(id), bytes)
    }

    /// What a protected export adds: the repository config and key slots as stored, and
    /// the id of its restore point (whose manifest is sealed).
    pub fn add_protection(
        &mut self,
        config: &[u8],
        slots: &[(String, Vec<u8>)],
        point_id: &str,
    ) -> io::Result<()> {
        self.add(ObjectKind::Config, Digest([0; 32]), config)?;
        for (id, bytes) in slots {
            self.add(ObjectKind::KeySlot, Digest::of_bytes(id.as_bytes()), bytes)?;
        }
        self.add(
            ObjectKind::PointId,
            manifest_key(point_id),
            point_id.as_bytes(),
        )
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.entries.sort_by_key(|e| (e.kind, e.key));
        let dir_offset = self.pos;
        let mut hasher = Hasher::default();
        for e in &self.entries {
            let mut raw = [0u8; ENTRY_LEN as usize];
            raw[0] = e.kind as u8;
            raw[8..40].copy_from_slice(&e.key.0);
            raw[40..48].copy_from_slice(&e.offset.to_le_bytes());
            raw[48..56].copy_from_slice(&e.len.to_le_bytes());
            hasher.update(&raw);
            self.out.write_all(&raw)?;
        }
        let mut tail = [0u8; TRAILER_LEN as usize];
        tail[..8].copy_from_slice(&magic::EXPORT_TAIL);
        tail[8..12].copy_from_slice(&VERSION.to_le_bytes());
        tail[12..16].copy_from_slice(&self.flags.to_le_bytes());
        tail[16..24].copy_from_slice(&dir_offset.to_le_bytes());
        tail[24..32].copy_from_slice(&(self.entries.len() as u64).to_le_bytes());
        tail[32..64].copy_from_slice(&hasher.finish().0);
        self.out.write_all(&tail)?;
        self.out.flush()?;
        Ok(self.out)
    }
}
