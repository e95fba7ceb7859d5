//! `bkimg standby ...` (the receiving host) and `bkimg replicate --to bkimg://HOST:PORT`.

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::replicate::ReplicateArgs;

#[derive(Subcommand)]
pub enum StandbyCommand {}

pub fn run(_cmd: StandbyCommand) -> Result<i32> {
    bail!("the standby host is being built")
}

pub fn replicate(_args: &ReplicateArgs) -> Result<i32> {
    bail!("replication to a standby host is being built")
}
