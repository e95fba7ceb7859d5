//! A store seen through its repository's protection: what is read is checked and opened,
//! what is written is sealed (spec/format.md §18). Every reader and writer above it sees
//! plain objects, as in an unprotected repository; only chunk ids differ
//! ([`StoreRead::chunk_ids`]).

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ChunkBatchFn, StoreMaintain, StoreRead, StoreWrite};
use crate::crypto::ObjectKind;
use crate::digest::Digest;
use crate::error::{IoContext, Result};
use crate::keys::Mode;
use crate::protect::{ChunkIds, Protection};

pub struct Protected<S> {
    inner: S,
    protection: Arc<Protection>,
}

impl<S> Protected<S> {
    pub fn new(inner: S, protection: Arc<Protection>) -> Protected<S> {
        Protected { inner, protection }
    }
}

impl<S: StoreRead> StoreRead for Protected<S> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn list_manifests(&self) -> Result<Vec<String>> {
        self.inner.list_manifests()
    }

    fn read_manifest(&self, id: &str) -> Result<Vec<u8>> {
        let stored = self.inner.read_manifest(id)?;
        self.protection
            .open_document(ObjectKind::Manifest, id, stored)
    }

    fn open_index(&self, id: &Digest) -> Result<Box<dyn Read + Send>> {
        let stored = self.inner.open_index(id)?;
        self.protection.open_index(id, stored)
    }

    fn read_chunk(&self, digest: &Digest, out: &mut Vec<u8>) -> Result<()> {
        self.inner.read_chunk(digest, out)?;
        self.protection.open_chunk(digest, out)
    }

    fn has_chunk(&self, digest: &Digest) -> Result<bool> {
        self.inner.has_chunk(digest)
    }

    fn has_chunks(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        self.inner.has_chunks(digests)
    }

    fn stored_chunk_len(&self, digest: &Digest) -> Result<Option<u64>> {
        self.inner.stored_chunk_len(digest)
    }

    fn read_prune_record(&self, id: &str) -> Result<Option<Vec<u8>>> {
        match self.inner.read_prune_record(id)? {
            Some(stored) => Ok(Some(self.protection.open_document(
                ObjectKind::PruneRecord,
                id,
                stored,
            )?)),
            None => Ok(None),
        }
    }

    fn chunk_ids(&self) -> ChunkIds {
        self.protection.chunk_ids()
    }

    fn protection(&self) -> Mode {
        self.protection.mode()
    }

    fn open_stored_chunk(&self, digest: &Digest, stored: &mut Vec<u8>) -> Result<()> {
        self.protection.open_chunk(digest, stored)
    }
}

impl<S: StoreWrite> StoreWrite for Protected<S> {
    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<()> {
        match self.protection.seal_chunk(digest, blob) {
            Some(sealed) => self.inner.put_chunk(digest, &sealed),
            None => self.inner.put_chunk(digest, blob),
        }
    }

    fn scratch_file(&self) -> Result<(File, PathBuf)> {
        self.inner.scratch_file()
    }

    fn put_index(&self, id: &Digest, scratch: &Path) -> Result<()> {
        if !self.protection.encrypts() {
            return self.inner.put_index(id, scratch);
        }
        let (file, sealed_path) = self.inner.scratch_file()?;
        let mut sealer = self
            .protection
            .index_sealer(id, BufWriter::new(file))
            .expect("an encrypting protection seals indexes");
        let sealed = (|| -> std::io::Result<()> {
            let mut plain = File::open(scratch)?;
            std::io::copy(&mut plain, &mut sealer)?;
            // Durable with everything else before the manifest is (the store's commit).
            sealer.finish()?.flush()
        })()
        .ctx(|| format!("sealing volume index {id}"));
        let _ = fs::remove_file(scratch);
        if let Err(e) = sealed {
            let _ = fs::remove_file(&sealed_path);
            return Err(e);
        }
        self.inner.put_index(id, &sealed_path)
    }

    fn commit_manifest(&self, id: &str, bytes: &[u8]) -> Result<()> {
        let sealed = self
            .protection
            .seal_document(ObjectKind::Manifest, id, bytes)?;
        self.inner.commit_manifest(id, &sealed)
    }
}

impl<S: StoreMaintain> StoreMaintain for Protected<S> {
    fn list_indexes(&self) -> Result<Vec<Digest>> {
        self.inner.list_indexes()
    }

    fn scan_chunks(&self, each: &mut ChunkBatchFn<'_>) -> Result<()> {
        self.inner.scan_chunks(each)
    }

    fn list_prune_records(&self) -> Result<Vec<String>> {
        self.inner.list_prune_records()
    }

    fn put_prune_record(&self, id: &str, bytes: &[u8]) -> Result<()> {
        let sealed = self
            .protection
            .seal_document(ObjectKind::PruneRecord, id, bytes)?;
        self.inner.put_prune_record(id, &sealed)
    }

    fn delete_manifest(&self, id: &str) -> Result<()> {
        self.inner.delete_manifest(id)
    }

    fn delete_index(&self, id: &Digest) -> Result<()> {
        self.inner.delete_index(id)
    }

    fn delete_chunks(&self, digests: &[Digest]) -> Result<()> {
        self.inner.delete_chunks(digests)
    }

    fn delete_prune_record(&self, id: &str) -> Result<()> {
        self.inner.delete_prune_record(id)
    }
}
