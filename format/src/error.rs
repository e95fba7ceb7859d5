//! Errors a reader or writer of the format must be able to tell apart.

use std::io;

pub type Result<T, E = FormatError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The bytes are not what the spec says: flipped bits, truncation, wrong magic.
    #[error("{what} is damaged: {detail}")]
    Corrupt { what: String, detail: String },

    /// Valid, but of a version or with features this build does not know.
    #[error(
        "{what} uses {detail}; it was possibly written by a newer bkimg: upgrade bkimg to read it"
    )]
    Unsupported { what: String, detail: String },

    /// Valid and known, but this operation cannot handle it yet (an encrypted repository
    /// given to a command not taught §18): not a newer format, so no upgrade is suggested.
    #[error("{what} uses {detail}")]
    Unavailable { what: String, detail: String },

    /// An object a restore point needs is not in the store.
    #[error("{what} is missing from the repository")]
    Missing { what: String },

    /// A path or location that is not a bkimg repository or export file.
    #[error("{0}")]
    NotRepository(String),

    /// The repository is in use in a way that excludes this operation (a prune while
    /// others read or write it, or the other way round).
    #[error("{0}")]
    Busy(String),

    /// A passphrase or key file that does not unlock the repository's key.
    #[error("{0}")]
    Denied(String),

    /// `source` is printed by whoever prints the error chain, not by this message.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl FormatError {
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        FormatError::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }

    pub fn unavailable(what: impl Into<String>, detail: impl Into<String>) -> Self {
        FormatError::Unavailable {
            what: what.into(),
            detail: detail.into(),
        }
    }

    pub fn unsupported(what: impl Into<String>, detail: impl Into<String>) -> Self {
        FormatError::Unsupported {
            what: what.into(),
            detail: detail.into(),
        }
    }

    pub fn missing(what: impl Into<String>) -> Self {
        FormatError::Missing { what: what.into() }
    }

    /// The message with its causes, for places that print one error on its own.
    pub fn full_message(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        FormatError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds a description of what was being done to an `io::Error`.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| FormatError::io(context(), e))
    }
}
