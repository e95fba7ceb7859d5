//! `bkimg standby ...` (the receiving host) and `bkimg replicate --to bkimg://HOST:PORT`.
//! Set-up and failure behaviour: docs/standby.md; wire protocol: spec/standby-protocol.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bkimg_format::repo::Repository;
use bkimg_replicate::standby::{self, replica, tls, ClientConfig, ServeConfig};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::exit;
use crate::progress::Bar;
use crate::replicate::{ReplicateArgs, Shipped};
use crate::Common;

/// Options of `bkimg replicate` that only standby targets (bkimg://) use.
#[derive(Args)]
pub struct StandbyArgs {
    /// Key directory of this host (made by `bkimg standby keygen`).
    #[arg(long, value_name = "DIR")]
    pub key: Option<PathBuf>,
    /// The standby's certificate fingerprint, as printed by keygen on the standby.
    #[arg(long, value_name = "FP")]
    pub server_fingerprint: Option<String>,
    /// Further attempts after the connection breaks, with backoff (1, 2, 4... s).
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Seconds without progress after which the connection counts as dead.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Subcommand)]
pub enum StandbyCommand {
    /// Make this host's key pair and self-signed certificate; prints its fingerprint.
    Keygen {
        /// Directory for standby.key and standby.crt (created if missing).
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Print the fingerprint of the certificate in a key directory.
    Fingerprint {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Receive restore points from `bkimg replicate --to bkimg://HOST:PORT` (runs until
    /// stopped); with --replica, keep a disk equal to the latest restore point.
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:7070.
        #[arg(long)]
        listen: String,
        /// Repository directory for the received restore points (created if missing).
        #[arg(long)]
        repo: PathBuf,
        /// Block device or image file kept equal to the latest restore point.
        #[arg(long)]
        replica: Option<PathBuf>,
        /// Key directory of this standby (made by `bkimg standby keygen`).
        #[arg(long, value_name = "DIR")]
        key: PathBuf,
        /// A client fingerprint allowed to send, or a file of them (one per line);
        /// repeatable.
        #[arg(long, value_name = "FP|FILE", required = true)]
        allow: Vec<String>,
        /// Seconds of silence after which a client is dropped.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// What the standby holds: restore points, the replica, an interrupted apply.
    Status {
        #[arg(long)]
        repo: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Stop applying restore points to the replica for good, leaving it consistent and
    /// ready to boot (an interrupted apply is finished first).
    Promote {
        #[arg(long)]
        repo: PathBuf,
        #[command(flatten)]
        common: Common,
    },
}

pub fn run(cmd: StandbyCommand) -> Result<i32> {
    match cmd {
        StandbyCommand::Keygen { dir, common } => {
            let (fp, cert) = tls::keygen(&dir)?;
            if common.json {
                crate::out_json(
                    &json!({"fingerprint": fp.0, "certificate": cert.display().to_string()}),
                );
            } else {
                eprintln!(
                    "bkimg: key written to {}; give this fingerprint to the other side:",
                    dir.display()
                );
                crate::out(&fp.0);
            }
            Ok(exit::OK)
        }
        StandbyCommand::Fingerprint { dir, common } => {
            let fp = tls::Identity::load(&dir)?.fingerprint();
            if common.json {
                crate::out_json(&json!({"fingerprint": fp.0}));
            } else {
                crate::out(&fp.0);
            }
            Ok(exit::OK)
        }
        StandbyCommand::Serve {
            listen,
            repo,
            replica,
            key,
            allow,
            timeout,
        } => {
            let cfg = ServeConfig {
                listen,
                repo,
                replica,
                identity: tls::Identity::load(&key)?,
                allowed: tls::allowed_list(&allow)?,
                timeout: Duration::from_secs(timeout.max(1)),
            };
            standby::serve(cfg)?;
            Ok(exit::OK)
        }
        StandbyCommand::Status { repo, common } => {
            let s = replica::status(&repo)?;
            print_status(&s, common.json, "status");
            Ok(exit::OK)
        }
        StandbyCommand::Promote { repo, common } => {
            let s = replica::promote(&repo)?;
            print_status(&s, common.json, "promote");
            Ok(exit::OK)
        }
    }
}

fn print_status(s: &replica::Status, as_json: bool, what: &str) {
    if as_json {
        crate::out_json(&serde_json::to_value(s).expect("serializes"));
        return;
    }
    crate::out(&format!(
        "repository: {} ({} restore points, latest {})",
        s.repo,
        s.points.len(),
        s.latest.as_deref().unwrap_or("none")
    ));
    match &s.replica {
        None => crate::out("replica: none"),
        Some(t) => {
            crate::out(&format!(
                "replica: {t} holds {}",
                s.applied.as_deref().unwrap_or("nothing yet")
            ));
            if let Some(a) = &s.applying {
                crate::out(&format!(
                    "apply {}: {} over {} (started {})",
                    s.apply_state,
                    a.id,
                    a.from.as_deref().unwrap_or("nothing (whole restore)"),
                    a.started
                ));
            }
            if let Some(l) = &s.last_apply {
                crate::out(&format!("last apply: {}", l.summary()));
            }
        }
    }
    if s.promoted {
        crate::out(if what == "promote" {
            "promoted: no more restore points are applied; the replica is ready to boot"
        } else {
            "promoted: not applying restore points"
        });
    }
}

/// Ships to a standby host; returns the run's report.
pub fn ship(args: &ReplicateArgs, bar: &Bar) -> Result<Shipped> {
    let sa = &args.standby;
    let key = sa.key.as_ref().context(
        "--key DIR is needed for a standby target (make one with `bkimg standby keygen --dir DIR`)",
    )?;
    let fp = sa.server_fingerprint.as_ref().context(
        "--server-fingerprint FP is needed for a standby target (keygen on the standby prints it)",
    )?;
    let cfg = ClientConfig {
        address: ClientConfig::address_of(&args.to)?,
        identity: tls::Identity::load(key)?,
        server_fingerprint: tls::Fingerprint::parse(fp)?,
        retries: sa.retries,
        timeout: Duration::from_secs(sa.timeout.max(1)),
    };
    let src = Repository::open(&args.repo)?;
    let report = standby::replicate(&src, &cfg, &args.options(), bar)?;
    Ok(Shipped {
        report,
        target: args.to.clone(),
        extra: json!({}),
    })
}
