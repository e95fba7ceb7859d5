//! One module per command that has no module of its own elsewhere (`replicate`, `prune`,
//! `standby`, `snapshot`, `cbt`, `demo` have theirs): its arguments and what it does.

pub mod capture;
pub mod changemap;
pub mod export;
pub mod info;
pub mod key;
pub mod list;
pub mod replicate;
pub mod rescue;
pub mod restore;
pub mod verify;
