//! The reference implementation against the test vectors of spec/vectors/ (see
//! spec/vectors/README.md): valid vectors decode to the stated values and re-encode to the
//! same bytes, damaged ones are refused with the stated error class.

use std::io::Write;
use std::path::{Path, PathBuf};

use bkimg_format::changemap::ChangeMap;
use bkimg_format::chunk::{self, ChunkHeader};
use bkimg_format::index::{self, EntryReader, IndexHeader};
use bkimg_format::manifest::{Content, Manifest, KIND as MANIFEST_KIND};
use bkimg_format::record::PruneRecord;
use bkimg_format::repo::Repository;
use bkimg_format::sealed;
use bkimg_format::store::export::{ExportWriter, ObjectKind};
use bkimg_format::store::local::{RepoConfig, CONFIG_KIND};
use bkimg_format::store::{ExportFile, LocalDir, StoreMaintain, StoreWrite};
use bkimg_format::{Digest, FormatError};
use serde_json::Value;

fn vectors(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../spec/vectors")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("valid hex")
}

fn digest(v: &Value) -> Digest {
    Digest::from_hex(v.as_str().expect("hex string")).expect("64 hex digits")
}

fn name(v: &Value) -> &str {
    v["name"].as_str().expect("name")
}

fn list(v: &Value) -> &Vec<Value> {
    v.as_array().expect("array")
}

/// The error class a vector names.
fn class(e: &FormatError) -> &'static str {
    match e {
        FormatError::Corrupt { .. } => "corrupt",
        FormatError::Unsupported { .. } | FormatError::Unavailable { .. } => "unsupported",
        FormatError::Missing { .. } => "missing",
        FormatError::NotRepository(_) => "not-repository",
        FormatError::Busy(_) => "busy",
        FormatError::Denied(_) => "denied",
        FormatError::Io { .. } => "io",
    }
}

fn expect_class<T: std::fmt::Debug>(v: &Value, got: Result<T, FormatError>) {
    let want = v["error"].as_str().expect("error class");
    match got {
        Ok(x) => panic!("{}: accepted ({x:?}), expected {want}", name(v)),
        Err(e) => assert_eq!(class(&e), want, "{}: wrong error class: {e}", name(v)),
    }
}

/// Plaintext from generator segments (spec/vectors/README.md).
fn generate(segments: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    for s in list(segments) {
        let len = s["len"].as_u64().expect("len") as usize;
        match s["kind"].as_str().expect("kind") {
            "repeat" => out.extend(s["text"].as_str().expect("text").bytes().cycle().take(len)),
            "zeros" => out.resize(out.len() + len, 0),
            "xorshift32" => {
                let mut x = s["seed"].as_u64().expect("seed") as u32;
                out.extend((0..len).map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                }));
            }
            other => panic!("unknown generator {other}"),
        }
    }
    out
}

/// An empty local repository to put single objects into.
fn scratch_repo() -> (tempfile::TempDir, LocalDir, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDir::open_or_create(dir.path(), "vectors", "2024-01-01T00:00:00Z").unwrap();
    let repo = Repository::new(Box::new(LocalDir::open(dir.path()).unwrap()));
    (dir, store, repo)
}

#[test]
fn chunk_vectors() {
    let file = vectors("chunks.json");
    let same_zstd =
        file["zstd_library_version"].as_str() == Some(zstd::zstd_safe::version_string());
    let (_dir, store, repo) = scratch_repo();
    let (mut blob_buf, mut out) = (Vec::new(), Vec::new());
    for v in list(&file["valid"]) {
        let blob = unhex(&v["blob_hex"]);
        let d = digest(&v["digest"]);
        let plain = generate(&v["generator"]);
        if let Some(h) = v.get("plaintext_hex") {
            assert_eq!(
                unhex(h),
                plain,
                "{}: generator and plaintext_hex differ",
                name(v)
            );
        }
        assert_eq!(
            plain.len() as u64,
            v["plain_len"].as_u64().unwrap(),
            "{}",
            name(v)
        );
        assert_eq!(Digest::of_chunk(&plain), d, "{}: digest", name(v));

        let h = ChunkHeader::parse(&blob).unwrap();
        assert_eq!(
            h.compression as u64,
            v["compression"].as_u64().unwrap(),
            "{}",
            name(v)
        );
        assert_eq!(
            u64::from(h.stored_len),
            v["stored_len"].as_u64().unwrap(),
            "{}",
            name(v)
        );
        assert_eq!(
            u64::from(h.plain_len),
            v["plain_len"].as_u64().unwrap(),
            "{}",
            name(v)
        );
        assert_eq!(h.digest, d, "{}", name(v));

        chunk::decode_into(
            &blob,
            &d,
            &bkimg_format::protect::ChunkIds::Sha256,
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", name(v)));
        assert!(out == plain, "{}: decoded plaintext differs", name(v));

        std::fs::write(store.chunk_path(&d), &blob).unwrap();
        repo.chunk(&d, &mut blob_buf, &mut out).unwrap();
        assert!(
            out == plain,
            "{}: plaintext read from a repository differs",
            name(v)
        );

        if v["reencode"].as_bool().unwrap() {
            let level = v["level"].as_i64().unwrap() as i32;
            let again = chunk::encode(&plain, d, level).unwrap();
            if same_zstd || h.compression == chunk::Compression::None {
                assert!(again == blob, "{}: re-encoding differs", name(v));
            } else {
                // Another zstd version may compress differently: the result must still be a
                // valid blob of the same plaintext.
                chunk::decode_into(
                    &again,
                    &d,
                    &bkimg_format::protect::ChunkIds::Sha256,
                    &mut out,
                )
                .unwrap();
                assert!(out == plain, "{}", name(v));
                eprintln!("{}: zstd version differs, byte comparison skipped", name(v));
            }
        }
    }
    for v in list(&file["invalid"]) {
        let blob = unhex(&v["blob_hex"]);
        let d = digest(&v["lookup_digest"]);
        expect_class(
            v,
            chunk::decode_into(
                &blob,
                &d,
                &bkimg_format::protect::ChunkIds::Sha256,
                &mut out,
            ),
        );
        std::fs::write(store.chunk_path(&d), &blob).unwrap();
        expect_class(v, repo.chunk(&d, &mut blob_buf, &mut out));
    }
}

/// Reads an index the way a restore does: by id, header first, then every entry.
fn read_index(repo: &Repository, id: &Digest) -> Result<(IndexHeader, Vec<Digest>), FormatError> {
    let entries = repo.index(id)?;
    let header = *entries.header();
    Ok((header, entries.read_all()?))
}

#[test]
fn index_vectors() {
    let file = vectors("index.json");
    let volume = unhex(&file["volume"]["hex"]);
    assert_eq!(generate(&file["volume"]["generator"]), volume);
    assert_eq!(Digest::of_bytes(&volume), digest(&file["volume"]["sha256"]));
    let (_dir, store, repo) = scratch_repo();
    for v in list(&file["valid"]) {
        let bytes = unhex(&v["bytes_hex"]);
        let id = digest(&v["id"]);
        assert_eq!(
            Digest::of_bytes(&bytes[..index::HEADER_LEN]),
            id,
            "{}: id",
            name(v)
        );
        std::fs::write(store.index_path(&id), &bytes).unwrap();
        let (h, entries) = read_index(&repo, &id).unwrap_or_else(|e| panic!("{}: {e}", name(v)));
        assert_eq!(h.volume_size, v["volume_size"].as_u64().unwrap());
        assert_eq!(u64::from(h.chunk_size), v["chunk_size"].as_u64().unwrap());
        assert_eq!(h.entry_count(), v["entry_count"].as_u64().unwrap());
        assert_eq!(h.entries_digest, digest(&v["entries_digest"]));
        assert_eq!(
            format!(
                "{:08x}",
                u32::from_le_bytes(bytes[124..128].try_into().unwrap())
            ),
            v["header_crc32"].as_str().unwrap()
        );
        let want: Vec<Digest> = list(&v["entries"]).iter().map(digest).collect();
        assert_eq!(entries, want, "{}: entries", name(v));
        let lens: Vec<u64> = (0..h.entry_count())
            .map(|i| u64::from(h.chunk_len(i)))
            .collect();
        let want_lens: Vec<u64> = list(&v["chunk_lens"])
            .iter()
            .map(|l| l.as_u64().unwrap())
            .collect();
        assert_eq!(lens, want_lens, "{}: chunk lengths", name(v));
        let (h2, again) = index::encode(h.volume_size, h.chunk_size, &entries);
        assert_eq!(h2, h);
        assert!(again == bytes, "{}: re-encoding differs", name(v));
    }
    // tiny-volume's entries are the digests of the volume's chunks.
    let tiny = &list(&file["valid"])[0];
    let cs = tiny["chunk_size"].as_u64().unwrap() as usize;
    let chunk_digests: Vec<String> = volume
        .chunks(cs)
        .map(|c| Digest::of_chunk(c).to_hex())
        .collect();
    let entries: Vec<String> = list(&tiny["entries"])
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    assert_eq!(chunk_digests, entries);

    for v in list(&file["invalid"]) {
        let bytes = unhex(&v["bytes_hex"]);
        let id = digest(&v["lookup_id"]);
        std::fs::write(store.index_path(&id), &bytes).unwrap();
        expect_class(v, read_index(&repo, &id));
        // The same through the codec alone, as a reader without a repository would.
        let direct = IndexHeader::parse(&bytes).and_then(|h| {
            if Digest::of_bytes(&bytes[..index::HEADER_LEN]) != id {
                return Err(FormatError::corrupt("index", "id mismatch"));
            }
            EntryReader::new(&bytes[index::HEADER_LEN..], h).read_all()
        });
        expect_class(v, direct);
    }
}

fn check_sealed_header(v: &Value, bytes: &[u8]) {
    let h = &v["header"];
    assert_eq!(hex::encode(&bytes[..8]), h["magic"].as_str().unwrap());
    let u32_at = |at: usize| u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()));
    assert_eq!(u32_at(8), h["version"].as_u64().unwrap());
    assert_eq!(u32_at(12), h["incompat"].as_u64().unwrap());
    assert_eq!(u32_at(16), h["compat"].as_u64().unwrap());
    assert_eq!(
        u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
        h["body_len"].as_u64().unwrap()
    );
    assert_eq!(
        hex::encode(&bytes[32..64]),
        h["body_sha256"].as_str().unwrap()
    );
    assert_eq!(bytes.len() as u64, 64 + h["body_len"].as_u64().unwrap());
}

#[test]
fn manifest_vectors() {
    let file = vectors("manifest.json");
    for v in list(&file["valid"]) {
        let bytes = unhex(&v["bytes_hex"]);
        check_sealed_header(v, &bytes);
        assert_eq!(Digest::of_bytes(&bytes), digest(&v["file_sha256"]));
        let m = Manifest::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", name(v)));
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            v["fields"],
            "{}: fields",
            name(v)
        );
        let (_, features): (Manifest, _) = sealed::open(&MANIFEST_KIND, &bytes).unwrap();
        assert_eq!(
            u64::from(features.compat),
            v["header"]["compat"].as_u64().unwrap()
        );
        if v["reencode"].as_bool().unwrap() {
            let from_fields: Manifest = serde_json::from_value(v["fields"].clone()).unwrap();
            assert!(
                from_fields.encode() == bytes,
                "{}: re-encoding differs",
                name(v)
            );
        }
    }
    // The digest chain: the incremental records the full manifest's file digest.
    let by_name = |n: &str| list(&file["valid"]).iter().find(|v| name(v) == n).unwrap();
    assert_eq!(
        by_name("incremental")["fields"]["parent"]["manifest_sha256"],
        by_name("full")["file_sha256"]
    );
    for v in list(&file["invalid"]) {
        expect_class(v, Manifest::decode(&unhex(&v["bytes_hex"])));
    }

    let c = &file["repository_config"];
    let bytes = unhex(&c["bytes_hex"]);
    check_sealed_header(c, &bytes);
    let (config, _): (RepoConfig, _) = sealed::open(&CONFIG_KIND, &bytes).unwrap();
    assert_eq!(
        config.repository_id,
        c["fields"]["repository_id"].as_str().unwrap()
    );
    assert_eq!(config.created, c["fields"]["created"].as_str().unwrap());
    assert!(sealed::seal(&CONFIG_KIND, Default::default(), &config) == bytes);
}

#[test]
fn prune_record_vectors() {
    let file = vectors("manifest.json");
    let records = &file["prune_records"];
    let by_name = |n: &str| list(&file["valid"]).iter().find(|v| name(v) == n).unwrap();
    let incremental = by_name("incremental");
    let v = &list(&records["valid"])[0];
    let bytes = unhex(&v["bytes_hex"]);
    check_sealed_header(v, &bytes);
    let record = PruneRecord::decode(&bytes).unwrap();
    assert_eq!(serde_json::to_value(&record).unwrap(), v["fields"]);
    assert!(record.encode() == bytes, "re-encoding differs");
    assert_eq!(
        record.id,
        incremental["fields"]["parent"]["id"].as_str().unwrap()
    );
    assert_eq!(
        record.manifest_sha256,
        incremental["fields"]["parent"]["manifest_sha256"]
            .as_str()
            .unwrap()
    );
    for v in list(&records["invalid"]) {
        expect_class(v, PruneRecord::decode(&unhex(&v["bytes_hex"])));
    }

    // The chain walk: the incremental alone is missing its parent; with the record it ends
    // there; with a record for another manifest it is corrupt.
    let child_bytes = unhex(&incremental["bytes_hex"]);
    let child_id = incremental["fields"]["id"].as_str().unwrap();
    let walk = |record: Option<&[u8]>| {
        let (_dir, store, repo) = scratch_repo();
        store.commit_manifest(child_id, &child_bytes).unwrap();
        if let Some(r) = record {
            store.put_prune_record(&record_id(r), r).unwrap();
        }
        let point = repo.point(child_id).unwrap();
        repo.chain(&point)
            .map(|(ancestors, end)| (ancestors.len(), end.is_some()))
    };
    fn record_id(bytes: &[u8]) -> String {
        PruneRecord::decode(bytes).unwrap().id
    }
    assert!(matches!(walk(None), Err(FormatError::Missing { .. })));
    assert_eq!(walk(Some(&bytes)).unwrap(), (0, true));
    let other = PruneRecord {
        manifest_sha256: Digest::of_bytes(b"another manifest").to_hex(),
        ..record.clone()
    }
    .encode();
    assert!(matches!(
        walk(Some(&other)),
        Err(FormatError::Corrupt { .. })
    ));
}

#[test]
fn changemap_vectors() {
    let file = vectors("changemap.json");
    for v in list(&file["valid"]) {
        let bytes = unhex(&v["bytes_hex"]);
        let m = ChangeMap::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", name(v)));
        assert_eq!(u64::from(m.block_size), v["block_size"].as_u64().unwrap());
        assert_eq!(m.device_size, v["device_size"].as_u64().unwrap());
        assert_eq!(m.generation_hex(), v["generation"].as_str().unwrap());
        assert_eq!(m.from_sequence, v["from_sequence"].as_u64().unwrap());
        assert_eq!(m.to_sequence, v["to_sequence"].as_u64().unwrap());
        let pairs = |x: &Value| -> Vec<(u64, u64)> {
            list(x)
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
                .collect()
        };
        assert_eq!(m.ranges, pairs(&v["ranges"]), "{}", name(v));
        let bytes_ranges: Vec<(u64, u64)> = m.byte_ranges().map(|r| (r.start, r.end)).collect();
        assert_eq!(bytes_ranges, pairs(&v["byte_ranges"]), "{}", name(v));
        assert!(m.encode() == bytes, "{}: re-encoding differs", name(v));
    }
    for v in list(&file["invalid"]) {
        expect_class(v, ChangeMap::decode(&unhex(&v["bytes_hex"])));
    }
}

/// What verifying every restore point of an export file found.
#[derive(Debug, PartialEq)]
struct Verified {
    points: Vec<String>,
    ancestors: Vec<String>,
    /// (disk, volume, index, SHA-256 of the volume's content).
    volumes: Vec<(String, String, String, String)>,
}

/// spec/format.md "Verifying a restore point", applied to every restore point of a file.
fn verify_export(path: &Path) -> Result<Verified, FormatError> {
    let repo = Repository::new(Box::new(ExportFile::open(path)?));
    let mut found = Verified {
        points: repo.store().list_manifests()?,
        ancestors: Vec::new(),
        volumes: Vec::new(),
    };
    let (mut blob, mut plain) = (Vec::new(), Vec::new());
    for id in found.points.clone() {
        let point = repo.point(&id)?;
        for a in repo.ancestors(&point)? {
            found.ancestors.push(a.manifest.id);
        }
        for disk in &point.manifest.disks {
            for volume in &disk.volumes {
                let Content::Data { index, .. } = &volume.content else {
                    continue;
                };
                let index_id = Digest::from_hex(index)
                    .ok_or_else(|| FormatError::corrupt("manifest", "bad index id"))?;
                let entries = repo.index(&index_id)?;
                let h = *entries.header();
                if h.volume_size != volume.size || h.chunk_size != point.manifest.chunk_size {
                    return Err(FormatError::corrupt("index", "does not fit the manifest"));
                }
                let mut content = Vec::new();
                for (i, d) in entries.read_all()?.into_iter().enumerate() {
                    let len = h.chunk_len(i as u64) as usize;
                    if d.is_hole() {
                        content.resize(content.len() + len, 0);
                        continue;
                    }
                    repo.chunk(&d, &mut blob, &mut plain)?;
                    if plain.len() != len {
                        return Err(FormatError::corrupt("chunk", "wrong length"));
                    }
                    content.extend_from_slice(&plain);
                }
                found.volumes.push((
                    disk.name.clone(),
                    volume.name.clone(),
                    index.clone(),
                    Digest::of_bytes(&content).to_hex(),
                ));
            }
        }
    }
    Ok(found)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn export_vectors() {
    let file = vectors("export.json");
    let manifests = vectors("manifest.json");
    let index_file = vectors("index.json");
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("vector.bkimg");
    let write = |bytes: &[u8]| {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
    };
    for v in list(&file["valid"]) {
        let bytes = unhex(&v["bytes_hex"]);
        write(&bytes);
        let got = verify_export(&path).unwrap_or_else(|e| panic!("{}: {e}", name(v)));
        let strings = |x: &Value| -> Vec<String> {
            list(x)
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        let want = Verified {
            points: strings(&v["points"]),
            ancestors: strings(&v["ancestors"]),
            volumes: list(&v["volumes"])
                .iter()
                .map(|x| {
                    let s = |k: &str| x[k].as_str().unwrap().to_string();
                    (s("disk"), s("volume"), s("index"), s("volume_sha256"))
                })
                .collect(),
        };
        assert_eq!(got, want, "{}", name(v));
        assert_eq!(
            want.volumes[0].3,
            index_file["volume"]["sha256"].as_str().unwrap(),
            "export and index vectors describe the same volume"
        );

        // The directory as listed, and the same file written again by the writer.
        let n = bytes.len();
        let tail = &bytes[n - 64..];
        assert_eq!(u64_at(tail, 16), v["directory_offset"].as_u64().unwrap());
        assert_eq!(u64_at(tail, 24), v["entry_count"].as_u64().unwrap());
        assert_eq!(
            hex::encode(&tail[32..]),
            v["directory_sha256"].as_str().unwrap()
        );
        let mut objects: Vec<&Value> = list(&v["objects"]).iter().collect();
        for (i, o) in objects.iter().enumerate() {
            let e = &bytes[(u64_at(tail, 16) as usize) + i * 56..][..56];
            assert_eq!(u64::from(e[0]), o["kind"].as_u64().unwrap());
            assert_eq!(hex::encode(&e[8..40]), o["key"].as_str().unwrap());
            assert_eq!(u64_at(e, 40), o["offset"].as_u64().unwrap());
            assert_eq!(u64_at(e, 48), o["len"].as_u64().unwrap());
        }
        objects.sort_by_key(|o| o["offset"].as_u64().unwrap());
        let mut w = ExportWriter::new(Vec::new()).unwrap();
        for o in objects {
            let kind = match o["kind"].as_u64().unwrap() {
                1 => ObjectKind::Chunk,
                2 => ObjectKind::Index,
                3 => ObjectKind::Manifest,
                _ => ObjectKind::AncestorManifest,
            };
            let (off, len) = (
                o["offset"].as_u64().unwrap() as usize,
                o["len"].as_u64().unwrap() as usize,
            );
            let obj = &bytes[off..off + len];
            // Objects are the same bytes as in the other vector files.
            match kind {
                ObjectKind::Index => assert_eq!(
                    hex::encode(obj),
                    list(&index_file["valid"])[0]["bytes_hex"].as_str().unwrap()
                ),
                ObjectKind::Manifest | ObjectKind::AncestorManifest => {
                    let key = o["key"].as_str().unwrap();
                    assert!(list(&manifests["valid"]).iter().any(|m| {
                        m["bytes_hex"].as_str().unwrap() == hex::encode(obj)
                            && Digest::of_bytes(m["fields"]["id"].as_str().unwrap().as_bytes())
                                .to_hex()
                                == key
                    }));
                }
                // The vectors hold no pruned chains and no protected export.
                ObjectKind::Chunk
                | ObjectKind::PruneRecord
                | ObjectKind::Config
                | ObjectKind::KeySlot
                | ObjectKind::PointId => {}
            }
            w.add(kind, digest(&o["key"]), obj).unwrap();
        }
        assert!(
            w.finish().unwrap() == bytes,
            "{}: re-encoding differs",
            name(v)
        );
    }
    for v in list(&file["invalid"]) {
        write(&unhex(&v["bytes_hex"]));
        expect_class(v, verify_export(&path));
    }
}
