//! Generates the test vectors of spec/vectors/ (described in spec/vectors/README.md).
//!
//! ```text
//! cargo run -p bkimg-format --example gen_vectors -- spec/vectors
//! ```
//!
//! Everything is deterministic: plaintexts come from fixed generators, times and ids are
//! fixed strings, and zstd output is stable for one zstd library version and level. Valid
//! vectors are produced with the public API of bkimg-format (the reference writer);
//! damaged ones by editing those bytes, re-sealing (fixing checksums and digests) where a
//! vector must exercise one rule only.

use std::io::Write;
use std::path::{Path, PathBuf};

use bkimg_format::changemap::ChangeMap;
use bkimg_format::chunk::{self, ChunkHeader, Compression};
use bkimg_format::firmware::{BootEntry, Firmware};
use bkimg_format::index;
use bkimg_format::manifest::{
    CompressionInfo, Content, Disk, Filesystem, GptPartition, GptTable, Manifest, MsdosPartition,
    MsdosTable, ParentRef, PartitionTable, Tracking, Volume, VolumeRole,
};
use bkimg_format::record::PruneRecord;
use bkimg_format::repo::Repository;
use bkimg_format::sealed::{self, Features};
use bkimg_format::store::export::{ExportWriter, ObjectKind};
use bkimg_format::store::local::{RepoConfig, CONFIG_KIND};
use bkimg_format::store::{LocalDir, StoreWrite};
use bkimg_format::{magic, Digest};
use serde_json::{json, Value};

const LEVEL: i32 = 3;
const TEXT: &str = "bkimg test vector: the quick brown fox jumps over the lazy dog.\n";
const TAIL_TEXT: &str = "end of the tiny volume; ";
const NOISE_SEED: u32 = 0x1234_5678;
const VOLUME_NOISE_SEED: u32 = 0x9e37_79b9;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors"));
    std::fs::create_dir_all(&out)?;
    let point = tiny_restore_point()?;
    write(&out, "chunks.json", chunks()?)?;
    write(&out, "index.json", indexes(&point))?;
    write(&out, "manifest.json", manifests(&point))?;
    write(&out, "changemap.json", changemaps())?;
    write(&out, "export.json", exports(&point)?)?;
    Ok(())
}

fn write(dir: &Path, name: &str, value: Value) -> Res<()> {
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    std::fs::write(dir.join(name), text)?;
    eprintln!("wrote {}", dir.join(name).display());
    Ok(())
}

fn preamble(what: &str) -> Value {
    json!({
        "vectors": what,
        "format": "bkimg v1 (spec/format.md)",
        "generated_by": format!(
            "bkimg-format {} format/examples/gen_vectors.rs",
            env!("CARGO_PKG_VERSION")
        ),
        "zstd_library_version": zstd::zstd_safe::version_string(),
        "zstd_level": LEVEL,
    })
}

fn merge(mut base: Value, more: Value) -> Value {
    let (Value::Object(b), Value::Object(m)) = (&mut base, more) else {
        unreachable!("objects")
    };
    b.extend(m);
    base
}

// ---------------------------------------------------------------------------------------
// Plaintext generators (also described in spec/vectors/README.md).

/// One segment of generated plaintext.
#[derive(Clone, Copy)]
enum Gen {
    /// `text` repeated and cut to `len` bytes.
    Repeat(&'static str, usize),
    /// `len` zero bytes.
    Zeros(usize),
    /// xorshift32 (x ^= x << 13; x ^= x >> 17; x ^= x << 5) from `seed`; each step
    /// yields the low byte of x.
    Xorshift(u32, usize),
}

impl Gen {
    fn bytes(self) -> Vec<u8> {
        match self {
            Gen::Repeat(text, len) => text.bytes().cycle().take(len).collect(),
            Gen::Zeros(len) => vec![0; len],
            Gen::Xorshift(seed, len) => {
                let mut x = seed;
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect()
            }
        }
    }

    fn describe(self) -> Value {
        match self {
            Gen::Repeat(text, len) => json!({"kind": "repeat", "text": text, "len": len}),
            Gen::Zeros(len) => json!({"kind": "zeros", "len": len}),
            Gen::Xorshift(seed, len) => json!({"kind": "xorshift32", "seed": seed, "len": len}),
        }
    }
}

fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

// ---------------------------------------------------------------------------------------
// chunks.json

fn blob_of(compression: Compression, plain_len: u32, digest: Digest, payload: &[u8]) -> Vec<u8> {
    let h = ChunkHeader {
        compression,
        plain_len,
        stored_len: payload.len() as u32,
        digest,
    };
    let mut blob = h.encode().to_vec();
    blob.extend_from_slice(payload);
    blob
}

fn valid_chunk(name: &str, description: &str, gen: Gen, level: i32, inline: bool) -> Res<Value> {
    let plain = gen.bytes();
    let digest = Digest::of_chunk(&plain);
    let blob = chunk::encode(&plain, digest, level)?;
    let h = ChunkHeader::parse(&blob)?;
    let mut v = json!({
        "name": name,
        "description": description,
        "generator": [gen.describe()],
        "plain_len": plain.len(),
        "digest": digest.to_hex(),
        "compression": h.compression as u8,
        "stored_len": h.stored_len,
        "level": level,
        "reencode": true,
        "blob_hex": hex(&blob),
    });
    if inline {
        v["plaintext_hex"] = json!(hex(&plain));
    }
    Ok(v)
}

fn invalid_chunk(name: &str, description: &str, error: &str, lookup: Digest, blob: &[u8]) -> Value {
    json!({
        "name": name,
        "description": description,
        "error": error,
        "lookup_digest": lookup.to_hex(),
        "blob_hex": hex(blob),
    })
}

fn chunks() -> Res<Value> {
    let text = Gen::Repeat(TEXT, 4096);
    let noise = Gen::Xorshift(NOISE_SEED, 4096);
    let mut valid = vec![
        valid_chunk(
            "text-zstd",
            "4096 bytes of repeated text, zstd level 3: stored compressed (compression 1)",
            text,
            LEVEL,
            true,
        )?,
        valid_chunk(
            "noise-plain",
            "4096 pseudo-random bytes: zstd does not make them smaller, so they are stored \
             as they are (compression 0)",
            noise,
            LEVEL,
            true,
        )?,
        valid_chunk(
            "one-byte",
            "a 1-byte chunk (0x42); zstd output would be larger, so it is stored plain",
            Gen::Repeat("B", 1),
            LEVEL,
            true,
        )?,
        valid_chunk(
            "text-level0",
            "the text of text-zstd written with compression disabled (level 0): a different \
             blob for the same digest, equally valid",
            text,
            0,
            true,
        )?,
        valid_chunk(
            "max-size-text",
            "a chunk of the largest plaintext length, 16 MiB of repeated text (plaintext given \
             by its generator only)",
            Gen::Repeat(TEXT, 16 << 20),
            LEVEL,
            false,
        )?,
    ];
    // A frame another zstd writer could produce: content checksum, no content size.
    let text_plain = text.bytes();
    let text_digest = Digest::of_chunk(&text_plain);
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), LEVEL)?;
    enc.include_checksum(true)?;
    enc.include_contentsize(false)?;
    enc.write_all(&text_plain)?;
    let frame = enc.finish()?;
    let blob = blob_of(Compression::Zstd, 4096, text_digest, &frame);
    valid.push(json!({
        "name": "text-zstd-checksum-frame",
        "description": "the text of text-zstd as a zstd frame with a content checksum and \
                        without the content size: not what this writer produces, but a valid \
                        frame every reader must accept",
        "generator": [text.describe()],
        "plaintext_hex": hex(&text_plain),
        "plain_len": 4096,
        "digest": text_digest.to_hex(),
        "compression": 1,
        "stored_len": frame.len(),
        "level": null,
        "reencode": false,
        "blob_hex": hex(&blob),
    }));

    let zstd_blob = chunk::encode(&text_plain, text_digest, LEVEL)?;
    let noise_plain = noise.bytes();
    let noise_digest = Digest::of_chunk(&noise_plain);
    let plain_blob = chunk::encode(&noise_plain, noise_digest, LEVEL)?;
    assert_eq!(plain_blob[8], 0);
    let edit = |blob: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = blob.to_vec();
        f(&mut b);
        b
    };
    let other_digest = Digest::of_bytes(b"some other chunk");
    let zstd_len = zstd_blob.len();
    let mut invalid = vec![
        invalid_chunk(
            "bad-magic",
            "first byte of the magic number flipped",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b[0] ^= 0x01),
        ),
        invalid_chunk(
            "reserved-byte-9",
            "reserved header byte 9 is not zero",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b[9] = 0x01),
        ),
        invalid_chunk(
            "reserved-byte-20",
            "reserved header byte 20 is not zero",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b[20] = 0x80),
        ),
        invalid_chunk(
            "reserved-byte-63",
            "reserved header byte 63 is not zero",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b[63] = 0x01),
        ),
        invalid_chunk(
            "flipped-plain-len",
            "header byte 12 flipped: plain_len 4097, but the frame decompresses to 4096 bytes",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b[12] ^= 0x01),
        ),
        invalid_chunk(
            "flipped-stored-len",
            "header byte 16 flipped: stored_len no longer matches the blob's length",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b[16] ^= 0x01),
        ),
        invalid_chunk(
            "flipped-header-digest",
            "header byte 24 (first digest byte) flipped: the header names another digest than \
             the one the blob was looked up by",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b[24] ^= 0x01),
        ),
        invalid_chunk(
            "wrong-digest",
            "header digest and lookup digest agree, but the plaintext does not hash to them",
            "corrupt",
            other_digest,
            &edit(&zstd_blob, &|b| b[24..56].copy_from_slice(&other_digest.0)),
        ),
        invalid_chunk(
            "flipped-payload-zstd",
            "one byte in the middle of the zstd payload flipped",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b[64 + (zstd_len - 64) / 2] ^= 0x01),
        ),
        invalid_chunk(
            "flipped-payload-plain",
            "one byte of a plain (compression 0) payload flipped",
            "corrupt",
            noise_digest,
            &edit(&plain_blob, &|b| b[64 + 1000] ^= 0x01),
        ),
        invalid_chunk(
            "truncated-payload",
            "the last payload byte is missing",
            "corrupt",
            text_digest,
            &zstd_blob[..zstd_len - 1],
        ),
        invalid_chunk(
            "truncated-header",
            "only the first 40 bytes of the header",
            "corrupt",
            text_digest,
            &zstd_blob[..40],
        ),
        invalid_chunk("empty", "zero bytes", "corrupt", text_digest, &[]),
        invalid_chunk(
            "trailing-byte",
            "one byte more than header plus stored_len",
            "corrupt",
            text_digest,
            &edit(&zstd_blob, &|b| b.push(0)),
        ),
        invalid_chunk(
            "stored-len-exceeds-plain-len",
            "compression 0, plain_len 4096, stored_len 4097 (and 4097 payload bytes)",
            "corrupt",
            noise_digest,
            &{
                let mut b = edit(&plain_blob, &|b| b.push(0));
                b[16..20].copy_from_slice(&4097u32.to_le_bytes());
                b
            },
        ),
        invalid_chunk(
            "stored-len-exceeds-plain-len-zstd",
            "compression 1, stored_len one more than plain_len (payload padded to match)",
            "corrupt",
            text_digest,
            &{
                let frame = &zstd_blob[64..];
                let mut payload = frame.to_vec();
                payload.resize(4097, 0);
                let mut b = blob_of(Compression::Zstd, 4096, text_digest, &payload);
                b[16..20].copy_from_slice(&4097u32.to_le_bytes());
                b
            },
        ),
        invalid_chunk(
            "plain-stored-len-short",
            "compression 0 with stored_len (4095) less than plain_len (4096)",
            "corrupt",
            noise_digest,
            &{
                let mut b = plain_blob[..plain_blob.len() - 1].to_vec();
                b[16..20].copy_from_slice(&4095u32.to_le_bytes());
                b
            },
        ),
        invalid_chunk(
            "plain-len-zero",
            "plain_len 0 (and stored_len 0)",
            "corrupt",
            text_digest,
            &blob_of(Compression::None, 0, text_digest, &[]),
        ),
        invalid_chunk(
            "plain-len-over-max",
            "plain_len 16 MiB + 1 with a small zstd payload",
            "corrupt",
            text_digest,
            &blob_of(
                Compression::Zstd,
                (16 << 20) + 1,
                text_digest,
                &zstd_blob[64..],
            ),
        ),
        invalid_chunk(
            "unknown-compression-2",
            "compression method 2 (unknown), everything else valid",
            "unsupported",
            text_digest,
            &edit(&zstd_blob, &|b| b[8] = 2),
        ),
        invalid_chunk(
            "unknown-compression-255",
            "compression method 255 (unknown) on a plain payload",
            "unsupported",
            noise_digest,
            &edit(&plain_blob, &|b| b[8] = 255),
        ),
        invalid_chunk(
            "zstd-output-short",
            "a valid zstd frame of the first 4095 bytes of the text, header plain_len 4096",
            "corrupt",
            text_digest,
            &blob_of(
                Compression::Zstd,
                4096,
                text_digest,
                &zstd::bulk::compress(&text_plain[..4095], LEVEL)?,
            ),
        ),
        invalid_chunk(
            "zstd-output-long",
            "a valid zstd frame of 4097 bytes (the text and one more byte), header plain_len \
             4096: a reader must not write past plain_len",
            "corrupt",
            text_digest,
            &blob_of(
                Compression::Zstd,
                4096,
                text_digest,
                &zstd::bulk::compress(&[&text_plain[..], b"x"].concat(), LEVEL)?,
            ),
        ),
        invalid_chunk(
            "zstd-not-a-frame",
            "compression 1 with 100 pseudo-random bytes as payload",
            "corrupt",
            text_digest,
            &blob_of(
                Compression::Zstd,
                4096,
                text_digest,
                &Gen::Xorshift(7, 100).bytes(),
            ),
        ),
        invalid_chunk(
            "hole-digest",
            "4096 zero bytes stored under the reserved all-zero digest: holes have no blob, and \
             no plaintext hashes to all zeros",
            "corrupt",
            Digest::HOLE,
            &blob_of(Compression::None, 4096, Digest::HOLE, &[0; 4096]),
        ),
    ];
    // Sanity: every invalid vector fails and every valid one decodes (the test checks the
    // error classes too).
    for v in &mut invalid {
        let blob = hex::decode(v["blob_hex"].as_str().unwrap())?;
        let d = Digest::from_hex(v["lookup_digest"].as_str().unwrap()).unwrap();
        assert!(
            chunk::decode_into(
                &blob,
                &d,
                &bkimg_format::protect::ChunkIds::Sha256,
                &mut Vec::new()
            )
            .is_err(),
            "{v}"
        );
    }
    Ok(merge(
        preamble("chunk blobs (spec/format.md, Chunk blob)"),
        json!({
            "notes": "Decode each valid blob looked up by its digest: the result must equal the \
                      plaintext (plaintext_hex, or the generator). Re-encoding the plaintext with \
                      the stated level must give blob_hex when reencode is true and the zstd \
                      library version is the one named above. Each invalid blob, looked up by \
                      lookup_digest, must be refused with the stated error class.",
            "valid": valid,
            "invalid": invalid,
        }),
    ))
}

// ---------------------------------------------------------------------------------------
// The tiny restore point shared by index.json, manifest.json and export.json.

struct TinyPoint {
    volume_gens: Vec<Gen>,
    volume: Vec<u8>,
    index_header: index::IndexHeader,
    index_bytes: Vec<u8>,
    entries: Vec<Digest>,
    /// Unique non-hole chunks in volume order, with their blobs.
    blobs: Vec<(Digest, Vec<u8>)>,
    parent: Manifest,
    parent_bytes: Vec<u8>,
    child: Manifest,
    child_bytes: Vec<u8>,
}

const PARENT_ID: &str = "20240102T030405Z-a1b2c3";
const CHILD_ID: &str = "20240103T030405Z-d4e5f6";

fn tiny_restore_point() -> Res<TinyPoint> {
    let chunk_size = 4096u32;
    let volume_gens = vec![
        Gen::Repeat(TEXT, 4096),
        Gen::Zeros(4096),
        Gen::Xorshift(VOLUME_NOISE_SEED, 4096),
        Gen::Zeros(4096),
        Gen::Repeat(TEXT, 4096),
        Gen::Repeat(TAIL_TEXT, 512),
    ];
    let volume: Vec<u8> = volume_gens.iter().flat_map(|g| g.bytes()).collect();
    let mut entries = Vec::new();
    let mut blobs: Vec<(Digest, Vec<u8>)> = Vec::new();
    let mut bytes_data = 0u64;
    for piece in volume.chunks(chunk_size as usize) {
        let d = Digest::of_chunk(piece);
        entries.push(d);
        if !d.is_hole() {
            bytes_data += piece.len() as u64;
            if !blobs.iter().any(|(b, _)| *b == d) {
                blobs.push((d, chunk::encode(piece, d, LEVEL)?));
            }
        }
    }
    let (index_header, index_bytes) = index::encode(volume.len() as u64, chunk_size, &entries);
    let stored: u64 = blobs.iter().map(|(_, b)| b.len() as u64).sum();
    let disk = |content: Content, tracking: Option<Tracking>| Disk {
        name: "disk0".into(),
        source: "/dev/vectors0".into(),
        size: volume.len() as u64,
        logical_sector_size: 512,
        table: PartitionTable::None,
        volumes: vec![Volume {
            name: "whole".into(),
            role: VolumeRole::Whole,
            partition: None,
            offset: 0,
            size: volume.len() as u64,
            filesystem: None,
            content,
        }],
        tracking,
    };
    let parent = Manifest {
        id: PARENT_ID.into(),
        created: "2024-01-02T03:04:05Z".into(),
        host: "vector-host".into(),
        tool: "bkimg 0.1.0".into(),
        parent: None,
        chunk_size,
        compression: CompressionInfo {
            algorithm: "zstd".into(),
            level: LEVEL,
        },
        disks: vec![disk(
            Content::Data {
                index: index_header.id().to_hex(),
                mode: "raw".into(),
                bytes_read: volume.len() as u64,
                bytes_data,
                bytes_stored_new: stored,
            },
            None,
        )],
        firmware: None,
        consistency: None,
        sequence: None,
    };
    let parent_bytes = parent.encode();
    let child = Manifest {
        id: CHILD_ID.into(),
        created: "2024-01-03T03:04:05Z".into(),
        parent: Some(ParentRef {
            id: PARENT_ID.into(),
            manifest_sha256: Digest::of_bytes(&parent_bytes).to_hex(),
        }),
        disks: vec![disk(
            Content::Data {
                index: index_header.id().to_hex(),
                mode: "raw".into(),
                bytes_read: 8192,
                bytes_data: 8192,
                bytes_stored_new: 0,
            },
            Some(Tracking {
                generation: "00112233445566778899aabbccddeeff".into(),
                sequence: 7,
                changed_blocks_run: 0,
            }),
        )],
        ..parent.clone()
    };
    let child_bytes = child.encode();
    Ok(TinyPoint {
        volume_gens,
        volume,
        index_header,
        index_bytes,
        entries,
        blobs,
        parent,
        parent_bytes,
        child,
        child_bytes,
    })
}

// ---------------------------------------------------------------------------------------
// index.json

fn reheader(bytes: &[u8], f: &dyn Fn(&mut [u8])) -> Vec<u8> {
    let mut b = bytes.to_vec();
    f(&mut b[..128]);
    let crc = crc32fast::hash(&b[..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
    b
}

fn index_vector(name: &str, description: &str, bytes: &[u8], entries: &[Digest]) -> Value {
    let h = index::IndexHeader::parse(bytes).expect("valid");
    json!({
        "name": name,
        "description": description,
        "volume_size": h.volume_size,
        "chunk_size": h.chunk_size,
        "entry_count": h.entry_count(),
        "entries_digest": h.entries_digest.to_hex(),
        "header_crc32": format!("{:08x}", u32::from_le_bytes(bytes[124..128].try_into().unwrap())),
        "id": h.id().to_hex(),
        "entries": entries.iter().map(Digest::to_hex).collect::<Vec<_>>(),
        "chunk_lens": (0..h.entry_count()).map(|i| h.chunk_len(i)).collect::<Vec<_>>(),
        "bytes_hex": hex(bytes),
    })
}

fn invalid_index(name: &str, description: &str, error: &str, lookup: &str, bytes: &[u8]) -> Value {
    let lookup = if lookup == "self" {
        Digest::of_bytes(&bytes[..128.min(bytes.len())]).to_hex()
    } else {
        lookup.to_string()
    };
    json!({
        "name": name,
        "description": description,
        "error": error,
        "lookup_id": lookup,
        "bytes_hex": hex(bytes),
    })
}

fn indexes(p: &TinyPoint) -> Value {
    let bytes = &p.index_bytes;
    let id = p.index_header.id().to_hex();
    let (_, holes_bytes) = index::encode(8192, 4096, &[Digest::HOLE; 2]);
    let with_u32 =
        |at: usize, v: u32| move |h: &mut [u8]| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let with_u64 =
        |at: usize, v: u64| move |h: &mut [u8]| h[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let size = p.volume.len() as u64;
    let invalid = vec![
        invalid_index(
            "crc-mismatch",
            "header byte 16 (volume_size) flipped, CRC-32 left as it was",
            "corrupt",
            &id,
            &{
                let mut b = bytes.clone();
                b[16] ^= 0x01;
                b
            },
        ),
        invalid_index(
            "bad-magic",
            "first magic byte flipped (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &|h| h[0] ^= 0x01),
        ),
        invalid_index(
            "version-2",
            "format version 2 (CRC-32 recomputed, looked up by the new header's id)",
            "unsupported",
            "self",
            &reheader(bytes, &with_u32(8, 2)),
        ),
        invalid_index(
            "version-0",
            "format version 0 (CRC-32 recomputed)",
            "unsupported",
            "self",
            &reheader(bytes, &with_u32(8, 0)),
        ),
        invalid_index(
            "flags-nonzero",
            "flags 0x1 (unknown; CRC-32 recomputed)",
            "unsupported",
            "self",
            &reheader(bytes, &with_u32(12, 1)),
        ),
        invalid_index(
            "reserved-28",
            "reserved byte 28 is not zero (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &|h| h[28] = 1),
        ),
        invalid_index(
            "reserved-100",
            "reserved byte 100 is not zero (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &|h| h[100] = 1),
        ),
        invalid_index(
            "chunk-size-not-power-of-two",
            "chunk_size 6144 with the matching entry_count 4 (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &|h| {
                with_u32(24, 6144)(h);
                with_u64(32, size.div_ceil(6144))(h);
            }),
        ),
        invalid_index(
            "chunk-size-too-small",
            "chunk_size 2048 with the matching entry_count (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &|h| {
                with_u32(24, 2048)(h);
                with_u64(32, size.div_ceil(2048))(h);
            }),
        ),
        invalid_index(
            "chunk-size-too-large",
            "chunk_size 32 MiB with the matching entry_count 1 (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &|h| {
                with_u32(24, 32 << 20)(h);
                with_u64(32, 1)(h);
            }),
        ),
        invalid_index(
            "volume-size-zero",
            "volume_size 0 and entry_count 0, header only (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(&bytes[..128], &|h| {
                with_u64(16, 0)(h);
                with_u64(32, 0)(h);
                h[40..72].copy_from_slice(&Digest::of_bytes(&[]).0);
            }),
        ),
        invalid_index(
            "volume-size-too-large",
            "volume_size 2^56 + 4096 with the matching entry_count (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &|h| {
                with_u64(16, (1 << 56) + 4096)(h);
                with_u64(32, ((1u64 << 56) + 4096) / 4096)(h);
            }),
        ),
        invalid_index(
            "entry-count-wrong",
            "entry_count one more than ceil(volume_size / chunk_size) (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &with_u64(32, p.entries.len() as u64 + 1)),
        ),
        invalid_index(
            "entries-digest-wrong",
            "entries_digest replaced by the SHA-256 of nothing (CRC-32 recomputed)",
            "corrupt",
            "self",
            &reheader(bytes, &|h| {
                h[40..72].copy_from_slice(&Digest::of_bytes(&[]).0)
            }),
        ),
        invalid_index(
            "flipped-entry-byte",
            "one byte of entry 2 flipped",
            "corrupt",
            &id,
            &{
                let mut b = bytes.clone();
                b[128 + 2 * 32 + 5] ^= 0x01;
                b
            },
        ),
        invalid_index(
            "truncated-entries",
            "the last entry is 1 byte short",
            "corrupt",
            &id,
            &bytes[..bytes.len() - 1],
        ),
        invalid_index(
            "trailing-byte",
            "one byte after the last entry",
            "corrupt",
            &id,
            &[&bytes[..], &[0]].concat(),
        ),
        invalid_index(
            "truncated-header",
            "only the first 100 bytes",
            "corrupt",
            &id,
            &bytes[..100],
        ),
        invalid_index(
            "id-mismatch",
            "a valid index (the all-holes one) looked up by the id of tiny-volume",
            "corrupt",
            &id,
            &holes_bytes,
        ),
    ];
    merge(
        preamble("volume indexes (spec/format.md, Volume index)"),
        json!({
            "notes": "Read each index as a reader that looks it up by id: the header must parse, \
                      SHA-256 of the 128 header bytes must equal the id, and the entries must \
                      match entries_digest with nothing after them. Re-encoding volume_size, \
                      chunk_size and entries must give bytes_hex. tiny-volume is the volume of \
                      export.json; its plaintext is given as generator segments and hex. Invalid \
                      vectors: read by lookup_id, must fail with the stated class.",
            "volume": {
                "generator": p.volume_gens.iter().map(|g| g.describe()).collect::<Vec<_>>(),
                "sha256": Digest::of_bytes(&p.volume).to_hex(),
                "hex": hex(&p.volume),
            },
            "valid": [
                index_vector(
                    "tiny-volume",
                    "20992-byte volume, 4096-byte chunks: text, hole, noise, hole, the same \
                     text again (same digest), and a 512-byte last chunk",
                    bytes,
                    &p.entries,
                ),
                index_vector(
                    "all-holes",
                    "8192 bytes of zeros: two hole entries",
                    &holes_bytes,
                    &[Digest::HOLE; 2],
                ),
            ],
            "invalid": invalid,
        }),
    )
}

// ---------------------------------------------------------------------------------------
// manifest.json

fn layout_manifest() -> Manifest {
    let fake_index =
        |n: u32| Digest::of_bytes(format!("layout vector index {n}").as_bytes()).to_hex();
    let data = |n: u32, mode: &str, read: u64, data: u64, stored: u64| Content::Data {
        index: fake_index(n),
        mode: mode.into(),
        bytes_read: read,
        bytes_data: data,
        bytes_stored_new: stored,
    };
    let gpt_disk = Disk {
        name: "disk0".into(),
        source: "/dev/nvme0n1".into(),
        size: 1 << 20,
        logical_sector_size: 512,
        table: PartitionTable::Gpt(GptTable {
            disk_guid: "5e2f0a1c-3b4d-4e6f-8a9b-0c1d2e3f4a5b".into(),
            first_usable_lba: 34,
            last_usable_lba: 2014,
            entries_lba: 2,
            entry_count: 128,
            entry_size: 128,
            partitions: vec![
                GptPartition {
                    number: 1,
                    type_guid: "0fc63daf-8483-4772-8e79-3d69d8477de4".into(),
                    unique_guid: "a0b1c2d3-e4f5-4617-8899-aabbccddeeff".into(),
                    first_lba: 40,
                    last_lba: 1063,
                    attributes: 0,
                    name: "root".into(),
                },
                GptPartition {
                    number: 2,
                    type_guid: "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f".into(),
                    unique_guid: "11223344-5566-4778-899a-abbccddeeff0".into(),
                    first_lba: 1064,
                    last_lba: 2014,
                    attributes: 0,
                    name: "swap".into(),
                },
            ],
        }),
        volumes: vec![
            Volume {
                name: "gap0".into(),
                role: VolumeRole::Gap,
                partition: None,
                offset: 0,
                size: 40 * 512,
                filesystem: None,
                content: data(1, "raw", 20480, 16896, 1200),
            },
            Volume {
                name: "p1".into(),
                role: VolumeRole::Partition,
                partition: Some(1),
                offset: 40 * 512,
                size: 1024 * 512,
                filesystem: Some(Filesystem {
                    fs_type: "ext4".into(),
                    uuid: Some("6a1e4f2b-7c3d-4e5f-9a0b-1c2d3e4f5a6b".into()),
                    label: Some("root".into()),
                }),
                content: data(2, "used-blocks", 131072, 126976, 40960),
            },
            Volume {
                name: "p2".into(),
                role: VolumeRole::Partition,
                partition: Some(2),
                offset: 1064 * 512,
                size: 951 * 512,
                filesystem: Some(Filesystem {
                    fs_type: "swap".into(),
                    uuid: Some("d3c2b1a0-9f8e-4d7c-8b6a-5f4e3d2c1b0a".into()),
                    label: Some("swap".into()),
                }),
                content: Content::Swap {
                    uuid: Some("d3c2b1a0-9f8e-4d7c-8b6a-5f4e3d2c1b0a".into()),
                    label: Some("swap".into()),
                    page_size: 4096,
                },
            },
            Volume {
                name: "gap1".into(),
                role: VolumeRole::Gap,
                partition: None,
                offset: 2015 * 512,
                size: 33 * 512,
                filesystem: None,
                content: data(3, "raw", 16896, 16896, 900),
            },
        ],
        tracking: Some(Tracking {
            generation: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
            sequence: 12,
            changed_blocks_run: 0,
        }),
    };
    let msdos_disk = Disk {
        name: "disk1".into(),
        source: "/dev/sdb".into(),
        size: 2 << 20,
        logical_sector_size: 512,
        table: PartitionTable::Msdos(MsdosTable {
            disk_signature: 0x1234_5678,
            partitions: vec![
                MsdosPartition {
                    number: 1,
                    bootable: true,
                    type_id: 0x83,
                    start_lba: 2048,
                    sectors: 1024,
                },
                MsdosPartition {
                    number: 2,
                    bootable: false,
                    type_id: 0x05,
                    start_lba: 3072,
                    sectors: 1024,
                },
                MsdosPartition {
                    number: 5,
                    bootable: false,
                    type_id: 0x83,
                    start_lba: 3074,
                    sectors: 1022,
                },
            ],
        }),
        volumes: vec![
            Volume {
                name: "gap0".into(),
                role: VolumeRole::Gap,
                partition: None,
                offset: 0,
                size: 2048 * 512,
                filesystem: None,
                content: data(4, "raw", 1 << 20, 512, 300),
            },
            Volume {
                name: "p1".into(),
                role: VolumeRole::Partition,
                partition: Some(1),
                offset: 2048 * 512,
                size: 1024 * 512,
                filesystem: None,
                content: data(5, "raw", 524288, 65536, 20000),
            },
            Volume {
                name: "gap1".into(),
                role: VolumeRole::Gap,
                partition: None,
                offset: 3072 * 512,
                size: 2 * 512,
                filesystem: None,
                content: data(6, "raw", 1024, 1024, 120),
            },
            Volume {
                name: "p5".into(),
                role: VolumeRole::Partition,
                partition: Some(5),
                offset: 3074 * 512,
                size: 1022 * 512,
                filesystem: None,
                content: data(7, "raw", 523264, 0, 0),
            },
        ],
        tracking: None,
    };
    Manifest {
        id: "20240104T000000Z-0a0b0c".into(),
        created: "2024-01-04T00:00:00Z".into(),
        host: "vector-host".into(),
        tool: "bkimg 0.1.0".into(),
        parent: None,
        chunk_size: 256 << 10,
        compression: CompressionInfo {
            algorithm: "zstd".into(),
            level: LEVEL,
        },
        disks: vec![gpt_disk, msdos_disk],
        firmware: None,
        consistency: None,
        sequence: None,
    }
}

fn sealed_fields(bytes: &[u8]) -> Value {
    json!({
        "magic": hex(&bytes[..8]),
        "version": u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        "incompat": u32::from_le_bytes(bytes[12..16].try_into().unwrap()),
        "compat": u32::from_le_bytes(bytes[16..20].try_into().unwrap()),
        "body_len": u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
        "body_sha256": hex(&bytes[32..64]),
    })
}

fn valid_manifest(
    name: &str,
    description: &str,
    bytes: &[u8],
    fields: &Manifest,
    reencode: bool,
) -> Value {
    json!({
        "name": name,
        "description": description,
        "reencode": reencode,
        "file_sha256": Digest::of_bytes(bytes).to_hex(),
        "header": sealed_fields(bytes),
        "fields": serde_json::to_value(fields).unwrap(),
        "bytes_hex": hex(bytes),
    })
}

/// A sealed document with an arbitrary header and body, digest and length made right.
fn seal_raw(magic: [u8; 8], version: u32, incompat: u32, compat: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&incompat.to_le_bytes());
    out.extend_from_slice(&compat.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Digest::of_bytes(body).0);
    out.extend_from_slice(body);
    out
}

fn body_with(m: &Manifest, f: &dyn Fn(&mut Value)) -> Vec<u8> {
    let mut v = serde_json::to_value(m).unwrap();
    f(&mut v);
    let mut body = serde_json::to_vec_pretty(&v).unwrap();
    body.push(b'\n');
    body
}

fn invalid_doc(name: &str, description: &str, error: &str, bytes: &[u8]) -> Value {
    json!({
        "name": name,
        "description": description,
        "error": error,
        "bytes_hex": hex(bytes),
    })
}

fn manifests(p: &TinyPoint) -> Value {
    let layout = layout_manifest();
    let layout_bytes = layout.encode();
    let booting = Manifest {
        id: "20240105T000000Z-0d0e0f".into(),
        created: "2024-01-05T00:00:00Z".into(),
        consistency: Some("frozen-snapshot".into()),
        sequence: None,
        firmware: Some(Firmware {
            uefi_boot_entries: vec![
                BootEntry {
                    number: 3,
                    description: "debian".into(),
                    active: true,
                    booted: true,
                    disk: "disk0".into(),
                    partition: 1,
                    partition_guid: "a0b1c2d3-e4f5-4617-8899-aabbccddeeff".into(),
                    path: "\\EFI\\debian\\shimx64.efi".into(),
                    optional_data: None,
                },
                BootEntry {
                    number: 0,
                    description: "debian (fallback)".into(),
                    active: false,
                    booted: false,
                    disk: "disk0".into(),
                    partition: 1,
                    partition_guid: "a0b1c2d3-e4f5-4617-8899-aabbccddeeff".into(),
                    path: "\\EFI\\BOOT\\BOOTX64.EFI".into(),
                    optional_data: Some("2d2d726573637565".into()),
                },
            ],
        }),
        ..layout.clone()
    };
    let booting_bytes = booting.encode();
    let pb = &p.parent_bytes;
    let body = &pb[64..];
    let m = &p.parent;
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = pb.clone();
        f(&mut b);
        b
    };
    let extra = body_with(m, &|v| {
        v["future_field"] = json!({"written by": "a newer bkimg", "n": 1});
        v["disks"][0]["volumes"][0]["future_volume_field"] = json!(true);
    });
    let nulls = body_with(m, &|v| {
        v.as_object_mut().unwrap().remove("parent");
        v["disks"][0]["tracking"] = Value::Null;
        v["disks"][0]["volumes"][0]["filesystem"] = Value::Null;
        v["disks"][0]["volumes"][0]["partition"] = Value::Null;
    });
    let duplicate = {
        let text = String::from_utf8(body.to_vec()).unwrap();
        text.replacen("{\n", "{\n  \"host\": \"first\",\n", 1)
            .into_bytes()
    };
    let mut compact = serde_json::to_vec(m).unwrap();
    compact.push(b'\n');
    let config = RepoConfig {
        repository_id: "0b7ef2a4-1c3d-4e5f-8a9b-c0d1e2f3a4b5".into(),
        created: "2024-01-01T00:00:00Z".into(),
        encryption: None,
    };
    let config_bytes = sealed::seal(&CONFIG_KIND, Features::default(), &config);
    let valid = vec![
        valid_manifest(
            "full",
            "a full restore point of one disk without a partition table (the parent in \
             export.json)",
            pb,
            m,
            true,
        ),
        valid_manifest(
            "incremental",
            "an incremental of \"full\": parent link with the SHA-256 of full's manifest file, \
             and change-tracking state",
            &p.child_bytes,
            &p.child,
            true,
        ),
        valid_manifest(
            "layout",
            "two disks: GPT with a gap, a data partition, a swap partition and the trailing gap; \
             msdos with a primary, an extended container and a logical partition (index ids \
             are placeholders)",
            &layout_bytes,
            &layout,
            true,
        ),
        valid_manifest(
            "uefi-boot-entries",
            "layout's disks with the captured machine's UEFI boot entries (member firmware, \
             compatible feature bit 0x1 set): two entries booting files of disk0's partition \
             1, the first the one the machine booted through, the second inactive with \
             optional data; and consistency \"frozen-snapshot\" (bit 0x2)",
            &booting_bytes,
            &booting,
            true,
        ),
        valid_manifest(
            "compat-bit-and-unknown-fields",
            "full's body with unknown JSON fields added and compatible feature bit 0x80000001 \
             set (members in alphabetical order): a reader must ignore all three",
            &seal_raw(magic::MANIFEST, 1, 0, 0x8000_0001, &extra),
            m,
            false,
        ),
        valid_manifest(
            "compact-json",
            "full's body serialized without whitespace: a reader must not depend on the \
             writer's formatting",
            &seal_raw(magic::MANIFEST, 1, 0, 0, &compact),
            m,
            false,
        ),
        valid_manifest(
            "optional-members-null-or-absent",
            "full's body without \"parent\" and with \"tracking\", \"filesystem\" and \
             \"partition\" set to null: optional members may be absent or null (members in alphabetical order)",
            &seal_raw(magic::MANIFEST, 1, 0, 0, &nulls),
            m,
            false,
        ),
    ];
    let invalid = vec![
        invalid_doc(
            "version-2",
            "format version 2, everything else valid",
            "unsupported",
            &edit(&|b| b[8] = 2),
        ),
        invalid_doc(
            "version-0",
            "format version 0",
            "unsupported",
            &edit(&|b| b[8] = 0),
        ),
        invalid_doc(
            "incompat-bit-0",
            "incompatible feature bit 0x1 set (unknown to this version)",
            "unsupported",
            &edit(&|b| b[12] = 1),
        ),
        invalid_doc(
            "incompat-bit-31",
            "incompatible feature bit 0x80000000 set",
            "unsupported",
            &edit(&|b| b[15] = 0x80),
        ),
        invalid_doc(
            "flipped-body-byte",
            "one byte in the middle of the JSON body flipped",
            "corrupt",
            &edit(&|b| {
                let at = 64 + (b.len() - 64) / 2;
                b[at] ^= 0x01
            }),
        ),
        invalid_doc(
            "flipped-header-digest",
            "first byte of the body digest flipped",
            "corrupt",
            &edit(&|b| b[32] ^= 0x01),
        ),
        invalid_doc(
            "truncated",
            "the final newline is missing (body shorter than body_len)",
            "corrupt",
            &pb[..pb.len() - 1],
        ),
        invalid_doc(
            "trailing-byte",
            "one byte after the body",
            "corrupt",
            &[&pb[..], b"\n"].concat(),
        ),
        invalid_doc(
            "header-only",
            "the 64-byte header alone",
            "corrupt",
            &pb[..64],
        ),
        invalid_doc(
            "short",
            "30 bytes, shorter than the header",
            "corrupt",
            &pb[..30],
        ),
        invalid_doc(
            "bad-magic",
            "a valid repository config where a manifest was expected (other magic number)",
            "corrupt",
            &config_bytes,
        ),
        invalid_doc(
            "reserved-nonzero",
            "reserved header byte 20 is 1",
            "corrupt",
            &edit(&|b| b[20] = 1),
        ),
        invalid_doc(
            "body-len-over-max",
            "body_len 16 MiB + 1 (the body itself unchanged)",
            "corrupt",
            &edit(&|b| b[24..32].copy_from_slice(&((16u64 << 20) + 1).to_le_bytes())),
        ),
        invalid_doc(
            "not-json",
            "a correctly sealed body that is not JSON",
            "corrupt",
            &seal_raw(magic::MANIFEST, 1, 0, 0, b"{not json\n"),
        ),
        invalid_doc(
            "not-utf8",
            "a correctly sealed body with a byte that is not UTF-8 inside a string",
            "corrupt",
            &seal_raw(magic::MANIFEST, 1, 0, 0, &{
                let mut b = body.to_vec();
                let at = b.windows(11).position(|w| w == b"vector-host").unwrap();
                b[at] = 0xff;
                b
            }),
        ),
        invalid_doc(
            "missing-field",
            "a correctly sealed body without the required field \"disks\"",
            "corrupt",
            &seal_raw(
                magic::MANIFEST,
                1,
                0,
                0,
                &body_with(m, &|v| {
                    v.as_object_mut().unwrap().remove("disks");
                }),
            ),
        ),
        invalid_doc(
            "duplicate-member",
            "a correctly sealed body in which the member \"host\" appears twice",
            "corrupt",
            &seal_raw(magic::MANIFEST, 1, 0, 0, &duplicate),
        ),
        invalid_doc(
            "wrong-type",
            "a correctly sealed body whose chunk_size is a string",
            "corrupt",
            &seal_raw(
                magic::MANIFEST,
                1,
                0,
                0,
                &body_with(m, &|v| v["chunk_size"] = json!("4096")),
            ),
        ),
        invalid_doc(
            "invalid-id",
            "a correctly sealed body whose id is \"../x\" (ids are file names)",
            "corrupt",
            &seal_raw(
                magic::MANIFEST,
                1,
                0,
                0,
                &body_with(m, &|v| v["id"] = json!("../x")),
            ),
        ),
        invalid_doc(
            "invalid-created",
            "a correctly sealed body whose capture time is February 30th (not a date)",
            "corrupt",
            &seal_raw(
                magic::MANIFEST,
                1,
                0,
                0,
                &body_with(m, &|v| v["created"] = json!("2024-02-30T03:04:05Z")),
            ),
        ),
        invalid_doc(
            "empty-id",
            "a correctly sealed body whose id is empty",
            "corrupt",
            &seal_raw(
                magic::MANIFEST,
                1,
                0,
                0,
                &body_with(m, &|v| v["id"] = json!("")),
            ),
        ),
        invalid_doc(
            "unknown-content-kind",
            "a correctly sealed body with a volume content of kind \"lvm\" (new kinds need an \
             incompatible feature bit)",
            "corrupt",
            &seal_raw(
                magic::MANIFEST,
                1,
                0,
                0,
                &body_with(m, &|v| {
                    v["disks"][0]["volumes"][0]["content"]["kind"] = json!("lvm")
                }),
            ),
        ),
        invalid_doc(
            "unknown-table-kind",
            "a correctly sealed body with a partition table of kind \"apm\"",
            "corrupt",
            &seal_raw(
                magic::MANIFEST,
                1,
                0,
                0,
                &body_with(m, &|v| v["disks"][0]["table"] = json!({"kind": "apm"})),
            ),
        ),
    ];
    for v in &invalid {
        let b = hex::decode(v["bytes_hex"].as_str().unwrap()).unwrap();
        assert!(Manifest::decode(&b).is_err(), "{v}");
    }
    merge(
        preamble("sealed documents: manifests and the repository config (spec/format.md)"),
        json!({
            "notes": "Decode each valid manifest: the parsed document must equal fields (as JSON; \
                      absent optional fields are omitted, parent is null when there is none); \
                      re-encoding fields must give bytes_hex when reencode is true. file_sha256 \
                      is what a child's parent.manifest_sha256 records. Invalid vectors must be \
                      refused with the stated class.",
            "valid": valid,
            "invalid": invalid,
            "repository_config": {
                "description": "the config file of a local repository",
                "header": sealed_fields(&config_bytes),
                "fields": serde_json::to_value(&config).unwrap(),
                "bytes_hex": hex(&config_bytes),
            },
            "prune_records": prune_records(p),
        }),
    )
}

/// Prune records (spec §7.5): the record standing for the full point once it is pruned,
/// which the incremental's parent link must match, and damaged variants.
fn prune_records(p: &TinyPoint) -> Value {
    let record = PruneRecord {
        id: p.parent.id.clone(),
        manifest_sha256: Digest::of_bytes(&p.parent_bytes).to_hex(),
        pruned: "2026-11-21T12:00:00Z".into(),
    };
    let bytes = record.encode();
    let body_of = |f: &dyn Fn(&mut Value)| {
        let mut v = serde_json::to_value(&record).unwrap();
        f(&mut v);
        let mut body = serde_json::to_vec_pretty(&v).unwrap();
        body.push(b'\n');
        body
    };
    let m = magic::PRUNE_RECORD;
    let invalid = vec![
        invalid_doc(
            "wrong-magic",
            "a manifest's magic on a prune record body",
            "corrupt",
            &seal_raw(magic::MANIFEST, 1, 0, 0, &bytes[64..]),
        ),
        invalid_doc(
            "version-2",
            "version 2: written by a newer bkimg",
            "unsupported",
            &seal_raw(m, 2, 0, 0, &bytes[64..]),
        ),
        invalid_doc(
            "bad-id",
            "id \"../x\" is not a valid id (digest and length made right)",
            "corrupt",
            &seal_raw(m, 1, 0, 0, &body_of(&|v| v["id"] = json!("../x"))),
        ),
        invalid_doc(
            "bad-digest",
            "manifest_sha256 is not 64 hex digits (digest and length made right)",
            "corrupt",
            &seal_raw(
                m,
                1,
                0,
                0,
                &body_of(&|v| v["manifest_sha256"] = json!("abc")),
            ),
        ),
        invalid_doc(
            "body-flipped",
            "one byte of the body changed: the body digest no longer matches",
            "corrupt",
            &{
                let mut b = bytes.clone();
                let at = b.len() - 4;
                b[at] ^= 1;
                b
            },
        ),
    ];
    for v in &invalid {
        let b = hex::decode(v["bytes_hex"].as_str().unwrap()).unwrap();
        assert!(PruneRecord::decode(&b).is_err(), "{v}");
    }
    json!({
        "notes": "A valid record must decode to fields and re-encode to bytes_hex; its id and \
                  manifest_sha256 equal the parent link of the valid manifest \"incremental\", \
                  so a reader walking that chain with the full manifest absent and this \
                  record present ends the walk here (spec §7.3). Invalid ones must be \
                  refused with the stated class.",
        "valid": [{
            "name": "pruned-full",
            "description": "the record for the full point, as a prune that removed it stores",
            "header": sealed_fields(&bytes),
            "fields": serde_json::to_value(&record).unwrap(),
            "bytes_hex": hex(&bytes),
        }],
        "invalid": invalid,
    })
}

// ---------------------------------------------------------------------------------------
// changemap.json

fn map_vector(name: &str, description: &str, map: &ChangeMap) -> Value {
    let bytes = map.encode();
    ChangeMap::decode(&bytes).expect("valid");
    json!({
        "name": name,
        "description": description,
        "block_size": map.block_size,
        "device_size": map.device_size,
        "generation": map.generation_hex(),
        "from_sequence": map.from_sequence,
        "to_sequence": map.to_sequence,
        "ranges": map.ranges.iter().map(|&(f, c)| json!([f, c])).collect::<Vec<_>>(),
        "byte_ranges": map.byte_ranges().map(|r| json!([r.start, r.end])).collect::<Vec<_>>(),
        "bytes_hex": hex(&bytes),
    })
}

/// Re-computes the trailer digest after an edit.
fn reseal_map(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - 32;
    let d = Digest::of_bytes(&b[..n]);
    b[n..].copy_from_slice(&d.0);
    b
}

fn changemaps() -> Value {
    let base = ChangeMap {
        block_size: 4096,
        device_size: 10 * 4096 + 512,
        generation: core::array::from_fn(|i| i as u8),
        from_sequence: 6,
        to_sequence: 7,
        ranges: vec![(0, 2), (5, 1), (9, 2)],
    };
    let bytes = base.encode();
    let with = |f: &dyn Fn(&mut ChangeMap)| {
        let mut m = base.clone();
        f(&mut m);
        m.encode()
    };
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        b
    };
    let valid = vec![
        map_vector(
            "three-ranges",
            "4096-byte blocks on a 41472-byte device (the last block is partial); the last \
             range covers it and its byte range is clipped to the device",
            &base,
        ),
        map_vector(
            "no-changes",
            "nothing changed between snapshots 7 and 8",
            &ChangeMap {
                from_sequence: 7,
                to_sequence: 8,
                ranges: vec![],
                ..base.clone()
            },
        ),
        map_vector(
            "adjacent-ranges",
            "ranges that touch without overlapping are allowed; 512-byte blocks",
            &ChangeMap {
                block_size: 512,
                device_size: 1 << 20,
                ranges: vec![(0, 8), (8, 8), (2047, 1)],
                ..base.clone()
            },
        ),
    ];
    let invalid = vec![
        invalid_doc(
            "overlapping-ranges",
            "ranges (0,5) and (4,1) overlap (digest recomputed)",
            "corrupt",
            &with(&|m| m.ranges = vec![(0, 5), (4, 1)]),
        ),
        invalid_doc(
            "unsorted-ranges",
            "ranges not in ascending order (digest recomputed)",
            "corrupt",
            &with(&|m| m.ranges = vec![(5, 1), (0, 2)]),
        ),
        invalid_doc(
            "empty-range",
            "a range of 0 blocks (digest recomputed)",
            "corrupt",
            &with(&|m| m.ranges = vec![(0, 2), (5, 0)]),
        ),
        invalid_doc(
            "range-beyond-device",
            "a range ending after the device's last block (digest recomputed)",
            "corrupt",
            &with(&|m| m.ranges = vec![(9, 3)]),
        ),
        invalid_doc(
            "range-overflow",
            "first block 2^64-1 with 2 blocks: the end overflows (digest recomputed)",
            "corrupt",
            &with(&|m| m.ranges = vec![(u64::MAX, 2)]),
        ),
        invalid_doc(
            "block-size-256",
            "block size 256, below the minimum 512 (digest recomputed)",
            "corrupt",
            &with(&|m| m.block_size = 256),
        ),
        invalid_doc(
            "block-size-not-power-of-two",
            "block size 3072 (digest recomputed)",
            "corrupt",
            &with(&|m| m.block_size = 3072),
        ),
        invalid_doc(
            "sequence-backwards",
            "from_sequence 8 after to_sequence 7 (digest recomputed)",
            "corrupt",
            &with(&|m| m.from_sequence = 8),
        ),
        invalid_doc(
            "flipped-range-byte",
            "one byte of the second range flipped",
            "corrupt",
            &edit(&|b| b[128 + 16] ^= 0x01),
        ),
        invalid_doc(
            "flipped-trailer-byte",
            "one byte of the trailing SHA-256 flipped",
            "corrupt",
            &edit(&|b| {
                let n = b.len();
                b[n - 1] ^= 0x01
            }),
        ),
        invalid_doc(
            "flipped-generation-byte",
            "one byte of the generation flipped",
            "corrupt",
            &edit(&|b| b[40] ^= 0x01),
        ),
        invalid_doc(
            "truncated",
            "the last 16 bytes are missing",
            "corrupt",
            &bytes[..bytes.len() - 16],
        ),
        invalid_doc(
            "trailing-byte",
            "one byte after the trailer",
            "corrupt",
            &[&bytes[..], &[0]].concat(),
        ),
        invalid_doc("too-short", "100 bytes", "corrupt", &bytes[..100]),
        invalid_doc(
            "bad-magic",
            "first magic byte flipped (digest recomputed)",
            "corrupt",
            &reseal_map(edit(&|b| b[0] ^= 0x01)),
        ),
        invalid_doc(
            "version-2",
            "format version 2 (digest recomputed)",
            "unsupported",
            &reseal_map(edit(&|b| b[8] = 2)),
        ),
        invalid_doc(
            "flags-nonzero",
            "flags 0x1 (digest recomputed)",
            "unsupported",
            &reseal_map(edit(&|b| b[12] = 1)),
        ),
        invalid_doc(
            "reserved-20",
            "reserved byte 20 is not zero (digest recomputed)",
            "corrupt",
            &reseal_map(edit(&|b| b[20] = 1)),
        ),
        invalid_doc(
            "reserved-100",
            "reserved byte 100 is not zero (digest recomputed)",
            "corrupt",
            &reseal_map(edit(&|b| b[100] = 1)),
        ),
        invalid_doc(
            "range-count-over-limit",
            "range_count 2^28 + 1 in a file of header and trailer only",
            "corrupt",
            &{
                let mut b = ChangeMap {
                    ranges: vec![],
                    ..base.clone()
                }
                .encode();
                b[64..72].copy_from_slice(&((1u64 << 28) + 1).to_le_bytes());
                reseal_map(b)
            },
        ),
    ];
    for v in &invalid {
        let b = hex::decode(v["bytes_hex"].as_str().unwrap()).unwrap();
        assert!(ChangeMap::decode(&b).is_err(), "{v}");
    }
    merge(
        preamble("change maps (spec/format.md, Change map)"),
        json!({
            "notes": "Decode each valid map: fields must match, byte_ranges are the ranges in \
                      bytes clipped to device_size, and re-encoding must give bytes_hex. Invalid \
                      maps must be refused with the stated class.",
            "valid": valid,
            "invalid": invalid,
        }),
    )
}

// ---------------------------------------------------------------------------------------
// export.json

#[derive(Clone, Copy)]
struct DirEntry {
    kind: u8,
    key: [u8; 32],
    offset: u64,
    len: u64,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn directory(bytes: &[u8]) -> (u64, Vec<DirEntry>) {
    let tail = &bytes[bytes.len() - 64..];
    let (off, count) = (u64_at(tail, 16), u64_at(tail, 24));
    let entries = (0..count)
        .map(|i| {
            let e = &bytes[(off + i * 56) as usize..(off + i * 56 + 56) as usize];
            DirEntry {
                kind: e[0],
                key: e[8..40].try_into().unwrap(),
                offset: u64_at(e, 40),
                len: u64_at(e, 48),
            }
        })
        .collect();
    (off, entries)
}

fn kind_of(k: u8) -> ObjectKind {
    match k {
        1 => ObjectKind::Chunk,
        2 => ObjectKind::Index,
        3 => ObjectKind::Manifest,
        _ => ObjectKind::AncestorManifest,
    }
}

/// Rewrites an export with the objects of `bytes`, in file order, except those `skip`s.
fn rebuild(bytes: &[u8], skip: &dyn Fn(&DirEntry) -> bool) -> Vec<u8> {
    let (_, mut entries) = directory(bytes);
    entries.sort_by_key(|e| e.offset);
    let mut w = ExportWriter::new(Vec::new()).unwrap();
    for e in entries.iter().filter(|e| !skip(e)) {
        let obj = &bytes[e.offset as usize..(e.offset + e.len) as usize];
        w.add(kind_of(e.kind), Digest(e.key), obj).unwrap();
    }
    w.finish().unwrap()
}

fn fix_dir_digest(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len();
    let off = u64_at(&b[n - 64..], 16) as usize;
    let d = Digest::of_bytes(&b[off..n - 64]);
    b[n - 32..].copy_from_slice(&d.0);
    b
}

fn exports(p: &TinyPoint) -> Res<Value> {
    let dir = tempfile::tempdir()?;
    let store = LocalDir::open_or_create(dir.path(), "vectors", "2024-01-01T00:00:00Z")?;
    for (d, blob) in &p.blobs {
        store.put_chunk(d, blob)?;
    }
    let (mut f, path) = store.scratch_file()?;
    f.write_all(&p.index_bytes)?;
    drop(f);
    store.put_index(&p.index_header.id(), &path)?;
    store.commit_manifest(PARENT_ID, &p.parent_bytes)?;
    store.commit_manifest(CHILD_ID, &p.child_bytes)?;
    let repo = Repository::new(Box::new(LocalDir::open(dir.path())?));
    let point = repo.point(CHILD_ID)?;
    let mut bytes = Vec::new();
    repo.export(&point, None, &mut bytes, &mut |_| {})?;
    assert_eq!(
        rebuild(&bytes, &|_| false),
        bytes,
        "export rebuilds identically"
    );

    let (dir_offset, entries) = directory(&bytes);
    let n = bytes.len();
    let kinds = ["", "chunk", "index", "manifest", "ancestor-manifest"];
    let objects: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "kind": e.kind,
                "kind_name": kinds[e.kind as usize],
                "key": hex(&e.key),
                "offset": e.offset,
                "len": e.len,
            })
        })
        .collect();
    let find = |kind: u8| *entries.iter().find(|e| e.kind == kind).unwrap();
    let noise_key = Digest::of_chunk(&Gen::Xorshift(VOLUME_NOISE_SEED, 4096).bytes());
    let noise = *entries.iter().find(|e| e.key == noise_key.0).unwrap();
    let index = find(2);
    let ancestor = find(4);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        b
    };
    let entry_at = |i: usize| dir_offset as usize + i * 56;
    let replaced_ancestor = {
        let mut m = p.parent.clone();
        m.host = "vector-hosu".into();
        let mb = m.encode();
        assert_eq!(mb.len() as u64, ancestor.len);
        edit(&|b| {
            b[ancestor.offset as usize..(ancestor.offset + ancestor.len) as usize]
                .copy_from_slice(&mb)
        })
    };
    let invalid =
        vec![
        invalid_doc("truncated", "the last byte is missing", "corrupt", &bytes[..n - 1]),
        invalid_doc("too-short", "100 bytes", "corrupt", &bytes[..100]),
        invalid_doc(
            "bad-head-magic",
            "first header magic byte flipped",
            "corrupt",
            &edit(&|b| b[0] ^= 0x01),
        ),
        invalid_doc(
            "bad-trailer-magic",
            "first trailer magic byte flipped",
            "corrupt",
            &edit(&|b| b[n - 64] ^= 0x01),
        ),
        invalid_doc(
            "header-version-2",
            "header version 2",
            "unsupported",
            &edit(&|b| b[8] = 2),
        ),
        invalid_doc(
            "header-flags",
            "header flags 0x2 (0x1 is a protected export, section 10.3)",
            "unsupported",
            &edit(&|b| b[12] = 2),
        ),
        invalid_doc(
            "flags-differ",
            "header flags 0x1 (protected), trailer flags 0",
            "corrupt",
            &edit(&|b| b[12] = 1),
        ),
        invalid_doc(
            "trailer-version-2",
            "trailer version 2",
            "unsupported",
            &edit(&|b| b[n - 56] = 2),
        ),
        invalid_doc(
            "trailer-flags",
            "trailer flags 0x2",
            "unsupported",
            &edit(&|b| b[n - 52] = 2),
        ),
        invalid_doc(
            "directory-offset-wrong",
            "directory offset in the trailer one too large",
            "corrupt",
            &edit(&|b| {
                let v = u64_at(&b[n - 64..], 16) + 1;
                b[n - 48..n - 40].copy_from_slice(&v.to_le_bytes())
            }),
        ),
        invalid_doc(
            "entry-count-wrong",
            "entry count in the trailer one too small",
            "corrupt",
            &edit(&|b| {
                let v = u64_at(&b[n - 64..], 24) - 1;
                b[n - 40..n - 32].copy_from_slice(&v.to_le_bytes())
            }),
        ),
        invalid_doc(
            "flipped-directory-byte",
            "one byte of the first entry's key flipped",
            "corrupt",
            &edit(&|b| b[entry_at(0) + 20] ^= 0x01),
        ),
        invalid_doc(
            "flipped-directory-digest",
            "first byte of the directory digest flipped",
            "corrupt",
            &edit(&|b| b[n - 32] ^= 0x01),
        ),
        invalid_doc(
            "directory-unsorted",
            "the first two entries swapped (directory digest recomputed)",
            "corrupt",
            &fix_dir_digest(edit(&|b| {
                let (a, c) = (entry_at(0), entry_at(1));
                let first: Vec<u8> = b[a..a + 56].to_vec();
                b.copy_within(c..c + 56, a);
                b[c..c + 56].copy_from_slice(&first);
            })),
        ),
        invalid_doc(
            "directory-duplicate",
            "the second entry replaced by a copy of the first (directory digest recomputed)",
            "corrupt",
            &fix_dir_digest(edit(&|b| b.copy_within(entry_at(0)..entry_at(0) + 56, entry_at(1)))),
        ),
        invalid_doc(
            "entry-beyond-objects",
            "the first entry's length reaches into the directory (directory digest recomputed)",
            "corrupt",
            &fix_dir_digest(edit(&|b| {
                let at = entry_at(0);
                let off = u64_at(b, at + 40);
                b[at + 48..at + 56].copy_from_slice(&(dir_offset - off + 1).to_le_bytes());
            })),
        ),
        invalid_doc(
            "entry-in-header",
            "the first entry's offset points into the 64-byte header (directory digest \
             recomputed)",
            "corrupt",
            &fix_dir_digest(edit(&|b| {
                let at = entry_at(0);
                b[at + 40..at + 48].copy_from_slice(&8u64.to_le_bytes());
            })),
        ),
        invalid_doc(
            "unknown-kind",
            "the last entry's kind changed to 5 (directory digest recomputed)",
            "corrupt",
            &fix_dir_digest(edit(&|b| b[entry_at(entries.len() - 1)] = 5)),
        ),
        invalid_doc(
            "entry-reserved-nonzero",
            "reserved byte 1 of the first entry is not zero (directory digest recomputed)",
            "corrupt",
            &fix_dir_digest(edit(&|b| b[entry_at(0) + 1] = 1)),
        ),
        invalid_doc(
            "flipped-chunk-byte",
            "one payload byte of the noise chunk flipped: the file opens, reading the chunk fails",
            "corrupt",
            &edit(&|b| b[noise.offset as usize + 64 + 100] ^= 0x01),
        ),
        invalid_doc(
            "flipped-index-entry-byte",
            "one byte of an entry of the volume index flipped",
            "corrupt",
            &edit(&|b| b[index.offset as usize + 128 + 3] ^= 0x01),
        ),
        invalid_doc(
            "flipped-index-header-byte",
            "one byte of the volume index's header flipped",
            "corrupt",
            &edit(&|b| b[index.offset as usize + 17] ^= 0x01),
        ),
        invalid_doc(
            "flipped-manifest-byte",
            "one body byte of the restore point's manifest flipped",
            "corrupt",
            &edit(&|b| b[find(3).offset as usize + 100] ^= 0x01),
        ),
        invalid_doc(
            "ancestor-replaced",
            "the ancestor's manifest replaced by a validly sealed manifest with another host \
             name: the parent digest chain breaks",
            "corrupt",
            &replaced_ancestor,
        ),
        invalid_doc(
            "missing-chunk",
            "a valid export file without the noise chunk",
            "missing",
            &rebuild(&bytes, &|e| e.key == noise_key.0),
        ),
        invalid_doc(
            "missing-index",
            "a valid export file without the volume index",
            "missing",
            &rebuild(&bytes, &|e| e.kind == 2),
        ),
        invalid_doc(
            "missing-ancestor",
            "a valid export file without the ancestor's manifest",
            "missing",
            &rebuild(&bytes, &|e| e.kind == 4),
        ),
    ];
    Ok(merge(
        preamble("export files (spec/format.md, Export file)"),
        json!({
            "notes": "Open each file and verify every restore point it lists (spec/format.md, \
                      Verifying a restore point): open (header, trailer, directory), list the \
                      kind-3 manifests, check each one and its ancestor chain, read each index \
                      and every chunk. The valid file must give the listed restore point, its \
                      ancestors and volume contents (volume_sha256 is that of index.json's \
                      tiny-volume). Invalid files must fail with the stated class, wherever in \
                      that procedure the failure is found.",
            "valid": [{
                "name": "tiny-incremental",
                "description": "the export of manifest.json's \"incremental\" restore point: its \
                                chunks, its index, its manifest (kind 3) and its parent's \
                                manifest (kind 4)",
                "points": [CHILD_ID],
                "ancestors": [PARENT_ID],
                "volumes": [{
                    "disk": "disk0",
                    "volume": "whole",
                    "index": p.index_header.id().to_hex(),
                    "volume_sha256": Digest::of_bytes(&p.volume).to_hex(),
                }],
                "directory_offset": dir_offset,
                "entry_count": entries.len(),
                "directory_sha256": hex(&bytes[n - 32..]),
                "objects": objects,
                "bytes_hex": hex(&bytes),
            }],
            "invalid": invalid,
        }),
    ))
}
