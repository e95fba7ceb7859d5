//! Where objects live. A store holds three kinds of object: chunk blobs and volume
//! indexes, named by digest, and manifests, named by restore-point id. Readers see a
//! [`StoreRead`]; capture writes through a [`StoreWrite`].

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::Result;

pub mod export;
pub mod local;
pub mod names;

pub use export::ExportFile;
pub use local::LocalDir;

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
