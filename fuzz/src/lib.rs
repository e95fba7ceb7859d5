//! Fuzz harnesses for every parser bkimg runs on untrusted bytes.
//!
//! Each public function takes one fuzz input, feeds it to a real entry point and checks
//! what must hold for any input: errors come back as values (a panic, an arithmetic
//! overflow under debug assertions or an unbounded allocation is a bug), whatever is
//! accepted re-encodes to the same value, and offsets and lengths stay inside the input.
//! The fuzz targets in `fuzz_targets/` call these (under cargo fuzz and libFuzzer), and
//! `tests/corpus.rs` replays every checked-in corpus file through them under plain
//! `cargo test`.
//!
//! Checksums stop a fuzzer cold: a mutated input almost never carries a valid SHA-256 or
//! CRC. Targets whose format carries one therefore parse each input twice: as given, and
//! with the checksum fields recomputed over the bytes they cover ("fixed up"), so the
//! fuzzer reaches the checks that lie behind them.
//!
//! Filesystem and partition-table targets read a whole volume; their input is a sparse
//! image (see [`SparseVolume`]) so a fuzz input of a few KiB can describe a volume of up
//! to 1 GiB that is mostly zeros.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bkimg_capture::fs::{self as capfs, FsInfo, FsKind};
use bkimg_capture::region::Region;
use bkimg_format::changemap::ChangeMap;
use bkimg_format::chunk::{self, ChunkHeader};
use bkimg_format::crypto::{Aead, Key, ObjectKind, RepoKeys};
use bkimg_format::digest::Digest;
use bkimg_format::index::{self, EntryReader, IndexHeader};
use bkimg_format::keys::{Secret, Slot};
use bkimg_format::manifest::{Content, Manifest};
use bkimg_format::protect::{mac_open, mac_seal, StreamOpener};
use bkimg_format::record::PruneRecord;
use bkimg_format::repo::Repository;
use bkimg_format::store::export::ExportFile;
use bkimg_format::store::local::{parse_config, RepoConfig, CONFIG_KIND};
use bkimg_format::{sealed, MAX_CHUNK_SIZE};
use bkimg_kmod::SavedTracker;
use bkimg_replicate::standby::protocol::{self as p, Kind};

/// A harness: one fuzz input in, a panic if a property does not hold.
pub type Harness = fn(&[u8]);

/// Every target, by the name of its fuzz binary and corpus directory.
pub const TARGETS: &[(&str, Harness)] = &[
    ("chunk", chunk),
    ("index", index),
    ("manifest", manifest),
    ("prune_record", prune_record),
    ("repo_config", repo_config),
    ("export", export),
    ("changemap", changemap),
    ("saved_tracker", saved_tracker),
    ("standby_frames", standby_frames),
    ("partition_table", partition_table),
    ("ext4", ext4),
    ("xfs", xfs),
    ("envelopes", envelopes),
];

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Digest::of_bytes(bytes).0
}

// ---- chunk blobs --------------------------------------------------------------------

/// Chunk blobs (format/src/chunk.rs): header parse, then a full decode against the
/// digest the header names.
pub fn chunk(data: &[u8]) {
    let Ok(header) = ChunkHeader::parse(data) else {
        return;
    };
    assert_eq!(
        header.encode()[..],
        data[..chunk::HEADER_LEN],
        "header round trip"
    );
    assert!(header.plain_len <= MAX_CHUNK_SIZE && header.stored_len <= header.plain_len);
    let mut out = Vec::new();
    if chunk::decode_into(
        data,
        &header.digest,
        &bkimg_format::protect::ChunkIds::Sha256,
        &mut out,
    )
    .is_ok()
    {
        assert_eq!(out.len(), header.plain_len as usize);
        assert_eq!(Digest::of_bytes(&out), header.digest);
        assert_eq!(data.len() as u64, header.blob_len());
        // Re-encoding gives a blob that decodes to the same bytes.
        let again = chunk::encode(&out, header.digest, 1).expect("encode");
        let mut back = Vec::new();
        chunk::decode_into(
            &again,
            &header.digest,
            &bkimg_format::protect::ChunkIds::Sha256,
            &mut back,
        )
        .expect("re-encoded chunk");
        assert_eq!(back, out);
    }
    // A digest other than the header's is always refused.
    let other = Digest(sha256(data));
    if other != header.digest {
        assert!(chunk::decode_into(
            data,
            &other,
            &bkimg_format::protect::ChunkIds::Sha256,
            &mut out
        )
        .is_err());
    }
}

// ---- volume indexes -------------------------------------------------------------------

/// Volume indexes (format/src/index.rs): header, then the entries read in batches.
pub fn index(data: &[u8]) {
    index_once(data);
    if data.len() >= index::HEADER_LEN {
        let mut fixed = data.to_vec();
        let entries = sha256(&fixed[index::HEADER_LEN..]);
        fixed[40..72].copy_from_slice(&entries);
        let crc = crc32(&fixed[..124]);
        fixed[124..128].copy_from_slice(&crc.to_le_bytes());
        index_once(&fixed);
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    // The index header's CRC-32 (IEEE), computed here so the harness does not trust the
    // implementation it tests to fix up its own input.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn index_once(data: &[u8]) {
    let Ok(header) = IndexHeader::parse(data) else {
        return;
    };
    assert_eq!(
        header.encode()[..],
        data[..index::HEADER_LEN],
        "header round trip"
    );
    let count = header.entry_count();
    assert!(count >= 1 && header.chunk_len(count - 1) >= 1);
    assert!(header.chunk_len(count - 1) <= header.chunk_size);
    let mut reader = EntryReader::new(&data[index::HEADER_LEN..], header);
    let mut batch = Vec::new();
    let mut read = 0u64;
    loop {
        match reader.next_batch(1000, &mut batch) {
            Ok(()) if batch.is_empty() => break,
            Ok(()) => read += batch.len() as u64,
            Err(_) => return,
        }
    }
    // Accepted: exactly the entries the header declares, no more bytes, the right digest.
    assert_eq!(read, count);
    assert_eq!(data.len() as u64, header.object_len());
    assert_eq!(sha256(&data[index::HEADER_LEN..]), header.entries_digest.0);
}

// ---- sealed documents -----------------------------------------------------------------

/// The input with a sealed document's body length and digest recomputed.
fn fix_sealed(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < sealed::HEADER_LEN {
        return None;
    }
    let mut fixed = data.to_vec();
    let body_len = (data.len() - sealed::HEADER_LEN) as u64;
    fixed[24..32].copy_from_slice(&body_len.to_le_bytes());
    let digest = sha256(&data[sealed::HEADER_LEN..]);
    fixed[32..64].copy_from_slice(&digest);
    Some(fixed)
}

fn with_fixed(data: &[u8], fix: fn(&[u8]) -> Option<Vec<u8>>, f: fn(&[u8])) {
    f(data);
    if let Some(fixed) = fix(data) {
        if fixed != data {
            f(&fixed);
        }
    }
}

/// Restore-point manifests (format/src/manifest.rs, through format/src/sealed.rs).
pub fn manifest(data: &[u8]) {
    with_fixed(data, fix_sealed, manifest_once);
}

fn manifest_once(data: &[u8]) {
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    check_manifest(&m);
    let again = Manifest::decode(&m.encode()).expect("a decoded manifest re-encodes");
    assert_eq!(again, m);
}

/// What `Manifest::validate` promises readers.
fn check_manifest(m: &Manifest) {
    for d in &m.disks {
        let mut end = 0;
        for v in &d.volumes {
            assert!(v.size > 0 && v.offset >= end);
            end = v.offset.checked_add(v.size).expect("volume end");
            assert!(end <= d.size);
        }
    }
    for (_, v, idx) in m.indexes() {
        assert_eq!(idx.is_some(), matches!(v.content, Content::Data { .. }));
    }
}

/// Prune records (format/src/record.rs).
pub fn prune_record(data: &[u8]) {
    with_fixed(data, fix_sealed, |data| {
        let Ok(r) = PruneRecord::decode(data) else {
            return;
        };
        assert_eq!(PruneRecord::decode(&r.encode()).expect("re-encodes"), r);
    });
}

/// The repository config (format/src/store/local.rs), the other sealed document.
pub fn repo_config(data: &[u8]) {
    with_fixed(data, fix_sealed, |data| {
        let Ok((c, features)) = sealed::open::<RepoConfig>(&CONFIG_KIND, data) else {
            return;
        };
        assert_eq!(features.incompat & !CONFIG_KIND.known_incompat, 0);
        let again = sealed::seal(&CONFIG_KIND, features, &c);
        let (back, f2) = sealed::open::<RepoConfig>(&CONFIG_KIND, &again).expect("re-seals");
        assert_eq!(
            (back.repository_id, back.created),
            (c.repository_id, c.created)
        );
        assert_eq!(f2, features);
    });
}

// ---- protected repositories --------------------------------------------------------

/// The keys every protected-object input is opened with (spec/format.md §18): a fixed
/// master key, so corpus seeds sealed with it open and the fuzzer mutates from there.
fn fuzz_keys() -> &'static Arc<RepoKeys> {
    static KEYS: std::sync::OnceLock<Arc<RepoKeys>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| Arc::new(RepoKeys::derive(&Key::from_bytes([0x5a; 32]), "fuzz")))
}

/// What an attacker who can write a repository's store hands a reader with the key
/// (format/src/crypto.rs, protect.rs, keys.rs): the first byte picks the parser, the rest
/// is the stored object. Single envelopes, segmented envelopes (indexes) and MAC
/// envelopes must refuse anything they did not seal, without panicking or allocating
/// beyond the input; what opens must seal again to an object that opens to the same
/// bytes. Key slots are decoded and checked (the KDF is run only for costs a fuzzer can
/// afford: a slot's cost is bounded by its checks, not by this harness).
pub fn envelopes(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let keys = fuzz_keys();
    let kinds = [
        ObjectKind::Chunk,
        ObjectKind::Index,
        ObjectKind::Manifest,
        ObjectKind::PruneRecord,
    ];
    let kind = kinds[usize::from(which >> 4) % kinds.len()];
    match which & 3 {
        0 => {
            if let Ok(plain) = keys.open(kind, "object", rest) {
                let again = keys.seal(Aead::preferred(), kind, "object", &plain);
                assert_eq!(keys.open(kind, "object", &again).expect("re-seals"), plain);
                assert!(
                    keys.open(kind, "another", rest).is_err(),
                    "opened under two names"
                );
            }
        }
        1 => {
            let opened = StreamOpener::new(keys, ObjectKind::Index, "index".into(), rest).and_then(
                |mut r| {
                    let mut out = Vec::new();
                    r.read_to_end(&mut out)
                        .map(|_| out)
                        .map_err(|e| bkimg_format::FormatError::corrupt("index", e.to_string()))
                },
            );
            if let Ok(plain) = opened {
                assert!(
                    plain.len() <= rest.len(),
                    "a stream opened to more than it holds"
                );
            }
        }
        2 => {
            if let Ok(content) = mac_open(keys, kind, "point", rest) {
                assert_eq!(mac_seal(keys, kind, "point", &content), rest);
            }
        }
        _ => {
            let Ok(slot) = Slot::decode(rest) else {
                return;
            };
            assert_eq!(Slot::decode(&slot.encode()).expect("re-encodes"), slot);
            let cheap = slot
                .kdf
                .params()
                .is_none_or(|p| p.memory_kib <= 1024 && p.iterations <= 2);
            if cheap {
                let _ = slot.unlock(Secret::Passphrase(b"fuzz"));
            }
        }
    }
}

// ---- export files ---------------------------------------------------------------------

/// A file in memory (memfd) holding `bytes`, so readers that take a `File` read the
/// fuzz input without touching the disk.
fn memfile(len: u64) -> File {
    let fd =
        nix::sys::memfd::memfd_create(c"bkimg-fuzz", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .expect("memfd_create");
    let file = File::from(fd);
    file.set_len(len).expect("sizing a memfd");
    file
}

/// Export files (format/src/store/export.rs): directory checks, then every restore point
/// through `Repository` (manifests, digest chain, indexes, a few chunks).
pub fn export(data: &[u8]) {
    with_fixed(data, fix_export, export_once);
}

/// The input with the directory digest in its trailer recomputed (when the trailer's
/// directory offset lies inside the input).
fn fix_export(data: &[u8]) -> Option<Vec<u8>> {
    let len = data.len();
    if len < 128 {
        return None;
    }
    let tail = len - 64;
    let dir_offset = u64::from_le_bytes(data[tail + 16..tail + 24].try_into().expect("8"));
    let start = usize::try_from(dir_offset).ok().filter(|&o| o <= tail)?;
    let mut fixed = data.to_vec();
    let digest = sha256(&data[start..tail]);
    fixed[tail + 32..].copy_from_slice(&digest);
    Some(fixed)
}

fn export_once(data: &[u8]) {
    let file = memfile(0);
    file.write_all_at(data, 0).expect("writing a memfd");
    let Ok(export) = ExportFile::from_file(Path::new("fuzz-input"), file) else {
        return;
    };
    if export.is_protected() {
        // What is read before the key: the config, the key slots, the point ids.
        let _ = export.config_bytes();
        let _ = export.key_slots();
        let _ = bkimg_format::store::StoreRead::list_manifests(&export);
    }
    let repo = Repository::new(Box::new(export));
    let Ok((points, _damaged)) = repo.points() else {
        return;
    };
    let mut chunks_left = 64;
    for point in &points {
        check_manifest(&point.manifest);
        let _ = repo.chain(point);
        for (_, _, idx) in point.manifest.indexes() {
            let Some(idx) = idx else { continue };
            let Ok(mut entries) = repo.index(&idx) else {
                continue;
            };
            let mut batch = Vec::new();
            while entries.next_batch(4096, &mut batch).is_ok() && !batch.is_empty() {
                for d in &batch {
                    if chunks_left == 0 || d.is_hole() {
                        continue;
                    }
                    chunks_left -= 1;
                    let (mut blob, mut out) = (Vec::new(), Vec::new());
                    if repo.chunk(d, &mut blob, &mut out).is_ok() {
                        assert_eq!(Digest::of_bytes(&out), *d);
                    }
                }
            }
        }
    }
}

// ---- change maps and saved tracker state ----------------------------------------------

/// Change maps (format/src/changemap.rs).
pub fn changemap(data: &[u8]) {
    with_fixed(data, fix_trailing_sha, |data| {
        let Ok(map) = ChangeMap::decode(data) else {
            return;
        };
        assert_eq!(map.encode(), data, "change map round trip");
        let mut prev_end = 0;
        for r in map.byte_ranges() {
            assert!(r.start >= prev_end && r.start < r.end && r.end <= map.device_size);
            prev_end = r.end;
        }
    });
}

/// The input with its last 32 bytes replaced by the SHA-256 of the rest.
fn fix_trailing_sha(data: &[u8]) -> Option<Vec<u8>> {
    let body = data.len().checked_sub(32)?;
    let mut fixed = data.to_vec();
    let digest = sha256(&data[..body]);
    fixed[body..].copy_from_slice(&digest);
    Some(fixed)
}

/// Saved tracker state (kmod/user/src/saved.rs).
pub fn saved_tracker(data: &[u8]) {
    with_fixed(data, fix_trailing_sha, |data| {
        let Ok(saved) = SavedTracker::decode(data, Path::new("fuzz-input")) else {
            return;
        };
        assert_eq!(saved.encode(), data, "saved state round trip");
        assert!(saved.table.iter().all(|&b| u64::from(b) <= saved.sequence));
        let blocks = (saved.device_sectors * 512).div_ceil(u64::from(saved.block_size));
        assert_eq!(blocks, saved.table.len() as u64);
    });
}

// ---- standby protocol frames ----------------------------------------------------------

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Frames of the standby protocol (replicate/src/standby/protocol.rs) read from the input
/// as from a connection, each body parsed the way the server or client parses it.
pub fn standby_frames(data: &[u8]) {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rt = slot.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("tokio runtime")
        });
        rt.block_on(frames(data));
    });
}

async fn frames(data: &[u8]) {
    let t = Duration::from_secs(60);
    let mut input = data;
    let mut index_offset = 0;
    while let Ok(frame) = p::read_frame(&mut input, t).await {
        assert!(frame.body.len() <= frame.kind.max_body() as usize);
        // Written back, the frame reads the same.
        let mut wire = Vec::new();
        p::write_frame(&mut wire, frame.kind, &[&frame.body], t)
            .await
            .expect("a frame read is a frame that can be written");
        let back = p::read_frame(&mut wire.as_slice(), t)
            .await
            .expect("round trip");
        assert_eq!((back.kind, &back.body), (frame.kind, &frame.body));
        let body = &frame.body;
        match frame.kind {
            Kind::Hello => {
                let _ = frame.json::<p::Hello>();
            }
            Kind::Welcome => {
                let _ = frame.json::<p::Welcome>();
            }
            Kind::Error => {
                let _ = frame.expect(Kind::Bye);
            }
            Kind::Begin => {
                let _ = frame.json::<p::Begin>();
            }
            Kind::Plan => {
                let _ = frame.json::<p::Plan>();
            }
            Kind::BatchOk => {
                let _ = frame.json::<p::BatchOk>();
            }
            Kind::Committed => {
                let _ = frame.json::<p::Committed>();
            }
            Kind::Listing => {
                let _ = frame.json::<p::Listing>();
            }
            Kind::Query => {
                if let Ok(ds) = p::unpack_digests(body) {
                    assert_eq!(p::pack_digests(&ds), *body);
                }
            }
            Kind::Chunk => {
                if let Ok(d) = p::digest_at(body, 0) {
                    let _ = chunk::plain_len(&body[32..], &d);
                }
            }
            Kind::ChunkData => {
                if let Ok(h) = ChunkHeader::parse(body) {
                    let _ = chunk::plain_len(body, &h.digest);
                }
            }
            Kind::IndexPart => {
                if body.len() >= 40 {
                    let _ = p::digest_at(body, 0).expect("40 bytes hold a digest");
                }
            }
            Kind::IndexEnd | Kind::GetChunk => {
                let _ = p::digest_at(body, 0);
            }
            Kind::Commit | Kind::ManifestData => {
                let _ = Manifest::decode(body);
            }
            Kind::PruneRecordData => {
                let _ = PruneRecord::decode(body);
            }
            Kind::GetManifest | Kind::GetPruneRecord => {
                if let Ok(id) = p::parse_id(body) {
                    assert_eq!(id.as_bytes(), &body[..]);
                }
            }
            Kind::GetIndex => {
                if let Ok((id, offset)) = p::parse_get_index(body) {
                    assert_eq!(p::get_index(&id, offset)[..], body[..]);
                    index_offset = offset;
                }
            }
            Kind::IndexData => {
                if let Ok((total, part)) = p::parse_index_data(body, index_offset) {
                    assert!(index_offset <= total);
                    assert!(part.len() as u64 <= total - index_offset);
                    index_offset += part.len() as u64;
                }
            }
            Kind::Protection | Kind::ConfigData => {
                // Decoded, the config and slots are hex: encoding them again gives the body.
                if let Ok(msg) = frame.json::<p::RepoProtection>() {
                    if let Ok((config, slots)) = msg.decode() {
                        let again = p::RepoProtection::new(&config, &slots);
                        assert_eq!(again.config, msg.config.to_ascii_lowercase());
                        let _ = parse_config(&config, "fuzz", "fuzz config", true);
                    }
                }
            }
            Kind::Lacks
            | Kind::BatchEnd
            | Kind::IndexOk
            | Kind::Bye
            | Kind::List
            | Kind::NotFound
            | Kind::ProtectionOk
            | Kind::GetConfig => {}
        }
    }
}

// ---- volumes: partition tables and filesystems ----------------------------------------

/// Largest volume a sparse input describes.
pub const SPARSE_MAX_SECTORS: u32 = 1 << 21;

/// A volume described by a sparse input:
///
/// ```text
/// u32 LE   volume size in 512-byte sectors (at most SPARSE_MAX_SECTORS); bit 31 set:
///          4096-byte logical sectors (partition tables)
/// then any number of segments:
/// u32 LE   byte offset / 512
/// u16 LE   length n
/// n bytes  written there (clipped to the volume; a short last segment is kept)
/// ```
///
/// Everything not written is zero. [`sparse_encode`] makes such an input from an image.
pub struct SparseVolume {
    pub region: Region,
    pub sector: u32,
}

impl SparseVolume {
    pub fn parse(data: &[u8]) -> Option<SparseVolume> {
        let head = u32::from_le_bytes(data.get(..4)?.try_into().ok()?);
        let sector = if head & 0x8000_0000 != 0 { 4096 } else { 512 };
        let len = u64::from((head & 0x7fff_ffff).min(SPARSE_MAX_SECTORS)) * 512;
        let file = memfile(len);
        let mut rest = &data[4..];
        while rest.len() >= 6 {
            let at = u64::from(u32::from_le_bytes(rest[..4].try_into().ok()?)) * 512;
            let n = usize::from(u16::from_le_bytes(rest[4..6].try_into().ok()?));
            let bytes = &rest[6..(6 + n).min(rest.len())];
            rest = &rest[6 + bytes.len()..];
            if at < len {
                let keep = bytes.len().min((len - at) as usize);
                file.write_all_at(&bytes[..keep], at)
                    .expect("writing a memfd");
            }
        }
        Some(SparseVolume {
            region: Region::new(Arc::new(file), 0, len),
            sector,
        })
    }
}

/// A sparse input for `image`: every 512-byte sector that is not all zero, runs of them
/// joined into segments of up to 32 KiB.
pub fn sparse_encode(image: &[u8], sector_4k: bool) -> Vec<u8> {
    let sectors = (image.len() as u64)
        .div_ceil(512)
        .min(u64::from(SPARSE_MAX_SECTORS)) as u32;
    let mut out = (sectors | if sector_4k { 0x8000_0000 } else { 0 })
        .to_le_bytes()
        .to_vec();
    let mut s = 0usize;
    let total = sectors as usize;
    while s < total {
        let sec = |i: usize| &image[i * 512..((i + 1) * 512).min(image.len())];
        if sec(s).iter().all(|&b| b == 0) {
            s += 1;
            continue;
        }
        let mut e = s + 1;
        while e < total && e - s < 64 && sec(e).iter().any(|&b| b != 0) {
            e += 1;
        }
        let bytes = &image[s * 512..(e * 512).min(image.len())];
        out.extend_from_slice(&(s as u32).to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
        s = e;
    }
    out
}

/// Partition tables, GPT and msdos with logical partitions (capture/src/table.rs).
pub fn partition_table(data: &[u8]) {
    let Some(vol) = SparseVolume::parse(data) else {
        return;
    };
    let Ok(info) = bkimg_capture::table::read(&vol.region, vol.sector) else {
        return;
    };
    let mut end = 0;
    for e in &info.partitions {
        assert!(e.size > 0, "empty partition {e:?}");
        assert!(e.offset >= end, "partitions overlap or are out of order");
        end = e.offset.checked_add(e.size).expect("partition end");
        assert!(end <= vol.region.len(), "partition {e:?} outside the disk");
    }
}

/// ext2/3/4 detection and used-block maps (capture/src/fs/detect.rs, ext4.rs).
pub fn ext4(data: &[u8]) {
    filesystem(data, FsKind::Ext4);
}

/// XFS detection and used-block maps (capture/src/fs/detect.rs, xfs.rs).
pub fn xfs(data: &[u8]) {
    filesystem(data, FsKind::Xfs);
}

fn filesystem(data: &[u8], kind: FsKind) {
    let Some(vol) = SparseVolume::parse(data) else {
        return;
    };
    let detected = capfs::detect(&vol.region).ok().flatten();
    let family = |k: &FsKind| match kind {
        FsKind::Xfs => *k == FsKind::Xfs,
        _ => matches!(k, FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4),
    };
    let info = match detected {
        Some(info) if family(&info.kind) => info,
        // Not recognised: the map reader still parses the superblock (and refuses it).
        _ => FsInfo {
            kind,
            uuid: None,
            label: None,
            block_size: None,
        },
    };
    let Ok(Some(ranges)) = capfs::used_ranges(&vol.region, &info) else {
        return;
    };
    check_ranges(ranges, vol.region.len());
}

/// The documented shape of a used-block map: ascending, non-empty, non-touching ranges
/// inside the volume; an error ends it.
fn check_ranges(ranges: impl Iterator<Item = std::io::Result<Range<u64>>>, len: u64) {
    let mut prev: Option<Range<u64>> = None;
    for r in ranges {
        let Ok(r) = r else { return };
        assert!(
            r.start < r.end && r.end <= len,
            "range {r:?} of a {len}-byte volume"
        );
        if let Some(p) = &prev {
            assert!(r.start > p.end, "range {r:?} after {p:?}");
        }
        prev = Some(r);
    }
}

/// Reads a whole file (the corpus replay).
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}
