//! Restore points on top of any store: open by location, list, resolve, walk the digest
//! chain, read indexes and chunks with verification, export.

use std::io::{Read, Write};
use std::path::Path;

use crate::chunk;
use crate::digest::Digest;
use crate::error::{FormatError, Result};
use crate::index::{self, EntryReader, IndexHeader};
use crate::keys::Mode;
use crate::manifest::{Manifest, ParentRef};
use crate::protect::ChunkIds;
use crate::record::PruneRecord;
use crate::store::export::{ExportWriter, ObjectKind};
use crate::store::{ExportFile, LocalDir, StoreRead};

pub struct Repository {
    store: Box<dyn StoreRead>,
}

/// Restore points that could be read, and the ids of those that could not with why.
pub type Listing = (Vec<Point>, Vec<(String, FormatError)>);

/// A pruned parent standing at the end of a digest chain: its record, decoded and raw.
#[derive(Clone, Debug)]
pub struct PrunedLink {
    pub record: PruneRecord,
    pub bytes: Vec<u8>,
}

/// A restore point as listed: its manifest and the SHA-256 of the manifest file.
#[derive(Clone, Debug)]
pub struct Point {
    pub manifest: Manifest,
    pub manifest_sha256: Digest,
}

/// A protected repository's objects as stored, for [`Repository::export`]: `raw` is the
/// store under the repository's protection; `config` and `slots` its config and key slots
/// as stored.
pub struct StoredForm<'a> {
    pub raw: &'a dyn StoreRead,
    pub config: &'a [u8],
    pub slots: &'a [(String, Vec<u8>)],
}

impl Repository {
    pub fn new(store: Box<dyn StoreRead>) -> Repository {
        Repository { store }
    }

    /// Opens a local repository directory or an export file.
    pub fn open(location: &Path) -> Result<Repository> {
        if location.is_dir() {
            return Ok(Repository::new(Box::new(LocalDir::open(location)?)));
        }
        if location.is_file() {
            if !ExportFile::looks_like_export(location) {
                return Err(FormatError::NotRepository(format!(
                    "{} is neither a bkimg repository directory nor a bkimg export file",
                    location.display()
                )));
            }
            let export = ExportFile::open(location)?;
            if export.is_protected() {
                return Err(FormatError::unavailable(
                    format!("export file {}", location.display()),
                    "encryption: it holds an encrypted or signed restore point, which this \
                     command cannot read (list, info, verify, restore and export can, with its \
                     key)",
                ));
            }
            return Ok(Repository::new(Box::new(export)));
        }
        Err(FormatError::NotRepository(format!(
            "{} does not exist: name a repository directory or an export file",
            location.display()
        )))
    }

    pub fn store(&self) -> &dyn StoreRead {
        self.store.as_ref()
    }

    pub fn location(&self) -> String {
        self.store.location()
    }

    /// How this repository's chunk ids are computed (keyed when it is encrypted).
    pub fn chunk_ids(&self) -> ChunkIds {
        self.store.chunk_ids()
    }

    /// How this repository protects its objects.
    pub fn protection(&self) -> Mode {
        self.store.protection()
    }

    /// Loads and checks one manifest.
    pub fn point(&self, id: &str) -> Result<Point> {
        let bytes = self.store.read_manifest(id)?;
        let manifest = Manifest::decode(&bytes).map_err(|e| match e {
            FormatError::Corrupt { detail, .. } => {
                FormatError::corrupt(format!("manifest of restore point {id}"), detail)
            }
            FormatError::Unsupported { detail, .. } => {
                FormatError::unsupported(format!("restore point {id}"), detail)
            }
            other => other,
        })?;
        if manifest.id != id {
            return Err(FormatError::corrupt(
                format!("manifest of restore point {id}"),
                format!("it names itself {:?}", manifest.id),
            ));
        }
        Ok(Point {
            manifest,
            manifest_sha256: Digest::of_bytes(&bytes),
        })
    }

    /// All restore points, oldest first. Damaged manifests are returned as errors beside
    /// the good ones so a listing can show both.
    pub fn points(&self) -> Result<Listing> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for id in self.store.list_manifests()? {
            match self.point(&id) {
                Ok(p) => good.push(p),
                Err(e) => bad.push((id, e)),
            }
        }
        // By sequence first (authenticated in a protected repository, §7.8), then time.
        good.sort_by(|a, b| {
            a.manifest
                .sequence
                .unwrap_or(0)
                .cmp(&b.manifest.sequence.unwrap_or(0))
                .then_with(|| {
                    crate::time::point_order(
                        &a.manifest.created,
                        &a.manifest.id,
                        &b.manifest.created,
                        &b.manifest.id,
                    )
                })
        });
        Ok((good, bad))
    }

    /// Resolves "latest", a full id, or a unique id prefix.
    pub fn resolve(&self, spec: &str) -> Result<Point> {
        let (points, bad) = self.points()?;
        if spec == "latest" {
            // An unreadable manifest may be the newest: refuse rather than pick an older one.
            if let Some((id, e)) = bad.into_iter().next() {
                let note = format!(
                    "; \"latest\" is ambiguous while {id} cannot be read: name a restore point"
                );
                return Err(match e {
                    FormatError::Unsupported { what, detail } => FormatError::Unsupported {
                        what,
                        detail: detail + &note,
                    },
                    FormatError::Corrupt { what, detail } => FormatError::Corrupt {
                        what,
                        detail: detail + &note,
                    },
                    other => other,
                });
            }
            return points.into_iter().next_back().ok_or_else(|| {
                FormatError::missing(format!("any restore point (in {})", self.location()))
            });
        }
        if let Some(p) = points.iter().find(|p| p.manifest.id == spec) {
            return Ok(p.clone());
        }
        let matches: Vec<&Point> = points
            .iter()
            .filter(|p| p.manifest.id.starts_with(spec))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                // A damaged manifest must be reported as damaged, not as missing.
                if self.store.read_manifest(spec).is_ok() {
                    return self.point(spec);
                }
                Err(FormatError::missing(format!("restore point {spec:?}")))
            }
            many => Err(FormatError::NotRepository(format!(
                "{spec:?} matches {} restore points ({}): give more of the id",
                many.len(),
                many.iter()
                    .map(|p| p.manifest.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Walks parent links from `point` up, checking each recorded manifest digest.
    /// Returns the ancestors, nearest first. The walk ends at a full restore point or at
    /// a pruned one (spec/format.md §7.5).
    pub fn ancestors(&self, point: &Point) -> Result<Vec<Point>> {
        Ok(self.chain(point)?.0)
    }

    /// The ancestors, nearest first, and the prune record that ends the chain, if it ends
    /// at a pruned restore point rather than a full one.
    pub fn chain(&self, point: &Point) -> Result<(Vec<Point>, Option<PrunedLink>)> {
        let mut out: Vec<Point> = Vec::new();
        let mut link = point.manifest.parent.clone();
        while let Some(parent) = link {
            if out.len() > 100_000 || out.iter().any(|p| p.manifest.id == parent.id) {
                return Err(FormatError::corrupt(
                    "restore point chain",
                    format!("parent links loop at {}", parent.id),
                ));
            }
            let p = match self.point(&parent.id) {
                Ok(p) => p,
                Err(FormatError::Missing { .. }) => {
                    if let Some(end) = self.pruned_link(&parent)? {
                        return Ok((out, Some(end)));
                    }
                    return Err(FormatError::missing(format!(
                        "parent restore point {} (of {})",
                        parent.id,
                        out.last().map_or(&point.manifest.id, |c| &c.manifest.id)
                    )));
                }
                Err(e) => return Err(e),
            };
            if p.manifest_sha256.to_hex() != parent.manifest_sha256 {
                return Err(FormatError::corrupt(
                    format!("restore point {}", parent.id),
                    "its manifest differs from the one its child recorded (changed or replaced)",
                ));
            }
            link = p.manifest.parent.clone();
            out.push(p);
        }
        Ok((out, None))
    }

    /// The prune record standing for an absent parent, checked against the link to it.
    pub fn pruned_link(&self, link: &ParentRef) -> Result<Option<PrunedLink>> {
        let Some(bytes) = self.store.read_prune_record(&link.id)? else {
            return Ok(None);
        };
        let what = || format!("prune record of {}", link.id);
        let record = PruneRecord::decode(&bytes).map_err(|e| match e {
            FormatError::Corrupt { detail, .. } => FormatError::corrupt(what(), detail),
            FormatError::Unsupported { detail, .. } => FormatError::unsupported(what(), detail),
            other => other,
        })?;
        if record.id != link.id || record.manifest_sha256 != link.manifest_sha256 {
            return Err(FormatError::corrupt(
                what(),
                "it records another manifest than the child's parent link",
            ));
        }
        Ok(Some(PrunedLink { record, bytes }))
    }

    /// Opens a volume index and checks its header against the id it was named by.
    pub fn index(&self, id: &Digest) -> Result<EntryReader<Box<dyn Read + Send>>> {
        let mut input = self.store.open_index(id)?;
        let mut head = [0u8; index::HEADER_LEN];
        input.read_exact(&mut head).map_err(|e| {
            FormatError::corrupt(format!("volume index {id}"), format!("header: {e}"))
        })?;
        let header = IndexHeader::parse(&head).map_err(|e| match e {
            FormatError::Corrupt { detail, .. } => {
                FormatError::corrupt(format!("volume index {id}"), detail)
            }
            other => other,
        })?;
        if header.id() != *id {
            return Err(FormatError::corrupt(
                format!("volume index {id}"),
                "header does not match the index's id",
            ));
        }
        Ok(EntryReader::new(input, header))
    }

    /// Reads, decompresses and checks one chunk. `blob` is scratch space.
    pub fn chunk(&self, digest: &Digest, blob: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<()> {
        self.store.read_chunk(digest, blob)?;
        chunk::decode_into(blob, digest, &self.store.chunk_ids(), out)
    }

    /// Writes `point` and everything it needs as one self-contained export file. Indexes
    /// are complete maps of their volumes, so no ancestor's data is needed; ancestors'
    /// manifests are included so that the digest chain can still be checked.
    pub fn export(
        &self,
        point: &Point,
        stored: Option<StoredForm<'_>>,
        out: impl Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let io = |e| FormatError::io("writing the export file", e);
        let flags = if stored.is_some() {
            crate::store::export::FLAG_PROTECTED
        } else {
            0
        };
        let mut w = ExportWriter::with_flags(out, flags).map_err(io)?;
        // Objects are copied as stored (sealed) and checked through this repository.
        let raw: &dyn StoreRead = stored.as_ref().map_or(self.store.as_ref(), |s| s.raw);
        let (mut blob, mut opened, mut plain, mut batch) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let ids = self.store.chunk_ids();
        for (_, _, index) in point.manifest.indexes() {
            let Some(index) = index else { continue };
            let mut entries = self.index(&index)?;
            while {
                entries.next_batch(4096, &mut batch)?;
                !batch.is_empty()
            } {
                for d in batch.iter().filter(|d| !d.is_hole()) {
                    if w.contains(ObjectKind::Chunk, d) {
                        continue;
                    }
                    raw.read_chunk(d, &mut blob)?;
                    // Check before copying: an export must not carry damage silently.
                    let check = if stored.is_some() {
                        opened.clone_from(&blob);
                        self.store.open_stored_chunk(d, &mut opened)?;
                        &opened
                    } else {
                        &blob
                    };
                    chunk::decode_into(check, d, &ids, &mut plain)?;
                    w.add(ObjectKind::Chunk, *d, &blob).map_err(io)?;
                    progress(plain.len() as u64);
                }
            }
            // Read whole above through this repository, so checked; copied as stored.
            w.add_from(ObjectKind::Index, index, raw.open_index(&index)?)
                .map_err(io)?;
        }
        // The chain is checked (authenticated, when protected) before its stored forms are
        // copied.
        let (ancestors, pruned) = self.chain(point)?;
        for ancestor in ancestors {
            let bytes = raw.read_manifest(&ancestor.manifest.id)?;
            w.add_manifest(ObjectKind::AncestorManifest, &ancestor.manifest.id, &bytes)
                .map_err(io)?;
        }
        if let Some(end) = pruned {
            let bytes = match &stored {
                Some(s) => s.raw.read_prune_record(&end.record.id)?.ok_or_else(|| {
                    FormatError::missing(format!("prune record of {}", end.record.id))
                })?,
                None => end.bytes,
            };
            w.add_manifest(ObjectKind::PruneRecord, &end.record.id, &bytes)
                .map_err(io)?;
        }
        self.point(&point.manifest.id)?;
        let bytes = raw.read_manifest(&point.manifest.id)?;
        w.add_manifest(ObjectKind::Manifest, &point.manifest.id, &bytes)
            .map_err(io)?;
        if let Some(s) = &stored {
            w.add_protection(s.config, s.slots, &point.manifest.id)
                .map_err(io)?;
        }
        w.finish().map_err(io)?;
        Ok(())
    }
}
