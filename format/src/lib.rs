//! The bkimg container format (spec/format.md is normative) and the stores that hold it.
//!
//! Codec modules (`chunk`, `index`, `sealed`, `manifest`, `changemap`) are pure: they turn
//! bytes into values and back. `store` holds objects in a local directory or an export
//! file; `repo` gives restore-point level operations on top of any store.
#![forbid(unsafe_code)]

pub mod buf;
pub mod changemap;
pub mod chunk;
pub mod crypto;
pub mod digest;
pub mod error;
pub mod firmware;
pub mod index;
pub mod keys;
pub mod loopdev;
pub mod magic;
pub mod manifest;
pub mod progress;
pub mod protect;
pub mod prune;
pub mod record;
pub mod repo;
pub mod sealed;
pub mod store;
pub mod testhook;
pub mod time;

pub use digest::Digest;
pub use error::{FormatError, Result};

/// Smallest and largest chunk sizes a reader accepts (bounds every allocation).
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default chunk size; see spec/format.md "Choice of chunk size".
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;
