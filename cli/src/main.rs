//! `bkimg`: capture whole machines into a repository, restore them, verify them.
#![forbid(unsafe_code)]

mod config;
mod continuous;
mod demo;
mod exit;
mod live;
mod progress;
mod prune;
mod replicate;
mod s3cmd;
mod snapshot;
mod standby;
mod tracking;
mod units;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bkimg_capture::{CaptureOptions, ChangeSource};
use bkimg_format::changemap::ChangeMap;
use bkimg_format::manifest::{Content, Manifest, PartitionTable};
use bkimg_format::repo::{Point, Repository};
use bkimg_format::store::LocalDir;
use bkimg_restore::RestoreRequest;
use clap::{Args, CommandFactory, Parser, Subcommand};
use indicatif::HumanBytes;
use serde_json::json;

use crate::config::{Config, RepoArgs};
use crate::progress::Bar;

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
    Capture {
        #[command(flatten)]
        repo: RepoArgs,
        /// Block devices or raw image files; several make one restore point of a machine.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// Make an incremental of this restore point ("latest" or an id).
        #[arg(long)]
        parent: Option<String>,
        /// Change map for the SOURCE at the same position (repeat per source; "-" for none).
        /// When the parent was captured at the tracker state the map starts from, only the
        /// ranges it names are read and the rest comes from the parent; otherwise the source
        /// is read whole (hash-diff). Either way the map's end state is recorded, so the
        /// next incremental can use the next map.
        #[arg(long = "changed-blocks", value_name = "FILE")]
        changed_blocks: Vec<String>,
        /// Chunk size, a power of two from 4K to 16M [default: 256K]. Incrementals use the
        /// parent's.
        #[arg(long, value_name = "SIZE", value_parser = units::size)]
        chunk_size: Option<u64>,
        /// Chunk size in KiB (before --chunk-size).
        #[arg(long, value_name = "KIB", hide = true, conflicts_with = "chunk_size")]
        chunk_kib: Option<u64>,
        /// zstd level (1-19; 0 stores chunks uncompressed).
        #[arg(long, default_value_t = bkimg_capture::DEFAULT_LEVEL)]
        level: i32,
        /// Store every byte, ignoring filesystem allocation maps.
        #[arg(long)]
        raw: bool,
        /// Hash/compress threads (default: 4 per CPU, or `threads` in the config file).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        #[command(flatten)]
        live: live::LiveArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Changed-block tracking of block devices (bksnap kernel module).
    #[command(subcommand)]
    Cbt(tracking::CbtCommand),
    /// Live copy-on-write snapshots of block devices (bksnap kernel module).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Restore a restore point to disks or image files.
    Restore {
        #[command(flatten)]
        repo: RepoArgs,
        /// Restore point id, unique id prefix, or "latest".
        #[arg(default_value = "latest")]
        id: String,
        /// Disk or image file to write ("DISK=PATH" per disk for multi-disk restore points).
        /// A missing path becomes a sparse image file of the source disk's size.
        #[arg(long, required = true)]
        target: Vec<String>,
        /// Restore one volume ("p2", "2", "gap0", "whole") to the target instead of the whole disk.
        #[arg(long)]
        volume: Option<String>,
        /// Print what would be written and stop.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask before overwriting a block device.
        #[arg(long)]
        yes: bool,
        /// Chunks read at once (default: 4 per CPU; 32 for s3://; or `threads` in the
        /// config file).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Read and check every manifest, index and chunk; exit 3 if anything is damaged.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        /// Restore points to verify (default: all).
        ids: Vec<String>,
        /// Chunks read and checked at once (default: 4 per CPU; 32 for s3://; or
        /// `threads` in the config file).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// List restore points.
    List {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Show one restore point: disks, partition tables, volumes, sizes.
    Info {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(default_value = "latest")]
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Write one restore point and all it needs to a single self-contained file.
    Export {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(default_value = "latest")]
        id: String,
        /// The file to write (must not exist).
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Write a change map file from explicit ranges (for trackers other than bkimg's own).
    Changemap {
        /// File to write.
        #[arg(long, short)]
        output: PathBuf,
        /// Size of the device (bytes, or e.g. 10G).
        #[arg(long, value_name = "SIZE", value_parser = units::size)]
        device_size: u64,
        /// Tracking block size.
        #[arg(long, value_name = "SIZE", value_parser = units::size_u32, default_value = "64K")]
        block_size: u32,
        /// Tracking generation, 32 hex digits.
        #[arg(long, default_value = "00000000000000000000000000000000")]
        generation: String,
        #[arg(long, default_value_t = 0)]
        from_sequence: u64,
        #[arg(long, default_value_t = 0)]
        to_sequence: u64,
        /// Changed byte ranges, "START+LENGTH" (rounded out to whole blocks).
        ranges: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Delete restore points a retention policy no longer keeps, and the data only they
    /// used (local or s3:// repositories).
    Prune(prune::PruneArgs),
    /// Ship restore points to S3 (s3://BUCKET/PREFIX) or to a standby host
    /// (bkimg://HOST:PORT): only what the target lacks, manifests last, resumable.
    Replicate(Box<replicate::ReplicateArgs>),
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

/// Opens a repository directory, an export file, or s3://BUCKET[/PREFIX] (endpoint and
/// credentials from the AWS chain: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles...; then
/// the config file's endpoint and region).
fn open_repository(location: &Path, config: &Config) -> Result<Repository> {
    match location.to_str() {
        Some(url) if url.starts_with("s3://") => {
            s3cmd::open(url, &prune::s3_settings(None, &config.s3))
        }
        _ => Ok(Repository::open(location)?),
    }
}

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
/// S3 on loopback, 32 threads three times as fast as 8: every GET waits ~40 ms).
fn io_workers(threads: Option<usize>, repo: &Path) -> usize {
    let remote = repo.to_str().is_some_and(|r| r.starts_with("s3://"));
    threads.unwrap_or_else(|| if remote { 32 } else { cpus() * 4 })
}

/// Fills in what the command line left out from the config file: each setting comes
/// from its flag, else its environment variable (clap has read both), else the file,
/// else the built-in default.
fn settle(command: &mut Command, config: &Config) -> Result<()> {
    match command {
        Command::Capture { repo, threads, .. }
        | Command::Restore { repo, threads, .. }
        | Command::Verify { repo, threads, .. } => {
            repo.settle(config)?;
            *threads = config.threads(*threads);
        }
        Command::List { repo, .. } | Command::Info { repo, .. } | Command::Export { repo, .. } => {
            repo.settle(config)?
        }
        Command::Prune(args) => args.settle(config)?,
        Command::Replicate(args) => args.settle(config)?,
        Command::Standby(cmd) => cmd.settle(config)?,
        Command::Cbt(_)
        | Command::Snapshot(_)
        | Command::Changemap { .. }
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
    let config = Config::load(config.as_deref())?;
    settle(&mut command, &config)?;
    match command {
        Command::Replicate(args) => replicate::run(*args),
        Command::Prune(args) => prune::run(&args),
        Command::Standby(cmd) => standby::run(cmd),
        Command::Capture {
            repo,
            sources,
            parent,
            changed_blocks,
            chunk_size,
            chunk_kib,
            level,
            raw,
            threads,
            live,
            common,
        } => {
            let repo = repo.path();
            let chunk_size = chunk_kib
                .map(|k| k.saturating_mul(1024))
                .or(chunk_size)
                .map_or(Some(bkimg_format::DEFAULT_CHUNK_SIZE), |c| {
                    u32::try_from(c).ok()
                })
                .filter(|c| c.is_power_of_two())
                .filter(|c| {
                    (bkimg_format::MIN_CHUNK_SIZE..=bkimg_format::MAX_CHUNK_SIZE).contains(c)
                })
                .context("--chunk-size must be a power of two from 4K to 16M")?;
            if !(0..=19).contains(&level) {
                bail!("--level must be 0 (no compression) to 19");
            }
            if changed_blocks.len() > sources.len() {
                bail!("more --changed-blocks than sources: give one per SOURCE, in order");
            }
            let (id, created) = bkimg_capture::new_point_id()?;
            let store =
                LocalDir::open_or_create(repo, &uuid::Uuid::new_v4().to_string(), &created)?;
            let reader = Repository::new(Box::new(LocalDir::open(repo)?));
            let parent_point = match &parent {
                Some(p) => Some(reader.resolve(p).context("the --parent restore point")?),
                None => None,
            };
            let bar = Bar::new(common.quiet || common.json);
            let started = std::time::Instant::now();
            let mut opts = CaptureOptions {
                sources,
                source_names: Vec::new(),
                changed_blocks: changed_blocks
                    .iter()
                    .map(|c| (c != "-").then(|| ChangeSource::File(PathBuf::from(c))))
                    .collect(),
                chunk_size,
                level,
                raw,
                workers: workers(threads),
                id,
                created,
                host: nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                tool: format!("bkimg {}", env!("CARGO_PKG_VERSION")),
            };
            let session = live::start(&live, &mut opts, parent_point.as_ref(), &bar)?;
            let result = match &session {
                Some(s) => s.capture(&reader, &store, parent_point.as_ref(), &opts, &bar),
                None => bkimg_capture::capture(&reader, &store, parent_point.as_ref(), &opts, &bar),
            };
            bar.finish();
            let live_report = session.map(live::finish);
            let result = result?;
            let secs = started.elapsed().as_secs_f64();
            let m = &result.manifest;
            let read: u64 = result.reports.iter().map(|r| r.bytes_read).sum();
            let stored: u64 = result.reports.iter().map(|r| r.bytes_stored_new).sum();
            if common.json {
                let mut v = json!({
                    "id": m.id,
                    "parent": m.parent.as_ref().map(|p| &p.id),
                    "created": m.created,
                    "seconds": secs,
                    "bytes_read": read,
                    "bytes_stored_new": stored,
                    "disks": result.reports,
                });
                if let Some(l) = live_report {
                    v["live"] = l;
                }
                out_json(&v);
            } else {
                for r in &result.reports {
                    eprintln!(
                        "{}: {} ({}), read {}, stored {} new in {} chunks",
                        r.disk,
                        r.source,
                        r.mode,
                        HumanBytes(r.bytes_read),
                        HumanBytes(r.bytes_stored_new),
                        r.chunks_new
                    );
                }
                eprintln!("restore point {} committed in {secs:.1} s", m.id);
                out(&m.id);
            }
            Ok(exit::OK)
        }
        Command::Restore {
            repo,
            id,
            target,
            volume,
            dry_run,
            yes,
            threads,
            common,
        } => {
            let workers = io_workers(threads, repo.path());
            let repo = open_repository(repo.path(), &config)?;
            let point = repo.resolve(&id)?;
            let req = RestoreRequest {
                targets: bkimg_restore::match_targets(&point, &target)?,
                volume,
                workers,
            };
            let plan = bkimg_restore::plan(&point, &req)?;
            if dry_run {
                // Refuse now what the real restore would refuse.
                bkimg_restore::check_targets(&point, &req)?;
                if common.json {
                    out_json(&json!({ "id": point.manifest.id, "dry_run": true, "disks": plan }));
                } else {
                    print_plan(&point, &plan);
                }
                return Ok(exit::OK);
            }
            confirm_devices(&req, &point, yes)?;
            let bar = Bar::new(common.quiet || common.json);
            let started = std::time::Instant::now();
            let report = bkimg_restore::restore(&repo, &point, &req, &bar);
            bar.finish();
            let report = report?;
            let secs = started.elapsed().as_secs_f64();
            if common.json {
                out_json(
                    &json!({ "id": point.manifest.id, "seconds": secs, "disks": plan, "report": report }),
                );
            } else {
                eprintln!(
                    "restored {} to {}: wrote {}, {} chunks verified, in {secs:.1} s",
                    point.manifest.id,
                    req.targets
                        .iter()
                        .map(|(d, p)| format!("{d}={}", p.display()))
                        .collect::<Vec<_>>()
                        .join(", "),
                    HumanBytes(report.bytes_written),
                    report.chunks_verified
                );
            }
            Ok(exit::OK)
        }
        Command::Verify {
            repo,
            ids,
            threads,
            common,
        } => {
            let workers = io_workers(threads, repo.path());
            let repo = open_repository(repo.path(), &config)?;
            let bar = Bar::new(common.quiet || common.json);
            let report = bkimg_restore::verify::verify(&repo, &ids, workers, &bar);
            bar.finish();
            let report = report?;
            if common.json {
                out_json(&serde_json::to_value(&report)?);
            } else {
                for p in &report.problems {
                    let mut at = p.point.clone();
                    for part in [&p.disk, &p.volume].into_iter().flatten() {
                        at.push_str(&format!(" {part}"));
                    }
                    if let Some(o) = p.offset {
                        at.push_str(&format!(" at byte {o}"));
                    }
                    eprintln!("DAMAGED: {at}: {}", p.error);
                }
                eprintln!(
                    "{} restore point(s), {} chunks ({}) checked, {} problem(s)",
                    report.points.len(),
                    report.chunks_checked,
                    HumanBytes(report.bytes_checked),
                    report.problems.len()
                );
            }
            Ok(if report.problems.is_empty() {
                exit::OK
            } else {
                exit::DAMAGED
            })
        }
        Command::List { repo, common } => {
            let repo = open_repository(repo.path(), &config)?;
            let (points, bad) = repo.points()?;
            for (id, e) in &bad {
                eprintln!(
                    "bkimg: warning: restore point {id} is unreadable: {}",
                    e.full_message()
                );
            }
            // A parent that is not listed was pruned (or is missing: verify says which).
            let ids: std::collections::HashSet<&str> =
                points.iter().map(|p| p.manifest.id.as_str()).collect();
            let parent_gone = |m: &bkimg_format::manifest::Manifest| {
                m.parent
                    .as_ref()
                    .is_some_and(|l| !ids.contains(l.id.as_str()))
            };
            if common.json {
                let arr: Vec<_> = points
                    .iter()
                    .map(|p| {
                        let mut v = point_summary(p);
                        v["parent_pruned"] = serde_json::Value::Bool(parent_gone(&p.manifest));
                        v
                    })
                    .collect();
                out_json(&serde_json::Value::Array(arr));
            } else {
                out(&format!(
                    "{:<24} {:<24} {:<22} {:>10}  DISKS",
                    "ID", "PARENT", "CREATED", "SIZE"
                ));
                for p in &points {
                    let m = &p.manifest;
                    out(&format!(
                        "{:<24} {:<24} {:<22} {:>10}  {}",
                        m.id,
                        match &m.parent {
                            None => "-".to_string(),
                            Some(l) if parent_gone(m) => format!("{} (pruned)", l.id),
                            Some(l) => l.id.clone(),
                        },
                        m.created,
                        HumanBytes(m.disks.iter().map(|d| d.size).sum()),
                        m.disks
                            .iter()
                            .map(|d| d.source.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    ));
                }
            }
            Ok(if bad.is_empty() {
                exit::OK
            } else {
                exit::DAMAGED
            })
        }
        Command::Info { repo, id, common } => {
            let repo = open_repository(repo.path(), &config)?;
            let point = repo.resolve(&id)?;
            if common.json {
                let mut v = point_summary(&point);
                v["manifest"] = serde_json::to_value(&point.manifest)?;
                out_json(&v);
            } else {
                print_info(&point.manifest, &point);
            }
            Ok(exit::OK)
        }
        Command::Export {
            repo,
            id,
            output,
            common,
        } => {
            let repo = open_repository(repo.path(), &config)?;
            let point = repo.resolve(&id)?;
            export(&repo, &point, &output, common.quiet || common.json)?;
            if common.json {
                out_json(&json!({ "id": point.manifest.id, "output": output }));
            } else {
                eprintln!("exported {} to {}", point.manifest.id, output.display());
            }
            Ok(exit::OK)
        }
        Command::Changemap {
            output,
            device_size,
            block_size,
            generation,
            from_sequence,
            to_sequence,
            ranges,
            common,
        } => {
            let mut gen = [0u8; 16];
            bkimg_format::digest::decode_hex_into(&generation, &mut gen)
                .context("--generation must be 32 hex digits")?;
            let bs = u64::from(block_size);
            let mut blocks: Vec<(u64, u64)> = Vec::new();
            for r in &ranges {
                let (s, l) = r
                    .split_once('+')
                    .and_then(|(s, l)| Some((s.parse::<u64>().ok()?, l.parse::<u64>().ok()?)))
                    .with_context(|| format!("range {r:?} is not START+LENGTH in bytes"))?;
                if l == 0 {
                    continue;
                }
                let end = s
                    .checked_add(l)
                    .with_context(|| format!("range {r:?} ends past 2^64 bytes"))?;
                blocks.push((s / bs, end.div_ceil(bs)));
            }
            blocks.sort();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (s, e) in blocks {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            let map = ChangeMap {
                block_size,
                device_size,
                generation: gen,
                from_sequence,
                to_sequence,
                ranges: merged.into_iter().map(|(s, e)| (s, e - s)).collect(),
            };
            map.validate()?;
            std::fs::write(&output, map.encode())
                .with_context(|| format!("writing {}", output.display()))?;
            if common.json {
                out_json(&json!({
                    "output": output,
                    "generation": generation.to_ascii_lowercase(),
                    "from_sequence": map.from_sequence,
                    "to_sequence": map.to_sequence,
                    "block_size": map.block_size,
                    "device_size": map.device_size,
                    "ranges": map.ranges.len(),
                    "bytes_changed": map.ranges.iter().map(|(_, n)| n * bs).sum::<u64>(),
                }));
            }
            Ok(exit::OK)
        }
        Command::Demo { dir, common } => demo::run(&dir, common.json),
        Command::Cbt(cmd) => tracking::run(cmd),
        Command::Snapshot(cmd) => snapshot::run(cmd),
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

fn export(repo: &Repository, point: &Point, output: &Path, quiet: bool) -> Result<()> {
    if output.exists() {
        bail!(
            "{} already exists: choose another --output",
            output.display()
        );
    }
    // Written under a hidden name beside the output and renamed when complete, so a
    // killed export never leaves a file that looks finished.
    let name = output
        .file_name()
        .context("--output must name a file")?
        .to_string_lossy();
    let tmp = output.with_file_name(format!(".{name}.bkimg-partial"));
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let bar = Bar::new(quiet);
    bkimg_format::progress::Progress::begin(&bar, "export", 0);
    let result = (|| -> Result<()> {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        repo.export(point, &mut w, &mut |n| {
            bkimg_format::progress::Progress::advance(&bar, n)
        })?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        std::fs::rename(&tmp, output)?;
        Ok(())
    })();
    bar.finish();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn confirm_devices(req: &RestoreRequest, point: &Point, yes: bool) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    for (disk, path) in &req.targets {
        let is_dev = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        if !is_dev || yes {
            continue;
        }
        if !std::io::stdin().is_terminal() {
            return Err(exit::Refused(format!(
                "{} is a block device: add --yes to overwrite it (not asking: stdin is not a terminal)",
                path.display()
            ))
            .into());
        }
        eprint!(
            "Overwrite ALL data on {} with {} of restore point {}? Type 'yes': ",
            path.display(),
            disk,
            point.manifest.id
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            return Err(
                exit::Refused(format!("not confirmed: {} left untouched", path.display())).into(),
            );
        }
    }
    Ok(())
}

fn point_summary(p: &Point) -> serde_json::Value {
    let m = &p.manifest;
    json!({
        "id": m.id,
        "parent": m.parent.as_ref().map(|p| &p.id),
        "created": m.created,
        "host": m.host,
        "tool": m.tool,
        "manifest_sha256": p.manifest_sha256.to_hex(),
        "size": m.disks.iter().map(|d| d.size).sum::<u64>(),
        "stored_new": m.disks.iter().flat_map(|d| &d.volumes).map(|v| match v.content {
            Content::Data { bytes_stored_new, .. } => bytes_stored_new,
            Content::Swap { .. } => 0,
        }).sum::<u64>(),
        "disks": m.disks.iter().map(|d| json!({
            "name": d.name, "source": d.source, "size": d.size,
            "table": match &d.table {
                PartitionTable::None => "none",
                PartitionTable::Gpt(_) => "gpt",
                PartitionTable::Msdos(_) => "msdos",
            },
        })).collect::<Vec<_>>(),
    })
}

fn print_info(m: &Manifest, p: &Point) {
    out(&format!("restore point {}", m.id));
    out(&format!(
        "  created   {} on {} by {}",
        m.created, m.host, m.tool
    ));
    out(&format!(
        "  parent    {}",
        m.parent
            .as_ref()
            .map_or("none (full)".to_string(), |p| p.id.clone())
    ));
    out(&format!("  manifest  sha256 {}", p.manifest_sha256));
    out(&format!(
        "  chunks    {} KiB, zstd level {}",
        m.chunk_size / 1024,
        m.compression.level
    ));
    for d in &m.disks {
        let table = match &d.table {
            PartitionTable::None => "no partition table".to_string(),
            PartitionTable::Gpt(g) => format!("GPT, disk GUID {}", g.disk_guid),
            PartitionTable::Msdos(t) => format!("msdos, signature {:08x}", t.disk_signature),
        };
        out(&format!(
            "  {} {} ({}, {} B sectors): {table}",
            d.name,
            d.source,
            HumanBytes(d.size),
            d.logical_sector_size
        ));
        for v in &d.volumes {
            let fs = v.filesystem.as_ref().map_or(String::new(), |f| {
                format!(
                    " {} {}{}",
                    f.fs_type,
                    f.uuid.as_deref().unwrap_or(""),
                    f.label
                        .as_ref()
                        .map_or(String::new(), |l| format!(" \"{l}\""))
                )
            });
            let content = match &v.content {
                Content::Data {
                    mode,
                    bytes_data,
                    bytes_stored_new,
                    ..
                } => format!(
                    "{mode}, {} data, {} stored new",
                    HumanBytes(*bytes_data),
                    HumanBytes(*bytes_stored_new)
                ),
                Content::Swap { .. } => "swap (recreated on restore)".into(),
            };
            out(&format!(
                "    {:<6} at {:>12}  {:>10}{fs}  [{content}]",
                v.name,
                v.offset,
                HumanBytes(v.size)
            ));
        }
    }
}

fn print_plan(point: &Point, plan: &[bkimg_restore::DiskPlan]) {
    out(&format!(
        "restore point {} (dry run: nothing is written)",
        point.manifest.id
    ));
    for d in plan {
        out(&format!(
            "  {} -> {} (needs {}), partition table: {}",
            d.disk,
            d.target,
            HumanBytes(d.source_size),
            d.table
        ));
        for v in &d.volumes {
            out(&format!(
                "    {:<6} at {:>12} {:>10}: {}",
                v.volume,
                v.target_offset,
                HumanBytes(v.size),
                v.action
            ));
        }
    }
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
            let Command::List { mut repo, .. } = cli.command else {
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
        assert_eq!(args.threads, Some(3));
        let cli =
            Cli::try_parse_from(["bkimg", "capture", "--repo", "/r", "--chunk-kib", "64", "x"])
                .unwrap();
        let Command::Capture { chunk_kib, .. } = cli.command else {
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
