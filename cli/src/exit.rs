//! Exit codes (documented in docs/cli.md; they are API).

use bkimg_format::FormatError;
use bkimg_kmod::{ErrorKind, KmodError};
use bkimg_restore::target::TargetError;

pub const OK: i32 = 0;
/// Anything not listed below: unreadable source, I/O error, full disk, bad arguments
/// found after parsing.
pub const FAILURE: i32 = 1;
/// Command line or config file not understood (clap's own code for the command line).
pub const USAGE: i32 = 2;
/// Damaged data: verify found problems, or a read hit a corrupt object.
pub const DAMAGED: i32 = 3;
/// A restore point, parent, chunk or repository that was named does not exist.
pub const NOT_FOUND: i32 = 4;
/// The target was refused: too small, mounted or in use, wrong kind, not confirmed.
pub const TARGET_REFUSED: i32 = 5;
/// Written by a newer bkimg (unknown version or feature).
pub const UNSUPPORTED: i32 = 6;
/// The tracker is not at the generation given: its table cannot be trusted.
pub const STALE: i32 = 7;
/// A remote target (S3, standby host) refused us: wrong credentials or key, access denied.
pub const DENIED: i32 = 8;
/// A remote target could not be reached or the connection broke; nothing half-done is
/// visible there: run the same command again to resume.
pub const UNREACHABLE: i32 = 9;
/// The repository is in use: a prune while others use it, or the other way round. Nothing
/// was changed; run the command again later.
pub const BUSY: i32 = 10;
/// SIGINT or SIGTERM (the shell's code for a command killed by SIGINT).
pub const INTERRUPTED: i32 = 130;

/// The exit code for an error, from the first typed error in its chain.
pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        // Continuous mode gave up on its source: a plain failure, whatever the captures'
        // errors were (as when they ran as child processes).
        if cause.is::<bkimg_replicate::continuous::CapturesFailed>() {
            return FAILURE;
        }
        if let Some(f) = cause.downcast_ref::<FormatError>() {
            return match f {
                FormatError::Corrupt { .. } => DAMAGED,
                FormatError::Unsupported { .. } | FormatError::Unavailable { .. } => UNSUPPORTED,
                FormatError::Missing { .. } | FormatError::NotRepository(_) => NOT_FOUND,
                FormatError::Busy(_) => BUSY,
                FormatError::Denied(_) => DENIED,
                FormatError::Io { .. } => remote(err).map_or(FAILURE, remote_code),
            };
        }
        if cause.downcast_ref::<TargetError>().is_some() {
            return TARGET_REFUSED;
        }
        if cause.downcast_ref::<Refused>().is_some() {
            return TARGET_REFUSED;
        }
        if cause
            .downcast_ref::<bkimg_capture::claim::InUse>()
            .is_some()
        {
            return TARGET_REFUSED;
        }
        if cause.downcast_ref::<Usage>().is_some() {
            return USAGE;
        }
        if let Some(r) = cause.downcast_ref::<bkimg_replicate::RemoteError>() {
            return remote_code(r);
        }
        if cause.downcast_ref::<Interrupted>().is_some() {
            return INTERRUPTED;
        }
        if let Some(k) = cause.downcast_ref::<KmodError>() {
            return match k.kind() {
                ErrorKind::NotFound => NOT_FOUND,
                ErrorKind::Refused => TARGET_REFUSED,
                ErrorKind::Unsupported => UNSUPPORTED,
                ErrorKind::Damaged => DAMAGED,
                ErrorKind::Stale => STALE,
                ErrorKind::NotLoaded | ErrorKind::Permission | ErrorKind::Other => FAILURE,
            };
        }
    }
    FAILURE
}

use bkimg_replicate::io_error;
/// The remote target's failure behind an error, if that is what it is.
pub use bkimg_replicate::remote_error as remote;

fn remote_code(r: &bkimg_replicate::RemoteError) -> i32 {
    match r {
        bkimg_replicate::RemoteError::Denied(_) => DENIED,
        bkimg_replicate::RemoteError::Unreachable(_) => UNREACHABLE,
    }
}

/// The user did not confirm a destructive restore.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// What clap cannot see: a bad config file, or no repository from any source.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Stopped by SIGINT or SIGTERM before anything was committed.
pub use bkimg_capture::live::Interrupted;

/// A hint for errors a person can fix, appended to the message.
pub fn hint(err: &anyhow::Error) -> Option<&'static str> {
    for cause in err.chain() {
        if let Some(k) = cause.downcast_ref::<KmodError>() {
            if k.kind() == ErrorKind::Permission {
                return Some("permission denied: run as root (the bksnap control device needs CAP_SYS_ADMIN)");
            }
        }
        if let Some(io) = io_error(cause) {
            if io.raw_os_error() == Some(nix::libc::ENOSPC) {
                return Some(
                    "the disk is full; nothing was committed: free space (or use another --repo) and run the same command again, chunks already stored are reused",
                );
            }
            if io.kind() == std::io::ErrorKind::PermissionDenied {
                // Root is the answer for devices, not for a repository or image file
                // another user owns.
                return Some(if format!("{err:#}").contains("/dev/") {
                    "permission denied: run as root to read or write block devices"
                } else {
                    "permission denied: the user running bkimg must be allowed to read (and, for \
                     a repository or target, write) the path named above: check its owner and \
                     mode"
                });
            }
        }
    }
    None
}
