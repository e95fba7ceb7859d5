//! `bkimg`: capture whole machines into a repository, restore them, verify them.
//!
//! This file parses the command line, fills in the config file's settings and dispatches:
//! each command's arguments and work are in its own module (`cmd/`, or `replicate.rs`,
//! `prune.rs`, `standby.rs`, `snapshot.rs`, `tracking.rs`, `demo.rs`).
#![forbid(unsafe_code)]

mod cmd;
mod config;
mod continuous;
mod demo;
mod exit;
mod interrupt;
mod known;
mod live;
mod progress;
mod prune;
mod replicate;
mod s3cmd;
mod snapshot;
mod standby;
mod tracking;
mod units;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bkimg_format::repo::Repository;
use bkimg_format::store::LocalDir;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "bkimg",
    version,
    about = "Whole-machine disk image backup and restore"
)]
pub struct Cli {
    /// Config file (TOML) [default: /etc/bkimg/bkimg.toml if it exists].
    #[arg(long, global = true, env = "BKIMG_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
pub struct Common {
    /// Print a JSON object (or array) on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Capture disks, partitions or image files into one restore point (the repository
    /// directory is created if missing or empty).
    Capture(cmd::capture::CaptureArgs),
    /// Changed-block tracking of block devices (bksnap kernel module).
    #[command(subcommand)]
    Cbt(tracking::CbtCommand),
    /// Live copy-on-write snapshots of block devices (bksnap kernel module).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Restore a restore point to disks or image files.
    Restore(cmd::restore::RestoreArgs),
    /// Read and check every manifest, index and chunk; exit 3 if anything is damaged.
    Verify(cmd::verify::VerifyArgs),
    /// List restore points.
    List(cmd::list::ListArgs),
    /// Show one restore point: disks, partition tables, volumes, sizes.
    Info(cmd::info::InfoArgs),
    /// Write one restore point and all it needs to a single self-contained file.
    Export(cmd::export::ExportArgs),
    /// Write a change map file from explicit ranges (for trackers other than bkimg's own).
    Changemap(cmd::changemap::ChangemapArgs),
    /// Delete restore points a retention policy no longer keeps, and the data only they
    /// used (local or s3:// repositories).
    Prune(prune::PruneArgs),
    /// Ship restore points to S3 (s3://BUCKET/PREFIX) or to a standby host
    /// (bkimg://HOST:PORT): only what the target lacks, manifests last, resumable.
    Replicate(Box<cmd::replicate::ReplicateCommand>),
    /// Encrypt a new repository and manage its keys: init, add, remove, passwd, list.
    #[command(subcommand)]
    Key(cmd::key::KeyCommand),
    /// Recovery media: a bootable image that restores a bare machine.
    #[command(subcommand)]
    Rescue(cmd::rescue::RescueCommand),
    /// The receiving end of replication to a standby host.
    #[command(subcommand)]
    Standby(standby::StandbyCommand),
    /// Build a demo disk image (GPT: EFI system, ext4 with files, swap), capture it,
    /// restore it to a new image and verify the result.
    Demo {
        /// Working directory for the images and the repository.
        #[arg(long, default_value = "bkimg-demo")]
        dir: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Print a shell completion script on stdout (e.g. `bkimg completions bash >
    /// /etc/bash_completion.d/bkimg`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for bkimg and every command to DIR (bkimg.1, bkimg-restore.1,
    /// bkimg-standby-serve.1, ...).
    Man {
        /// Directory to write them to (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

fn main() {
    // Booted as the init of recovery media (bkimg rescue build).
    if std::process::id() == 1 {
        bkimg_rescue::init::main();
    }
    // Set but empty is unset, as shells' `VAR= cmd` means (clap would call it a missing
    // value of --repo or --config). No other thread runs yet.
    for var in ["BKIMG_REPOSITORY", "BKIMG_CONFIG"] {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            std::env::remove_var(var);
        }
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let code = match run(cli) {
        Ok(code) => code,
        Err(err) => {
            let mut msg = format!("bkimg: error: {err:#}");
            if let Some(h) = exit::hint(&err) {
                msg.push_str(&format!("\nbkimg: hint: {h}"));
            }
            eprintln!("{msg}");
            exit::code_for(&err)
        }
    };
    std::process::exit(code);
}

/// Prints to stdout; a closed pipe (`bkimg list | head`) ends the program quietly.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|_| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(exit::OK);
        }
        eprintln!("bkimg: error: writing to stdout: {e}");
        std::process::exit(exit::FAILURE);
    }
}

fn out_json(value: &serde_json::Value) {
    out(&serde_json::to_string_pretty(value).expect("JSON values serialize"));
}

/// Opens a repository directory, an export file, s3://BUCKET[/PREFIX] (endpoint and
/// credentials from the AWS chain: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles...; then
/// the config file's endpoint and region) or a standby host's, bkimg://HOST:PORT (with
/// `standby`'s key and pinned fingerprint, `workers` requests in flight at most).
///
/// A protected local repository is unlocked with `unlock` (spec/format.md §18): the
/// passphrase is asked for only when the repository is encrypted or signed.
fn open_repository(
    location: &Path,
    standby: &standby::StandbyArgs,
    unlock: &cmd::key::Unlock,
    workers: usize,
    config: &Config,
) -> Result<Repository> {
    match location.to_str() {
        Some(url) if url.starts_with("s3://") => {
            s3cmd::open(url, &prune::s3_settings(None, &config.s3), unlock)
        }
        Some(url) if url.starts_with("bkimg://") => {
            standby::open_reader(url, standby, workers.clamp(1, STANDBY_CONNECTIONS), unlock)
        }
        _ if location.is_dir() => {
            let (store, repo_config) = LocalDir::open_any(location)?;
            let protection = cmd::key::protection(&store, &repo_config, unlock)?;
            let repo = cmd::key::protected_repository(store, protection);
            known::check(location, &repo_config, &repo, unlock)?;
            Ok(repo)
        }
        _ if location.is_file() && bkimg_format::store::ExportFile::looks_like_export(location) => {
            let export = bkimg_format::store::ExportFile::open(location)?;
            if !export.is_protected() {
                unlock.refuse_for_unprotected(&location.display().to_string())?;
                return Ok(Repository::new(Box::new(export)));
            }
            let config = export.repo_config()?;
            let protection = cmd::key::protection_with(
                &location.display().to_string(),
                &config,
                || Ok(export.key_slots()?),
                unlock,
            )?;
            // Not checked against what this client saw of the repository: an export holds
            // one restore point, often not the newest, and that is no rollback.
            Ok(Repository::new(Box::new(
                bkimg_format::store::Protected::new(export, protection),
            )))
        }
        _ => {
            unlock.refuse_for("this location")?;
            Ok(Repository::open(location)?)
        }
    }
}

/// Connections to a standby host at most (each carries one request at a time).
const STANDBY_CONNECTIONS: usize = bkimg_replicate::standby::reader::DEFAULT_CONNECTIONS;

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Capture workers read their own chunks (O_DIRECT) before hashing and compressing them:
/// more workers than CPUs keep enough reads in flight (measured on the 5 GiB bench image,
/// 2 CPUs: 8 workers against 2, full capture 5.9-7.3 s against 7.7-7.8 s, hash-diff
/// incremental 2.0-2.7 s against 2.9-3.6 s).
fn workers(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| cpus() * 4)
}

/// Restore is bound by reading many chunk objects: more requests in flight than CPUs
/// hide storage latency (measured: 8 threads restore twice as fast as 2 on 2 CPUs; from
/// S3 on loopback, 32 threads three times as fast as 8: every GET waits ~40 ms). A
/// standby host serves at most [`STANDBY_CONNECTIONS`] requests at once; twice as many
/// workers decode and write while those are in flight.
fn io_workers(threads: Option<usize>, repo: &Path) -> usize {
    let url = repo.to_str().unwrap_or("");
    threads.unwrap_or_else(|| {
        if url.starts_with("s3://") {
            32
        } else if url.starts_with("bkimg://") {
            2 * STANDBY_CONNECTIONS
        } else {
            cpus() * 4
        }
    })
}

/// Fills in what the command line left out from the config file: each setting comes
/// from its flag, else its environment variable (clap has read both), else the file,
/// else the built-in default.
fn settle(command: &mut Command, config: &Config) -> Result<()> {
    match command {
        Command::Capture(cmd::capture::CaptureArgs { repo, threads, .. }) => {
            repo.settle(config)?;
            repo.require_local(
                "capture",
                "capture into a local repository, then ship its restore points with `bkimg \
                 replicate --repo DIR --to bkimg://HOST:PORT`",
            )?;
            *threads = config.threads(*threads);
        }
        Command::Restore(cmd::restore::RestoreArgs {
            repo,
            threads,
            standby,
            ..
        })
        | Command::Verify(cmd::verify::VerifyArgs {
            repo,
            threads,
            standby,
            ..
        }) => {
            repo.settle(config)?;
            standby.settle(&config.standby);
            *threads = config.threads(*threads);
        }
        Command::List(cmd::list::ListArgs { repo, standby, .. })
        | Command::Info(cmd::info::InfoArgs { repo, standby, .. })
        | Command::Export(cmd::export::ExportArgs { repo, standby, .. }) => {
            repo.settle(config)?;
            standby.settle(&config.standby);
        }
        Command::Prune(args) => args.settle(config)?,
        Command::Replicate(args) => args.settle(config)?,
        Command::Standby(cmd) => cmd.settle(config)?,
        Command::Key(cmd) => cmd.settle(config)?,
        Command::Cbt(_)
        | Command::Snapshot(_)
        | Command::Changemap(_)
        | Command::Rescue(_)
        | Command::Demo { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => {}
    }
    Ok(())
}

fn run(cli: Cli) -> Result<i32> {
    let Cli {
        config,
        mut command,
    } = cli;
    // Generating completions and man pages (when packaging) reads no config file.
    match command {
        Command::Completions { shell } => return completions(shell),
        Command::Man { dir } => return man_pages(&dir),
        _ => {}
    }
    let explicit_config = config.clone();
    let config = Config::load(config.as_deref())?;
    settle(&mut command, &config)?;
    if let Some(leaves) = interrupt::leaves(&command) {
        interrupt::exit_on_signal(leaves)?;
    }
    match command {
        Command::Replicate(args) => cmd::replicate::run(*args),
        Command::Prune(args) => prune::run(&args),
        Command::Standby(cmd) => standby::run(cmd),
        Command::Capture(args) => cmd::capture::run(args, &config),
        Command::Restore(args) => cmd::restore::run(args, &config),
        Command::Verify(args) => cmd::verify::run(args, &config),
        Command::List(args) => cmd::list::run(args, &config),
        Command::Info(args) => cmd::info::run(args, &config),
        Command::Export(args) => cmd::export::run(args, &config),
        Command::Changemap(args) => cmd::changemap::run(args, &config),
        Command::Demo { dir, common } => demo::run(&dir, common.json),
        Command::Cbt(cmd) => tracking::run(cmd),
        Command::Snapshot(cmd) => snapshot::run(cmd),
        Command::Rescue(cmd) => cmd::rescue::run(cmd, explicit_config),
        Command::Key(cmd) => cmd::key::run(cmd),
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled above"),
    }
}

fn completions(shell: clap_complete::Shell) -> Result<i32> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "bkimg", &mut script);
    out(String::from_utf8_lossy(&script).trim_end());
    Ok(exit::OK)
}

/// One page per command and subcommand: bkimg.1, bkimg-restore.1, bkimg-standby-serve.1...
fn man_pages(dir: &Path) -> Result<i32> {
    fn write(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub, dir)?;
        }
        clap_mangen::Man::new(cmd.clone())
            .source(format!("bkimg {}", env!("CARGO_PKG_VERSION")))
            .manual("bkimg")
            .generate_to(dir)
            .map(drop)
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Built, subcommands are named "bkimg-standby-serve": the pages' names and titles.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    write(&cmd, dir).with_context(|| format!("writing man pages to {}", dir.display()))?;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Flag, then BKIMG_REPOSITORY, then the config file. The only test that sets it.
    #[test]
    fn repository_from_flag_then_environment_then_file() {
        let file = Config::parse("repository = \"/from/file\"\n").unwrap();
        let repo = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            let Command::List(cmd::list::ListArgs { mut repo, .. }) = cli.command else {
                panic!("not list")
            };
            repo.settle(&file).unwrap();
            repo.path().to_path_buf()
        };
        std::env::remove_var("BKIMG_REPOSITORY");
        assert_eq!(repo(&["bkimg", "list"]), Path::new("/from/file"));
        std::env::set_var("BKIMG_REPOSITORY", "/from/env");
        assert_eq!(repo(&["bkimg", "list"]), Path::new("/from/env"));
        assert_eq!(
            repo(&["bkimg", "list", "--repo", "/from/flag"]),
            Path::new("/from/flag")
        );
        std::env::remove_var("BKIMG_REPOSITORY");
    }

    #[test]
    fn old_option_names_still_parse() {
        let cli = Cli::try_parse_from([
            "bkimg",
            "replicate",
            "--repo",
            "/r",
            "--to",
            "s3://b",
            "--parallel",
            "3",
        ])
        .unwrap();
        let Command::Replicate(args) = cli.command else {
            panic!("not replicate")
        };
        assert_eq!(args.ship.threads, Some(3));
        let cli =
            Cli::try_parse_from(["bkimg", "capture", "--repo", "/r", "--chunk-kib", "64", "x"])
                .unwrap();
        let Command::Capture(cmd::capture::CaptureArgs { chunk_kib, .. }) = cli.command else {
            panic!("not capture")
        };
        assert_eq!(chunk_kib, Some(64));
        assert!(Cli::try_parse_from([
            "bkimg",
            "capture",
            "--repo",
            "/r",
            "--chunk-kib",
            "64",
            "--chunk-size",
            "64K",
            "x"
        ])
        .is_err());
    }
}
