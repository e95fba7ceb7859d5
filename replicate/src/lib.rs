//! Replication: ship the restore points of a repository to a target that lacks them, and
//! of each only the objects the target lacks; the manifest goes last, so what a target
//! lists is always complete. Two kinds of target: S3-compatible object storage
//! ([`s3`]) and a standby host running `bkimg standby serve` ([`standby`]).

pub mod continuous;
mod plan;
pub mod s3;
pub mod standby;
pub mod target;
pub mod throttle;

pub use plan::points_to_ship;

/// What a caller asks of one replication run, whatever the target.
#[derive(Clone, Debug, Default)]
pub struct ReplicateOptions {
    /// Restore points to ship (with their ancestors); empty: all of them.
    pub ids: Vec<String>,
    /// Upper bound on bytes sent per second; None: unlimited.
    pub bandwidth: Option<u64>,
    /// Requests (or streams) in flight at once; None: the implementation's default.
    pub parallel: Option<usize>,
}

/// What one replication run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ShipReport {
    /// Restore points the target did not have and now has, oldest first.
    pub points_sent: Vec<String>,
    /// Restore points the target already had.
    pub points_present: usize,
    /// Chunk blobs sent, and chunk blobs skipped because the target had them.
    pub chunks_sent: u64,
    pub chunks_present: u64,
    /// Chunks the target listed with another size than the one stored locally (cut short
    /// or replaced there): sent again, and counted in `chunks_sent` too.
    pub chunks_resent: u64,
    /// Bytes of object payload sent (compressed chunk blobs, indexes, manifests).
    pub bytes_sent: u64,
    pub seconds: f64,
}

/// Failures of a remote target that callers (and exit codes) tell apart. Other failures
/// are `anyhow` errors or `bkimg_format::FormatError` (damaged or missing objects).
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Wrong credentials or key, access denied, peer not authenticated.
    #[error("{0}")]
    Denied(String),
    /// Could not connect, or the connection broke and retries ran out.
    #[error("{0}")]
    Unreachable(String),
}

/// The remote target's failure behind an error, if that is what it is: directly in the
/// chain, or carried by an I/O error (how a remote store reports a lost endpoint or a
/// refusal met halfway through a read).
pub fn remote_error(err: &anyhow::Error) -> Option<&RemoteError> {
    err.chain().find_map(|cause| {
        cause
            .downcast_ref::<RemoteError>()
            .or_else(|| io_error(cause)?.get_ref()?.downcast_ref::<RemoteError>())
    })
}

/// The I/O error a cause is, or carries as a `FormatError::Io`.
pub fn io_error<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    cause.downcast_ref::<std::io::Error>().or_else(|| {
        cause
            .downcast_ref::<bkimg_format::FormatError>()
            .and_then(|f| match f {
                bkimg_format::FormatError::Io { source, .. } => Some(source),
                _ => None,
            })
    })
}
