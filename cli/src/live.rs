//! `bkimg capture --live`: the command-line side of a live capture (see
//! `bkimg_capture::live` for the session itself): its options, SIGINT/SIGTERM, and the
//! `live` part of the report.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use bkimg_capture::live::{human_bytes, Interrupter, Interruption, LiveOptions, LiveReport};
use bkimg_capture::live::{Session, SnapshotControl};
use bkimg_capture::{CaptureOptions, Progress};
use bkimg_format::repo::Point;
use bkimg_kmod::Control;
use clap::Args;
use serde_json::{json, Value};

use crate::exit::Interrupted;

/// `capture` options for a live capture.
#[derive(Args)]
pub struct LiveArgs {
    /// Capture running disks from a live snapshot (bksnap kernel module): consistent,
    /// while they stay in use. Incrementals use the module's change tracking.
    #[arg(long, conflicts_with = "changed_blocks")]
    pub live: bool,
    /// Difference store file to create for the snapshot and remove afterwards; best on
    /// another disk than those captured (ext4 or XFS) [default: /var/tmp/bkimg-live-PID.store].
    #[arg(long, value_name = "FILE", requires = "live")]
    pub store: Option<PathBuf>,
    /// Initial store size; also the step it grows by when it runs low (e.g. 512M, 2G)
    /// [default: 1G].
    #[arg(long, value_name = "SIZE", requires = "live", value_parser = crate::units::size)]
    pub store_size: Option<u64>,
    /// The store never grows past this [default: 4 x --store-size].
    #[arg(long, value_name = "SIZE", requires = "live", value_parser = crate::units::size)]
    pub max_store: Option<u64>,
    /// Shell command run just before the snapshot (e.g. flush a database); failing aborts.
    #[arg(long, value_name = "CMD", requires = "live")]
    pub pre_freeze: Option<String>,
    /// Shell command run just after the snapshot (also when taking it failed).
    #[arg(long, value_name = "CMD", requires = "live")]
    pub post_freeze: Option<String>,
}

impl LiveArgs {
    pub fn options(&self) -> LiveOptions {
        LiveOptions {
            store: self.store.clone(),
            store_size: self.store_size,
            max_store: self.max_store,
            pre_freeze: self.pre_freeze.clone(),
            post_freeze: self.post_freeze.clone(),
        }
    }
}

/// With `--live`: takes the snapshot and points `opts` at its images. Without: nothing.
pub fn start(
    args: &LiveArgs,
    opts: &mut CaptureOptions,
    parent: Option<&Point>,
    progress: &dyn Progress,
) -> Result<Option<Session>> {
    if !args.live {
        return Ok(None);
    }
    let mut session = Session::new(
        &args.options(),
        &opts.sources,
        || Ok(Arc::new(Control::open()?) as Arc<dyn SnapshotControl>),
        Arc::new(|line: &str| eprintln!("bkimg: {line}")),
    )?;
    handle_signals(session.interrupter())?;
    session.start(opts, parent, progress)?;
    Ok(Some(session))
}

/// Releases the snapshot; the `live` part of the JSON report.
pub fn finish(session: Session) -> Value {
    report_json(&session.finish())
}

fn report_json(r: &LiveReport) -> Value {
    if let Some(used) = r.store_used {
        eprintln!(
            "bkimg: snapshot {} released: {} of {} store used ({} chunks copied)",
            r.snapshot,
            human_bytes(used),
            human_bytes(r.store_size),
            r.copied_chunks.unwrap_or(0)
        );
    }
    json!({
        "snapshot": r.snapshot,
        "store": r.store,
        "store_size": r.store_size,
        "store_used": r.store_used,
        "store_grown": r.store_grown,
        "copied_chunks": r.copied_chunks,
        "disks": r.disks.iter().enumerate().map(|(i, d)| json!({
            "disk": format!("disk{i}"),
            "device": d.device,
            "image": d.image,
            "generation": d.generation,
            "sequence": d.sequence,
            "change_map": d.change_map.as_ref().map_or(Value::Null, |m| json!({
                "from_sequence": m.from_sequence,
                "to_sequence": m.to_sequence,
                "ranges": m.ranges,
                "bytes": m.bytes,
            })),
        })).collect::<Vec<_>>(),
        "notes": r.notes,
    })
}

/// SIGINT and SIGTERM go to a thread of their own (blocked everywhere else; the threads
/// started later inherit that). The first releases the snapshot, which ends the capture
/// reading it (it then fails with "interrupted" and commits nothing); a second one exits
/// at once. A signal while the manifest is written waits for it.
fn handle_signals(session: Interrupter) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| anyhow!("cannot block SIGINT and SIGTERM: {e}"))?;
    std::thread::spawn(move || {
        let mut count = 0;
        loop {
            let Ok(sig) = set.wait() else { continue };
            count += 1;
            session.interrupt(
                |what| match what {
                    Interruption::Committing => eprintln!(
                        "bkimg: {sig}: the restore point is being committed; finishing that first"
                    ),
                    Interruption::Releasing(id) => {
                        eprintln!("bkimg: {sig}: releasing snapshot {id}; nothing is committed")
                    }
                    _ => {}
                },
                |what| match what {
                    Interruption::Committing => {}
                    Interruption::Done => std::process::exit(crate::exit::INTERRUPTED),
                    _ if count >= 2 => {
                        if let Some(kept) = session.remove_store() {
                            eprintln!(
                                "bkimg: warning: the store {} is kept, as the snapshot may still \
                                 write to it: remove it after `bkimg snapshot list` shows no \
                                 snapshot using it (or `bkimg snapshot destroy ID` succeeded)",
                                kept.display()
                            );
                        }
                        eprintln!("bkimg: error: {}", Interrupted);
                        std::process::exit(crate::exit::INTERRUPTED);
                    }
                    _ => {}
                },
            );
        }
    });
    Ok(())
}
