//! `bkimg cbt`: changed-block tracking of block devices (the bksnap module).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bkimg_kmod::{Binding, Control, SavedTracker, SectorRange, TrackerState};
use clap::Subcommand;
use serde_json::{json, Value};

use indicatif::HumanBytes;

use crate::{exit, out, out_json, Common};

#[derive(Subcommand)]
pub enum CbtCommand {
    /// Start tracking writes to DEV (a new generation).
    Attach {
        #[arg(value_name = "DEV")]
        device: PathBuf,
        /// Tracking block size (power of two, at least the device's sector size; default:
        /// the module's choice, at least 4K with a table of at most 4 MiB).
        #[arg(long, value_name = "SIZE", value_parser = crate::units::size_u32)]
        block_size: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
    /// Stop tracking DEV. With --save, write its state to FILE for `cbt restore` at the
    /// next boot (do this at shutdown, once DEV's filesystems are read-only), with DEV's
    /// identity and a fingerprint of its content.
    Detach {
        #[arg(value_name = "DEV")]
        device: PathBuf,
        /// Where to save the state (on a filesystem of an untracked device).
        #[arg(long, value_name = "FILE")]
        save: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Resume tracking DEV from a state saved by `cbt detach --save` (do this at boot,
    /// before DEV is mounted read-write). FILE is removed: a state is used once. Refused
    /// (exit 7, FILE left in place) if DEV is not the device saved or was written since.
    Restore {
        #[arg(value_name = "DEV")]
        device: PathBuf,
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Show every tracker, or DEV's.
    Status {
        #[arg(value_name = "DEV")]
        device: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Write a change map of DEV: the blocks written after snapshot --from (for
    /// `capture --changed-blocks`).
    Map {
        #[arg(value_name = "DEV")]
        device: PathBuf,
        /// The snapshot the previous capture was taken at (its recorded tracking sequence).
        #[arg(long, value_name = "SEQ")]
        from: u64,
        /// The snapshot this map ends at (default: the latest one taken).
        #[arg(long, value_name = "SEQ")]
        to: Option<u64>,
        /// File to write (replaced if it exists).
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
        /// Refuse (exit 7) unless the tracker is at this generation (32 hex digits): the
        /// one the previous capture recorded.
        #[arg(long, value_name = "HEX")]
        generation: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Mark sectors of DEV as written (changes that did not go through the block layer).
    Mark {
        #[arg(value_name = "DEV")]
        device: PathBuf,
        /// First sector and number of 512-byte sectors; repeat for more ranges.
        #[arg(long = "range", value_name = "SECTOR:SECTORS", required = true)]
        ranges: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
}

pub fn run(cmd: CbtCommand) -> Result<i32> {
    let control = Control::open()?;
    match cmd {
        CbtCommand::Attach {
            device,
            block_size,
            common,
        } => {
            let bs = match block_size {
                Some(b) => Some(b)
                    .filter(|b| b.is_power_of_two() && *b >= 512)
                    .context("--block-size must be a power of two from 512 to 1G")?,
                None => 0,
            };
            let state = control.attach(&device, bs)?;
            report(&state, &common, "tracking");
        }
        CbtCommand::Detach {
            device,
            save,
            common,
        } => {
            let mut bound = String::new();
            let state = match &save {
                None => control.detach(&device)?,
                Some(path) => {
                    // Fingerprinted before the detach: a write in between is in the table
                    // (and if it changes a fingerprinted region, the restore refuses the
                    // state); fingerprinted after, such a write would be in neither.
                    let dev = bkimg_kmod::DevNum::of_block_device(&device)?;
                    let binding = Binding::of_device(dev).with_context(|| {
                        format!("{} was not detached: tracking continues", device.display())
                    })?;
                    let mut saved = control.detach_save(&device)?;
                    bound = describe_binding(&binding);
                    saved.binding = Some(binding);
                    if let Err(e) = saved.write_to(path) {
                        // Not lost: tracking goes on as if nothing happened.
                        let back = control.attach_restore(saved.dev, &saved);
                        let what = match back {
                            Ok(_) => "tracking continues",
                            Err(_) => "the tracked state is lost (the next capture reads it whole)",
                        };
                        return Err(anyhow::Error::new(e)
                            .context(format!("{} was not detached: {what}", device.display())));
                    }
                    control_state_of(&saved)
                }
            };
            if common.json {
                let mut v = state_json(&state);
                v["saved"] = json!(save);
                out_json(&v);
            } else {
                eprintln!(
                    "stopped tracking {} at generation {} sequence {}{}",
                    state.dev.describe(),
                    state.generation_hex(),
                    state.sequence,
                    save.map_or(String::new(), |p| format!(
                        "; state saved to {} ({bound})",
                        p.display()
                    ))
                );
            }
        }
        CbtCommand::Restore {
            device,
            file,
            common,
        } => {
            let state = control.restore_from_file(&device, &file)?;
            report(&state, &common, "tracking resumed for");
        }
        CbtCommand::Status { device, common } => {
            let states = match &device {
                Some(d) => vec![control.read(d, false)?],
                None => control.trackers()?,
            };
            if common.json {
                match device {
                    Some(_) => out_json(&state_json(&states[0])),
                    None => out_json(&Value::Array(states.iter().map(state_json).collect())),
                }
            } else {
                out(&format!(
                    "{:<22} {:>8} {:>10} {:<32} {:>4} {:>8} {:>10}",
                    "DEVICE", "BLOCK", "SIZE", "GENERATION", "SEQ", "SNAPSHOT", "WRITES"
                ));
                for s in &states {
                    out(&format!(
                        "{:<22} {:>8} {:>10} {:<32} {:>4} {:>8} {:>10}",
                        s.dev.describe(),
                        HumanBytes(u64::from(s.block_size)),
                        HumanBytes(s.device_size()),
                        s.generation_hex(),
                        s.sequence,
                        s.snapshot_id.map_or("-".into(), |i| i.to_string()),
                        s.writes
                    ));
                }
            }
        }
        CbtCommand::Map {
            device,
            from,
            to,
            output,
            generation,
            common,
        } => {
            let state = control.read(&device, true)?;
            if let Some(g) = &generation {
                state.check_generation(g)?;
            }
            // The latest snapshot taken; never the active sequence: writes still to come
            // in it would be in neither this map nor the next one (which starts at `to`).
            let to = to.unwrap_or(state.sequence.saturating_sub(1));
            let map = bkimg_kmod::change_map(&state, from, to)?;
            bkimg_kmod::write_atomic(&output, &map.encode())
                .with_context(|| format!("cannot write {}", output.display()))?;
            let bytes: u64 = map.byte_ranges().map(|r| r.end - r.start).sum();
            if common.json {
                out_json(&json!({
                    "output": output,
                    "device": device,
                    "generation": map.generation_hex(),
                    "from_sequence": map.from_sequence,
                    "to_sequence": map.to_sequence,
                    "block_size": map.block_size,
                    "device_size": map.device_size,
                    "ranges": map.ranges.len(),
                    "bytes_changed": bytes,
                }));
            } else {
                eprintln!(
                    "{}: {} changed in {} range(s) after snapshot {from} (generation {}), written to {}",
                    device.display(),
                    HumanBytes(bytes),
                    map.ranges.len(),
                    map.generation_hex(),
                    output.display()
                );
            }
        }
        CbtCommand::Mark {
            device,
            ranges,
            common,
        } => {
            let parsed = ranges
                .iter()
                .map(|r| {
                    r.split_once(':')
                        .and_then(|(s, n)| {
                            Some(SectorRange {
                                sector: s.trim().parse().ok()?,
                                sectors: n.trim().parse().ok()?,
                            })
                        })
                        .filter(|r| r.sectors > 0)
                        .with_context(|| {
                            format!("--range {r:?} is not SECTOR:SECTORS (512-byte sectors, at least 1)")
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            if parsed.is_empty() {
                bail!("give at least one --range");
            }
            control.mark(&device, &parsed)?;
            if common.json {
                out_json(&json!({ "device": device, "ranges": parsed.len() }));
            } else {
                eprintln!("{}: {} range(s) marked", device.display(), parsed.len());
            }
        }
    }
    Ok(exit::OK)
}

/// "bound to serial, wwid and the content of 3 regions" for the detach message.
fn describe_binding(b: &Binding) -> String {
    let keys: Vec<&str> = b.identity.iter().map(|(k, _)| k.as_str()).collect();
    let id = match keys.len() {
        0 => "no identity found: bound by content only".to_string(),
        _ => format!("bound to its {}", keys.join(", ")),
    };
    format!("{id}; fingerprint of {} region(s)", b.regions.len())
}

/// The state a detach with SAVE returned, without its table.
fn control_state_of(s: &SavedTracker) -> TrackerState {
    TrackerState {
        dev: s.dev,
        block_size: s.block_size,
        device_sectors: s.device_sectors,
        blocks: s.table.len() as u64,
        generation: s.generation,
        sequence: s.sequence,
        snapshot_id: None,
        writes: 0,
        table: None,
    }
}

fn report(state: &TrackerState, common: &Common, what: &str) {
    if common.json {
        out_json(&state_json(state));
    } else {
        eprintln!(
            "{what} {}: generation {}, sequence {}, {} blocks of {}",
            state.dev.describe(),
            state.generation_hex(),
            state.sequence,
            state.blocks,
            HumanBytes(u64::from(state.block_size))
        );
    }
}

pub fn state_json(s: &TrackerState) -> Value {
    json!({
        "device": s.dev.path(),
        "dev": s.dev.to_string(),
        "block_size": s.block_size,
        "device_size": s.device_size(),
        "blocks": s.blocks,
        "generation": s.generation_hex(),
        "sequence": s.sequence,
        "snapshot": s.snapshot_id,
        "writes": s.writes,
    })
}
