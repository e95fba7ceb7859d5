//! Replication to a standby host: `bkimg standby serve` receives restore points over mutual
//! TLS ([`tls`]) with the protocol of spec/standby-protocol.md ([`protocol`]), verifies
//! every object before storing it in its own repository ([`server`]) and keeps an optional
//! replica disk equal to the latest point ([`replica`]); `bkimg replicate --to
//! bkimg://HOST:PORT` is the sending side ([`client`]). Since protocol version 2 the standby
//! also serves its repository to readers ([`reader`]: `--repo bkimg://HOST:PORT` for list,
//! info, verify, restore and export, and the recovery system).
//!
//! Design notes: docs/standby.md (set-up, failure behaviour). One session writes to a
//! repository at a time (others wait their turn); read sessions run beside it. The replica
//! is applied by one thread, after the points it applies are committed.

pub mod client;
pub mod protocol;
pub mod reader;
pub mod replica;
pub mod server;
pub mod tls;
pub mod written;

pub use client::{replicate, ClientConfig};
pub use reader::{ReaderConfig, StandbyStore};
pub use server::{serve, ServeConfig};
