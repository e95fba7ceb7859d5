//! `bkimg snapshot`: live copy-on-write snapshots of block devices (the bksnap module).
//! Store growth (`snapshot watch`) is the one a live capture uses, from
//! `bkimg_capture::live`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Result};
use bkimg_capture::live::{failure_text, store_overlaps, wait_for_images, Grower, Step};
use bkimg_kmod::{Control, ErrorKind, SnapshotInfo, SnapshotOptions, SnapshotState, StoreFile};
use clap::Subcommand;
use serde_json::{json, Value};

use indicatif::HumanBytes;

use crate::{exit, out, out_json, Common};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take one snapshot of DEVs at one instant: each gets a read-only image
    /// /dev/bksnapID-N holding its content of that instant, until `snapshot destroy`.
    Create {
        /// Block devices (disks or partitions), 1 to 16.
        #[arg(required = true, value_name = "DEV")]
        devices: Vec<PathBuf>,
        /// Difference store: a new file (not on btrfs/tmpfs) that receives the old data of
        /// blocks written while the snapshot lives. Kept until `snapshot destroy --store`.
        #[arg(long, value_name = "FILE")]
        store: PathBuf,
        /// Size of the store (e.g. 2G, 512MiB); rounded up to MiB.
        #[arg(long, value_name = "SIZE", value_parser = crate::units::size)]
        store_size: u64,
        /// Copy-on-write unit: a power of two from 4K to 1M (default 64K).
        #[arg(long, value_name = "SIZE", value_parser = crate::units::size)]
        chunk_size: Option<u64>,
        /// Do not freeze the filesystems: the images are only crash-consistent.
        #[arg(long)]
        no_freeze: bool,
        #[command(flatten)]
        common: Common,
    },
    /// List snapshots.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Show one snapshot: state, store use, devices and their images.
    Info {
        id: u64,
        #[command(flatten)]
        common: Common,
    },
    /// End a snapshot: its images disappear, its store is no longer used.
    Destroy {
        id: u64,
        /// Also remove this store file (the one given to `snapshot create`).
        #[arg(long, value_name = "FILE")]
        store: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Wait for a snapshot's events: grow its store when it runs low, up to a limit;
    /// report a failure. Ends when the snapshot fails or is destroyed.
    Watch {
        id: u64,
        /// The snapshot's store file (as given to `snapshot create`).
        #[arg(long, value_name = "FILE")]
        store: PathBuf,
        /// How much to add each time the store runs low (e.g. 1G).
        #[arg(long, value_name = "SIZE", value_parser = crate::units::size)]
        grow_by: u64,
        /// Never let the store file grow past this size.
        #[arg(long, value_name = "SIZE", value_parser = crate::units::size)]
        max_store: u64,
        #[command(flatten)]
        common: Common,
    },
}

pub fn run(cmd: SnapshotCommand) -> Result<i32> {
    match cmd {
        SnapshotCommand::Create {
            devices,
            store,
            store_size,
            chunk_size,
            no_freeze,
            common,
        } => {
            let control = Control::open()?;
            let size = store_size;
            let chunk_sectors = match chunk_size {
                Some(bytes) => {
                    if !bytes.is_power_of_two() || !(4096..=1 << 20).contains(&bytes) {
                        bail!("--chunk-size must be a power of two from 4K to 1M");
                    }
                    (bytes / 512) as u32
                }
                None => 0,
            };
            let nums = devices
                .iter()
                .map(|d| Ok(bkimg_kmod::DevNum::of_block_device(d)?))
                .collect::<Result<Vec<_>>>()?;
            if let Some(on) = store_overlaps(&store, &nums) {
                eprintln!(
                    "bkimg: note: the store {} is on {}, which is snapshotted: its image holds \
                     the (empty) store file",
                    store.display(),
                    on.describe()
                );
            }
            let mut file = StoreFile::create(&store, size)?;
            let id = control.create(
                &nums,
                file.extents(),
                SnapshotOptions {
                    chunk_sectors,
                    low_water_sectors: 0,
                    no_freeze,
                },
            )?;
            // The snapshot outlives this process; so does its store.
            file.keep(true);
            let info = control.info(id)?;
            wait_for_images(&info)?;
            if common.json {
                let mut v = info_json(&info);
                v["store"] = json!(store);
                out_json(&v);
            } else {
                for d in &info.devs {
                    eprintln!(
                        "snapshot {id}: {} -> {} (read-only image)",
                        d.dev.describe(),
                        d.image_path.display()
                    );
                }
                eprintln!(
                    "store {} ({}); when done: bkimg snapshot destroy {id} --store {}",
                    store.display(),
                    HumanBytes(file.size()),
                    store.display()
                );
                out(&id.to_string());
            }
            Ok(exit::OK)
        }
        SnapshotCommand::List { common } => {
            let control = Control::open()?;
            let mut infos = Vec::new();
            for id in control.snapshots()? {
                match control.info(id) {
                    Ok(i) => infos.push(i),
                    // Destroyed between the list and the look.
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if common.json {
                out_json(&Value::Array(infos.iter().map(info_json).collect()));
            } else {
                out(&format!(
                    "{:<6} {:<7} {:>10} {:>10}  DEVICES",
                    "ID", "STATE", "STORE", "USED"
                ));
                for i in &infos {
                    out(&format!(
                        "{:<6} {:<7} {:>10} {:>10}  {}",
                        i.id,
                        state_name(i.state),
                        HumanBytes(i.store_sectors * 512),
                        HumanBytes(i.store_used_sectors * 512),
                        i.devs
                            .iter()
                            .map(|d| format!("{}={}", dev_name(d.dev), d.image_path.display()))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ));
                }
            }
            Ok(exit::OK)
        }
        SnapshotCommand::Info { id, common } => {
            let control = Control::open()?;
            let info = control.info(id)?;
            if common.json {
                out_json(&info_json(&info));
            } else {
                print_info(&info);
            }
            Ok(exit::OK)
        }
        SnapshotCommand::Destroy { id, store, common } => {
            // A store outlives its snapshot when destroying failed, or across a reboot;
            // it stays immutable until removed here. When the snapshot is already gone
            // the store is removed only if no snapshot at all is live (one of them could
            // be writing into it).
            let gone = match Control::open() {
                Ok(control) => match control.destroy(id) {
                    Ok(()) => None,
                    Err(e) if e.kind() == ErrorKind::NotFound && store.is_some() => {
                        let live = control.snapshots()?;
                        if !live.is_empty() {
                            let path = store.as_deref().unwrap_or(Path::new("")).display();
                            bail!(
                                "{e}; snapshot(s) {live:?} are live and one may write into \
                                 {path}: destroy them first (or, if sure none uses it, \
                                 `chattr -i {path}` and remove it)"
                            );
                        }
                        Some(format!("snapshot {id} no longer exists"))
                    }
                    Err(e) => return Err(e.into()),
                },
                Err(e) if e.kind() == ErrorKind::NotLoaded && store.is_some() => {
                    Some("the bksnap module is not loaded: no snapshot exists".to_string())
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(path) = &store {
                StoreFile::open(path)?.remove()?;
                if let Some(why) = &gone {
                    eprintln!("bkimg: {why}; its store {} is removed", path.display());
                }
            }
            if common.json {
                out_json(&json!({ "id": id, "destroyed": true, "store_removed": store }));
            } else {
                eprintln!("snapshot {id} destroyed");
            }
            Ok(exit::OK)
        }
        SnapshotCommand::Watch {
            id,
            store,
            grow_by,
            max_store,
            common,
        } => {
            let control = Control::open()?;
            let max = max_store;
            control.info(id)?;
            let file = Mutex::new(Some(StoreFile::open(&store)?));
            let log = |line: &str| eprintln!("bkimg: {line}");
            let mut grower = Grower::new(&control, id, &file, grow_by, max, &log);
            eprintln!(
                "bkimg: watching snapshot {id} (Ctrl-C to stop watching; the snapshot stays)"
            );
            let end = loop {
                match grower.step(Duration::from_secs(1)) {
                    Step::Running => continue,
                    end => break end,
                }
            };
            let size = file
                .lock()
                .expect("store lock")
                .as_ref()
                .map_or(0, |f| f.size());
            let (state, error) = match &end {
                Step::Failed(why) => ("failed", Some(why.clone())),
                _ => ("destroyed", None),
            };
            if common.json {
                out_json(&json!({
                    "id": id, "state": state, "error": error,
                    "store_size": size, "store_grown": grower.grown,
                }));
            } else if error.is_none() {
                eprintln!(
                    "snapshot {id} was destroyed; store grown {} time(s)",
                    grower.grown
                );
            }
            match end {
                Step::Failed(why) => bail!("{why}"),
                _ => Ok(exit::OK),
            }
        }
    }
}

fn state_name(s: SnapshotState) -> String {
    match s {
        SnapshotState::Active => "active".into(),
        SnapshotState::Failed => "failed".into(),
        SnapshotState::Unknown(n) => format!("state-{n}"),
    }
}

fn dev_name(dev: bkimg_kmod::DevNum) -> String {
    dev.path()
        .map_or_else(|| dev.to_string(), |p| p.display().to_string())
}

pub fn info_json(info: &SnapshotInfo) -> Value {
    json!({
        "id": info.id,
        "state": state_name(info.state),
        "error": info.error_text(),
        "store_size": info.store_sectors * 512,
        "store_used": info.store_used_sectors * 512,
        "low_water": info.low_water_sectors * 512,
        "chunk_size": u64::from(info.chunk_sectors) * 512,
        "copied_chunks": info.copied_chunks,
        "devices": info.devs.iter().map(|d| json!({
            "device": d.dev.path(),
            "dev": d.dev.to_string(),
            "image": d.image_path,
            "image_dev": d.image.to_string(),
            "size": d.sectors * 512,
            "generation": d.generation_hex(),
            "sequence": d.sequence,
        })).collect::<Vec<_>>(),
    })
}

fn print_info(info: &SnapshotInfo) {
    out(&format!(
        "snapshot {}: {}{}",
        info.id,
        state_name(info.state),
        if info.state == SnapshotState::Failed {
            format!(" ({})", failure_text(info))
        } else {
            String::new()
        }
    ));
    out(&format!(
        "  store  {} used of {} ({} chunks of {} copied; low-water mark {})",
        HumanBytes(info.store_used_sectors * 512),
        HumanBytes(info.store_sectors * 512),
        info.copied_chunks,
        HumanBytes(u64::from(info.chunk_sectors) * 512),
        HumanBytes(info.low_water_sectors * 512)
    ));
    for d in &info.devs {
        out(&format!(
            "  {} -> {} ({}), generation {} snapshot {}",
            d.dev.describe(),
            d.image_path.display(),
            HumanBytes(d.sectors * 512),
            d.generation_hex(),
            d.sequence
        ));
    }
}
