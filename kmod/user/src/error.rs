//! Errors. Typed where callers branch (the CLI turns [`ErrorKind`] into exit codes);
//! each message says what is wrong and, where there is one, what to do.

use std::path::PathBuf;

use nix::errno::Errno;

pub type Result<T, E = KmodError> = std::result::Result<T, E>;

/// What kind of failure, for callers that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The bksnap module is not loaded.
    NotLoaded,
    /// A named tracker, snapshot or file does not exist.
    NotFound,
    /// The thing named cannot be used: not a block device, in use, unsuitable store.
    Refused,
    /// A newer module or file format.
    Unsupported,
    /// A saved state file is damaged.
    Damaged,
    /// The tracker's generation is not the one expected: its table must not be trusted.
    Stale,
    /// Not permitted (CAP_SYS_ADMIN needed).
    Permission,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error(
        "{} does not exist: the bksnap kernel module is not loaded (load it with \
         `modprobe bksnap`, or `insmod bksnap.ko` from the build directory)",
        path.display()
    )]
    NotLoaded { path: PathBuf },
    #[error(
        "the bksnap module speaks interface version {major}.{minor}; this bkimg needs 1.x \
         (possibly a newer module: update bkimg, or load the matching module)"
    )]
    Version { major: u32, minor: u32 },
    #[error("{path} is not a block device{why}", path = path.display())]
    NotBlockDevice { path: PathBuf, why: String },
    #[error("{what}: {errno}{hint}", errno = errno.desc())]
    Ioctl {
        what: String,
        errno: Errno,
        hint: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("saved tracker state {path} is damaged: {detail}", path = path.display())]
    SavedDamaged { path: PathBuf, detail: String },
    #[error(
        "saved tracker state {path}: {detail} (possibly written by a newer bkimg)",
        path = path.display()
    )]
    SavedUnsupported { path: PathBuf, detail: String },
    #[error(
        "saved tracker state {path} not restored on {device}: {detail}; the next capture \
         reads {device} whole (hash-diff)",
        path = path.display()
    )]
    SavedMismatch {
        path: PathBuf,
        device: String,
        detail: String,
    },
    #[error("difference store {path}: {detail}", path = path.display())]
    Store { path: PathBuf, detail: String },
    #[error(
        "the tracker of {dev} is at generation {found}, not {expected}: it lost state since \
         (detached, reattached, or its sequence wrapped), so its table cannot tell what \
         changed; read the device whole (hash-diff) instead"
    )]
    StaleGeneration {
        dev: String,
        expected: String,
        found: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl KmodError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            KmodError::NotLoaded { .. } => ErrorKind::NotLoaded,
            KmodError::Version { .. } | KmodError::SavedUnsupported { .. } => {
                ErrorKind::Unsupported
            }
            KmodError::NotBlockDevice { .. } | KmodError::Store { .. } => ErrorKind::Refused,
            KmodError::Ioctl { errno, .. } => match errno {
                Errno::ENOENT => ErrorKind::NotFound,
                Errno::EBUSY | Errno::EEXIST => ErrorKind::Refused,
                Errno::EPERM | Errno::EACCES => ErrorKind::Permission,
                Errno::ENOTTY => ErrorKind::Unsupported,
                _ => ErrorKind::Other,
            },
            KmodError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorKind::Permission,
                _ => ErrorKind::Other,
            },
            KmodError::SavedDamaged { .. } => ErrorKind::Damaged,
            KmodError::StaleGeneration { .. } | KmodError::SavedMismatch { .. } => ErrorKind::Stale,
            KmodError::Invalid(_) => ErrorKind::Other,
        }
    }

    /// An ioctl failure, with a hint for the errnos a person can act on.
    pub(crate) fn ioctl(what: impl Into<String>, errno: Errno) -> KmodError {
        let hint = match errno {
            Errno::EPERM | Errno::EACCES => {
                " (the bksnap control device needs CAP_SYS_ADMIN: run as root)"
            }
            Errno::ENOTTY => {
                " (the loaded bksnap module does not know this request: a different version?)"
            }
            _ => "",
        };
        KmodError::Ioctl {
            what: what.into(),
            errno,
            hint: hint.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> KmodError {
        KmodError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn store(path: &std::path::Path, detail: impl Into<String>) -> KmodError {
        KmodError::Store {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}
