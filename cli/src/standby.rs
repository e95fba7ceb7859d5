//! `bkimg standby ...` (the receiving host), `bkimg replicate --to bkimg://HOST:PORT`, and
//! the read commands on `--repo bkimg://HOST:PORT`. Set-up and failure behaviour:
//! docs/standby.md; wire protocol: spec/standby-protocol.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bkimg_format::repo::Repository;
use bkimg_format::store::local::parse_config;
use bkimg_format::store::LocalDir;
use bkimg_replicate::standby::{self, replica, tls, ReaderConfig, ServeConfig, StandbyStore};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::cmd::key::Unlock;
use crate::config::{Config, RepoArgs, StandbyConfig};
use crate::exit;
use crate::Common;

/// Options for a standby host (bkimg://HOST:PORT): `replicate --to` one, or read one with
/// `--repo` (list, info, verify, restore, export).
#[derive(Args, Clone)]
pub struct StandbyArgs {
    /// Key directory of this host (made by `bkimg standby keygen`) [default: `key` in
    /// the config file's [standby]].
    #[arg(long, value_name = "DIR", help_heading = HEADING)]
    pub key: Option<PathBuf>,
    /// The standby's certificate fingerprint, as printed by keygen on the standby
    /// [default: `server-fingerprint` in the config file's [standby]].
    #[arg(long, value_name = "FP", help_heading = HEADING)]
    pub server_fingerprint: Option<String>,
    /// Further attempts after the connection breaks, with backoff (1, 2, 4... s).
    #[arg(long, default_value_t = standby::reader::DEFAULT_RETRIES, help_heading = HEADING)]
    pub retries: u32,
    /// Time without progress after which the connection counts as dead (e.g. 30s, 2m).
    #[arg(long, value_name = "DURATION", value_parser = crate::units::duration, default_value = "30s", help_heading = HEADING)]
    pub timeout: Duration,
}

/// Where `--help` lists the options of [`StandbyArgs`].
const HEADING: &str = "Standby host (bkimg://HOST:PORT)";

impl StandbyArgs {
    pub fn settle(&mut self, file: &StandbyConfig) {
        self.key = self.key.take().or_else(|| file.key.clone());
        self.server_fingerprint = self
            .server_fingerprint
            .take()
            .or_else(|| file.server_fingerprint.clone());
    }
}

/// The repository of the standby host `url` (bkimg://HOST:PORT), for the read commands;
/// `connections`: requests in flight at most.
///
/// A protected repository (encrypted or signed) is read through the key `unlock` gives,
/// with the key slots the standby holds beside it, and checked against what this client
/// saw of it before (rollback, downgrade), as an S3 copy is.
pub fn open_reader(
    url: &str,
    args: &StandbyArgs,
    connections: usize,
    unlock: &crate::cmd::key::Unlock,
) -> Result<Repository> {
    let key = args.key.as_ref().context(
        "--key DIR is needed to read a standby host, or `key` in the config file's [standby]: \
         a key directory made by `bkimg standby keygen --dir DIR`, whose fingerprint the \
         standby allows (standby serve --allow-reader FP)",
    )?;
    let fp = args.server_fingerprint.as_ref().context(
        "--server-fingerprint FP is needed to read a standby host, or `server-fingerprint` in \
         the config file's [standby] (`bkimg standby fingerprint` on the standby prints it)",
    )?;
    let mut cfg = ReaderConfig::new(url, tls::Identity::load(key)?, tls::Fingerprint::parse(fp)?)?;
    cfg.retries = args.retries;
    cfg.timeout = args.timeout;
    cfg.connections = connections;
    cfg.notify = Some(std::sync::Arc::new(crate::progress::note));
    let store = StandbyStore::connect(cfg)?;
    let Some((config, slots)) = store.repo_protection()? else {
        // A standby older than protocol version 3 holds no protected repository.
        unlock.refuse_for_unprotected(url)?;
        return Ok(Repository::new(Box::new(store)));
    };
    let config = parse_config(
        &config,
        &format!("the repository on {url}"),
        &format!("the repository config on {url}"),
        true,
    )?;
    crate::cmd::key::open_copy(url, store, &config, || Ok(slots), unlock)
}

#[derive(Subcommand)]
pub enum StandbyCommand {
    /// Make this host's key pair and self-signed certificate; prints its fingerprint.
    Keygen {
        /// Directory for standby.key and standby.crt (created if missing) [default: `key`
        /// in the config file's [standby]].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Print the fingerprint of the certificate in a key directory.
    Fingerprint {
        /// Key directory [default: `key` in the config file's [standby]].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Receive restore points from `bkimg replicate --to bkimg://HOST:PORT` into the
    /// repository directory (created if missing; runs until stopped); with --replica,
    /// keep disks equal to the latest restore point.
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:7070.
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        repo: RepoArgs,
        /// Block device or image file kept equal to the latest restore point: TARGET for
        /// single-disk points, or DISK=TARGET once per disk (disk0, disk1, ... as `bkimg
        /// info` names them) for points of several disks.
        #[arg(long, value_name = "[DISK=]TARGET")]
        replica: Vec<String>,
        /// Key directory of this standby (made by `bkimg standby keygen`) [default: `key`
        /// in the config file's [standby]].
        #[arg(long, value_name = "DIR")]
        key: Option<PathBuf>,
        /// A client fingerprint allowed to send (and read), or a file of them (one per
        /// line); repeatable.
        #[arg(long, value_name = "FP|FILE", required = true)]
        allow: Vec<String>,
        /// A client fingerprint allowed only to read the repository (`--repo
        /// bkimg://HOST:PORT`, recovery media), or a file of them; repeatable [default:
        /// `allow-reader` in the config file's [standby]].
        #[arg(long, value_name = "FP|FILE")]
        allow_reader: Vec<String>,
        /// Silence after which a client is dropped (e.g. 60s, 5m).
        #[arg(long, value_name = "DURATION", value_parser = crate::units::duration, default_value = "60s")]
        timeout: Duration,
        #[command(flatten)]
        repo_key: RepoKey,
    },
    /// What the standby holds: restore points, the replica, an interrupted apply.
    Status {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Read every replica and compare it chunk by chunk with the restore point it holds
    /// (exit 3 when one differs, naming where).
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        repo_key: RepoKey,
        #[command(flatten)]
        common: Common,
    },
    /// Stop applying restore points to the replicas, leaving them consistent and ready
    /// to boot (an interrupted apply is finished first). Undone by `standby demote`.
    Promote {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        repo_key: RepoKey,
        #[command(flatten)]
        common: Common,
    },
    /// Undo `promote`: the standby applies restore points again, first restoring the
    /// latest one whole to every replica (overwriting anything written to them since).
    Demote {
        #[command(flatten)]
        repo: RepoArgs,
        /// Do not ask before the replicas are overwritten.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        common: Common,
    },
}

impl StandbyCommand {
    pub fn settle(&mut self, config: &Config) -> Result<()> {
        match self {
            StandbyCommand::Keygen { dir, .. } | StandbyCommand::Fingerprint { dir, .. } => {
                *dir = dir.take().or_else(|| config.standby.key.clone());
                if dir.is_none() {
                    return Err(exit::Usage(
                        "--dir DIR is needed (or `key` in the config file's [standby])".into(),
                    )
                    .into());
                }
            }
            StandbyCommand::Serve {
                repo,
                key,
                allow_reader,
                ..
            } => {
                repo.settle(config)?;
                repo.require_local(
                    "standby serve",
                    "--repo names the standby's own repository directory",
                )?;
                *key = key.take().or_else(|| config.standby.key.clone());
                if allow_reader.is_empty() {
                    *allow_reader = config.standby.allow_reader.clone().unwrap_or_default();
                }
            }
            StandbyCommand::Status { repo, .. }
            | StandbyCommand::Verify { repo, .. }
            | StandbyCommand::Promote { repo, .. }
            | StandbyCommand::Demote { repo, .. } => {
                repo.settle(config)?;
                repo.require_local(
                    "standby",
                    "run it on the standby host, with --repo naming its repository directory",
                )?;
            }
        }
        Ok(())
    }
}

/// The key of an encrypted or signed repository the standby holds, which its replicas are
/// applied from (not needed to receive and keep the restore points).
#[derive(Args)]
pub struct RepoKey {
    /// Unlock the repository with this key file, to keep replicas of an encrypted or
    /// signed repository.
    #[arg(long, env = "BKIMG_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Unlock it with the passphrase in FILE (its first line) instead.
    #[arg(
        long,
        env = "BKIMG_PASSWORD_FILE",
        value_name = "FILE",
        conflicts_with = "key_file"
    )]
    password_file: Option<PathBuf>,
}

impl RepoKey {
    /// How replicas read the repository: through the key, when one was given and the
    /// repository is protected.
    fn opener(self) -> Option<replica::Opener> {
        if self.key_file.is_none() && self.password_file.is_none() {
            return None;
        }
        let unlock = Unlock {
            key_file: self.key_file,
            password_file: self.password_file,
            ..Unlock::default()
        };
        Some(std::sync::Arc::new(move |dir: &std::path::Path| {
            let (store, config) = LocalDir::open_any(dir)?;
            if config.encryption.is_none() {
                // Not (yet) protected: the key is for the repository it will hold.
                return Ok(Repository::new(Box::new(store)));
            }
            let protection = crate::cmd::key::protection(&store, &config, &unlock)?;
            Ok(crate::cmd::key::protected_repository(store, protection))
        }))
    }

    fn opener_or_plain(self) -> replica::Opener {
        self.opener().unwrap_or_else(replica::plain_opener)
    }
}

pub fn run(cmd: StandbyCommand) -> Result<i32> {
    match cmd {
        StandbyCommand::Keygen { dir, common } => {
            let dir = dir.expect("settled");
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
            let dir = dir.expect("settled");
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
            allow_reader,
            timeout,
            repo_key,
        } => {
            let key = key.context(
                "--key DIR is needed (or `key` in the config file's [standby]): the standby's \
                 key directory, made by `bkimg standby keygen --dir DIR`",
            )?;
            let cfg = ServeConfig {
                listen,
                repo: repo.path().to_path_buf(),
                replicas: replica::ReplicaSpec::parse_all(&replica)?,
                identity: tls::Identity::load(&key)?,
                allowed: tls::allowed_list(&allow)?,
                readers: tls::fingerprints(&allow_reader, "--allow-reader")?,
                timeout,
                open: repo_key.opener(),
            };
            if let Some(open) = &cfg.open {
                // A wrong key is told now, not at the first apply.
                if LocalDir::is_repository(&cfg.repo) {
                    open(&cfg.repo)?;
                }
            }
            standby::serve(cfg)?;
            Ok(exit::OK)
        }
        StandbyCommand::Status { repo, common } => {
            let s = replica::status(repo.path())?;
            print_status(&s, common.json, "status");
            Ok(exit::OK)
        }
        StandbyCommand::Verify {
            repo,
            repo_key,
            common,
        } => {
            let checks = replica::verify_replicas(repo.path(), &repo_key.opener_or_plain())?;
            let differ = checks.iter().any(|c| c.differing_chunks > 0);
            if common.json {
                crate::out_json(&serde_json::json!({ "replicas": checks, "equal": !differ }));
            } else {
                for c in &checks {
                    let Some(point) = &c.point else {
                        crate::out(&format!(
                            "replica {}: holds no restore point yet (nothing to compare)",
                            c.target
                        ));
                        continue;
                    };
                    if c.differing_chunks == 0 {
                        crate::out(&format!(
                            "replica {}: equal to {point} ({} chunks checked)",
                            c.target, c.chunks_checked
                        ));
                    } else {
                        crate::out(&format!(
                            "replica {}: DIFFERS from {point} in {} of {} chunks: {}{}",
                            c.target,
                            c.differing_chunks,
                            c.chunks_checked,
                            c.differences.join(", "),
                            if c.differing_chunks > c.differences.len() as u64 {
                                ", ..."
                            } else {
                                ""
                            }
                        ));
                    }
                }
            }
            if differ {
                eprintln!(
                    "bkimg: a replica differs from the restore point it should hold (written \
                     by something else, or damaged): `bkimg standby promote` then `bkimg \
                     standby demote --yes` restores the newest point to it whole"
                );
                return Ok(exit::DAMAGED);
            }
            Ok(exit::OK)
        }
        StandbyCommand::Promote {
            repo,
            repo_key,
            common,
        } => {
            let s = replica::promote(repo.path(), &repo_key.opener_or_plain())?;
            print_status(&s, common.json, "promote");
            Ok(exit::OK)
        }
        StandbyCommand::Demote { repo, yes, common } => {
            let repo = repo.path();
            let before = replica::status(repo)?;
            if !before.promoted {
                eprintln!("bkimg: {} is not promoted: nothing to undo", repo.display());
                print_status(&before, common.json, "demote");
                return Ok(exit::OK);
            }
            confirm_demote(&before, yes)?;
            replica::demote(repo)?;
            print_status(&replica::status(repo)?, common.json, "demote");
            Ok(exit::OK)
        }
    }
}

/// Demoting gives the replicas back to the standby, which overwrites them: say so, and
/// ask (or require --yes), as `restore` does before overwriting a device.
fn confirm_demote(s: &replica::Status, yes: bool) -> Result<()> {
    use std::io::IsTerminal;
    let targets = s
        .replica
        .as_deref()
        .unwrap_or("the replicas given to serve --replica");
    let point = match (&s.latest, &s.not_applied) {
        (Some(l), Some(n)) if &n.id == l => "the next restore point that matches them".into(),
        (Some(l), _) => format!("the latest restore point ({l})"),
        (None, _) => "the first restore point it receives".to_string(),
    };
    eprintln!(
        "bkimg: warning: after demote, `standby serve` overwrites {targets} with {point}, a \
         whole restore: anything written to them since promotion is lost"
    );
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(exit::Refused(format!(
            "not demoted: add --yes to let the standby overwrite {targets} (not asking: stdin \
             is not a terminal)"
        ))
        .into());
    }
    eprint!("Resume applying restore points to {targets}? Type 'yes': ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        return Err(exit::Refused(format!(
            "not confirmed: still promoted, {targets} untouched"
        ))
        .into());
    }
    Ok(())
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
    match s.replicas.as_slice() {
        [] => crate::out("replica: none"),
        [r] if r.disk.is_none() => crate::out(&format!(
            "replica: {} holds {}",
            r.target,
            r.holds.as_deref().unwrap_or("nothing yet")
        )),
        rs => {
            crate::out(&format!(
                "replicas: {} disks, all holding {}",
                rs.len(),
                s.applied.as_deref().unwrap_or("- (not the same point)")
            ));
            for r in rs {
                crate::out(&format!(
                    "  {}: {} holds {}",
                    r.disk.as_deref().unwrap_or("(only disk)"),
                    r.target,
                    r.holds.as_deref().unwrap_or("nothing yet")
                ));
            }
        }
    }
    if let Some(a) = &s.applying {
        let done: Vec<&str> = a
            .disks
            .iter()
            .filter(|d| d.done)
            .map(|d| d.disk.as_deref().unwrap_or(&d.target))
            .collect();
        crate::out(&format!(
            "apply {}: {} over {} (started {}){}",
            s.apply_state,
            a.id,
            a.from.as_deref().unwrap_or("nothing (whole restore)"),
            a.started,
            if a.disks.len() > 1 {
                format!(
                    "; {} of {} disks done{}",
                    done.len(),
                    a.disks.len(),
                    if done.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", done.join(", "))
                    }
                )
            } else {
                String::new()
            }
        ));
    }
    if let Some(n) = &s.not_applied {
        crate::out(&format!("not applied: {}", n.reason));
    }
    if let Some(l) = &s.last_apply {
        crate::out(&format!("last apply: {}", l.summary()));
        for d in l.disks.iter().filter(|d| d.whole_because.is_some()) {
            crate::out(&format!(
                "  {} restored whole: {}",
                d.target,
                d.whole_because.as_deref().unwrap_or_default()
            ));
        }
    }
    crate::out(&match (s.promoted, what) {
        (true, "promote") => format!(
            "promoted: yes; no more restore points are applied and {} ready to boot (undo: \
             bkimg standby demote)",
            if s.replicas.len() > 1 {
                "the replicas are"
            } else {
                "the replica is"
            }
        ),
        (true, _) => format!(
            "promoted: yes, since {}; not applying restore points (undo: bkimg standby demote)",
            s.promoted_at.as_deref().unwrap_or("?")
        ),
        (false, "demote") => {
            "promoted: no; the standby applies restore points again (a running serve starts \
             within seconds)"
                .to_string()
        }
        (false, _) => "promoted: no".to_string(),
    });
}
