//! Names of a repository's objects relative to its root (spec/format.md §11.1). A local
//! directory and an S3 prefix (spec/s3-layout.md) use the same names.

use crate::digest::Digest;

pub const CONFIG: &str = "config";
pub const CHUNKS: &str = "chunks";
pub const INDEXES: &str = "indexes";
pub const POINTS: &str = "points";
/// Records of pruned restore points that a remaining point names as its parent.
pub const PRUNED: &str = "pruned";
/// Key slots of an encrypted repository.
pub const KEYS: &str = "keys";
/// Advisory lock file of a local repository (shared by every user, exclusive for prune).
pub const LOCK: &str = "lock";

/// `chunks/ab/ab…`: fanned out by the digest's first byte.
pub fn chunk(d: &Digest) -> String {
    let hex = d.to_hex();
    format!("{CHUNKS}/{}/{hex}", &hex[..2])
}

pub fn index(d: &Digest) -> String {
    format!("{INDEXES}/{}", d.to_hex())
}

pub fn manifest(id: &str) -> String {
    format!("{POINTS}/{id}")
}

pub fn prune_record(id: &str) -> String {
    format!("{PRUNED}/{id}")
}
