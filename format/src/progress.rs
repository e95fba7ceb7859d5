//! Progress reporting of long operations (capture, restore, verify, replication), in the
//! lowest crate so every stage can report; implemented by the CLI (bars on a terminal, log
//! lines otherwise).

/// Called from worker threads; implementations must be cheap and thread-safe.
pub trait Progress: Sync {
    /// A new phase begins with `total` bytes to go through.
    fn begin(&self, _what: &str, _total: u64) {}
    /// `bytes` more of the phase are done.
    fn advance(&self, _bytes: u64) {}
    /// A note for the user (fallbacks, skipped parts).
    fn note(&self, _text: &str) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
