//! Where objects live. A store holds three kinds of object: chunk blobs and volume
//! indexes, named by digest, and manifests, named by restore-point id. Readers see a
//! [`StoreRead`]; capture writes through a [`StoreWrite`].

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::Result;
use crate::keys::Mode;
use crate::protect::ChunkIds;

pub mod export;
pub mod local;
pub mod names;
pub mod protected;

pub use export::ExportFile;
pub use local::LocalDir;
pub use protected::Protected;

pub trait StoreRead: Send + Sync {
    /// For messages: where this store is.
    fn location(&self) -> String;
    /// Ids of the restore points that can be restored from this store.
    fn list_manifests(&self) -> Result<Vec<String>>;
    /// Raw manifest bytes of a restore point (or of an ancestor kept for the digest chain).
    fn read_manifest(&self, id: &str) -> Result<Vec<u8>>;
    /// The whole index object, read sequentially.
    fn open_index(&self, id: &Digest) -> Result<Box<dyn Read + Send>>;
    /// The raw blob of a chunk, into `out`.
    fn read_chunk(&self, digest: &Digest, out: &mut Vec<u8>) -> Result<()>;
    /// Whether a complete blob for `digest` is stored.
    fn has_chunk(&self, digest: &Digest) -> Result<bool>;
    /// [`has_chunk`](StoreRead::has_chunk) for each of `digests`, in order. Stores that
    /// answer over a network override it to ask for many at once.
    fn has_chunks(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        digests.iter().map(|d| self.has_chunk(d)).collect()
    }
    /// The length of a chunk as stored (sealed, in an encrypted repository), when the store
    /// can tell without reading it; `None` if it cannot or the chunk is not stored.
    fn stored_chunk_len(&self, _digest: &Digest) -> Result<Option<u64>> {
        Ok(None)
    }
    /// The prune record of restore point `id` (spec/format.md §7.5), if the store has one.
    fn read_prune_record(&self, id: &str) -> Result<Option<Vec<u8>>>;
    /// How chunk ids are computed: keyed in an encrypted repository (spec/format.md §18.3).
    fn chunk_ids(&self) -> ChunkIds {
        ChunkIds::Sha256
    }
    /// How the repository protects its objects (spec/format.md §18.1).
    fn protection(&self) -> Mode {
        Mode::None
    }
    /// Turns a chunk as another store holds it (sealed in an encrypted repository) into
    /// its blob, in place: for copying objects between stores as they are stored.
    fn open_stored_chunk(&self, _digest: &Digest, _stored: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
}

pub trait StoreWrite: StoreRead {
    /// Stores a chunk blob under its digest (callers check `has_chunk` first).
    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<()>;
    /// A new empty scratch file for building an index.
    fn scratch_file(&self) -> Result<(File, PathBuf)>;
    /// Moves a finished index from a scratch file into the store.
    fn put_index(&self, id: &Digest, scratch: &Path) -> Result<()>;
    /// Makes everything written so far durable, then writes the manifest: the commit point
    /// of a restore point. Refuses to replace an existing manifest.
    fn commit_manifest(&self, id: &str, bytes: &[u8]) -> Result<()>;
}

/// Called with each batch of (chunk digest, stored size) a listing yields.
pub type ChunkBatchFn<'a> = dyn FnMut(&[(Digest, u64)]) -> Result<()> + 'a;

/// What pruning needs beyond writing: listing and deleting. Deleting an object that is
/// already gone is not an error (a prune interrupted and run again).
pub trait StoreMaintain: StoreWrite {
    /// Ids of every stored volume index.
    fn list_indexes(&self) -> Result<Vec<Digest>>;
    /// Every stored chunk with its stored size, a batch at a time (memory stays bounded).
    fn scan_chunks(&self, each: &mut ChunkBatchFn<'_>) -> Result<()>;
    /// Ids of every stored prune record.
    fn list_prune_records(&self) -> Result<Vec<String>>;
    /// Stores a prune record; durable when this returns.
    fn put_prune_record(&self, id: &str, bytes: &[u8]) -> Result<()>;
    fn delete_manifest(&self, id: &str) -> Result<()>;
    fn delete_index(&self, id: &Digest) -> Result<()>;
    fn delete_chunks(&self, digests: &[Digest]) -> Result<()>;
    fn delete_prune_record(&self, id: &str) -> Result<()>;
}

/// A shared store (e.g. one opened with an exclusive lock) read through a [`Repository`]
/// while the same handle deletes.
///
/// [`Repository`]: crate::repo::Repository
impl<T: StoreRead + ?Sized> StoreRead for std::sync::Arc<T> {
    fn location(&self) -> String {
        (**self).location()
    }
    fn list_manifests(&self) -> Result<Vec<String>> {
        (**self).list_manifests()
    }
    fn read_manifest(&self, id: &str) -> Result<Vec<u8>> {
        (**self).read_manifest(id)
    }
    fn open_index(&self, id: &Digest) -> Result<Box<dyn Read + Send>> {
        (**self).open_index(id)
    }
    fn read_chunk(&self, digest: &Digest, out: &mut Vec<u8>) -> Result<()> {
        (**self).read_chunk(digest, out)
    }
    fn has_chunk(&self, digest: &Digest) -> Result<bool> {
        (**self).has_chunk(digest)
    }
    fn has_chunks(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        (**self).has_chunks(digests)
    }
    fn stored_chunk_len(&self, digest: &Digest) -> Result<Option<u64>> {
        (**self).stored_chunk_len(digest)
    }
    fn read_prune_record(&self, id: &str) -> Result<Option<Vec<u8>>> {
        (**self).read_prune_record(id)
    }
    fn chunk_ids(&self) -> ChunkIds {
        (**self).chunk_ids()
    }
    fn protection(&self) -> Mode {
        (**self).protection()
    }
    fn open_stored_chunk(&self, digest: &Digest, stored: &mut Vec<u8>) -> Result<()> {
        (**self).open_stored_chunk(digest, stored)
    }
}

impl<T: StoreWrite + ?Sized> StoreWrite for std::sync::Arc<T> {
    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<()> {
        (**self).put_chunk(digest, blob)
    }
    fn scratch_file(&self) -> Result<(File, PathBuf)> {
        (**self).scratch_file()
    }
    fn put_index(&self, id: &Digest, scratch: &Path) -> Result<()> {
        (**self).put_index(id, scratch)
    }
    fn commit_manifest(&self, id: &str, bytes: &[u8]) -> Result<()> {
        (**self).commit_manifest(id, bytes)
    }
}

impl<T: StoreMaintain + ?Sized> StoreMaintain for std::sync::Arc<T> {
    fn list_indexes(&self) -> Result<Vec<Digest>> {
        (**self).list_indexes()
    }
    fn scan_chunks(&self, each: &mut ChunkBatchFn<'_>) -> Result<()> {
        (**self).scan_chunks(each)
    }
    fn list_prune_records(&self) -> Result<Vec<String>> {
        (**self).list_prune_records()
    }
    fn put_prune_record(&self, id: &str, bytes: &[u8]) -> Result<()> {
        (**self).put_prune_record(id, bytes)
    }
    fn delete_manifest(&self, id: &str) -> Result<()> {
        (**self).delete_manifest(id)
    }
    fn delete_index(&self, id: &Digest) -> Result<()> {
        (**self).delete_index(id)
    }
    fn delete_chunks(&self, digests: &[Digest]) -> Result<()> {
        (**self).delete_chunks(digests)
    }
    fn delete_prune_record(&self, id: &str) -> Result<()> {
        (**self).delete_prune_record(id)
    }
}
