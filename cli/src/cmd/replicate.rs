//! `bkimg replicate`: ships once (`crate::replicate`) or, with --continuous, captures and
//! ships on a schedule (`crate::continuous`, which ships through `crate::replicate`).

use anyhow::Result;
use clap::Args;

use crate::config::Config;
use crate::continuous::ContinuousArgs;
use crate::replicate::ReplicateArgs;

#[derive(Args)]
pub struct ReplicateCommand {
    #[command(flatten)]
    pub ship: ReplicateArgs,
    #[command(flatten)]
    pub continuous: ContinuousArgs,
}

impl ReplicateCommand {
    pub fn settle(&mut self, config: &Config) -> Result<()> {
        self.ship.settle(config)?;
        self.continuous.settle(config)
    }
}

pub fn run(cmd: ReplicateCommand) -> Result<i32> {
    if cmd.continuous.continuous {
        crate::continuous::run(&cmd.ship, &cmd.continuous)
    } else {
        crate::replicate::run(cmd.ship)
    }
}
