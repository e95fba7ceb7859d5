//! Replication to a standby host: `bkimg standby serve` receives restore points over mutual
//! TLS ([`tls`]) with the protocol of spec/standby-protocol.md ([`protocol`]), verifies
//! every object before storing it in its own repository ([`server`]) and keeps an optional
//! replica disk equal to the latest point ([`replica`]); `bkimg replicate --to
//! bkimg://HOST:PORT` is the sending side ([`client`]).
//!
//! Design notes: docs/standby.md (set-up, failure behaviour). One session writes to a
//! repository at a time (others wait their turn); the replica is applied by one thread,
//! after the points it applies are committed.

pub mod client;
pub mod protocol;
pub mod replica;
pub mod server;
pub mod tls;

pub use client::{replicate, ClientConfig};
pub use server::{serve, ServeConfig};
