//! SIGINT and SIGTERM for the commands without finer handling of their own (a live
//! capture releases its snapshot first, continuous replication finishes its cycle): the
//! first signal ends the command at once with exit code 130 and one line saying what it
//! leaves behind. Stopping at any instant is safe because every writer is crash-safe
//! (spec/format.md §11; tests/tests/crash.rs kills each at every write-side system call).

use anyhow::{anyhow, Result};

/// Blocks SIGINT and SIGTERM in this thread (and in every thread started after it), and
/// waits for them in a thread of its own. Call before any other thread starts.
pub fn exit_on_signal(leaves: &'static str) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| anyhow!("cannot block SIGINT and SIGTERM: {e}"))?;
    std::thread::spawn(move || loop {
        if let Ok(sig) = set.wait() {
            let partial = PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
            for path in partial.iter() {
                let _ = std::fs::remove_file(path);
            }
            eprintln!("bkimg: {sig}: interrupted: {leaves}");
            std::process::exit(crate::exit::INTERRUPTED);
        }
    });
    Ok(())
}

/// Files removed when a signal ends the command (a partial output under a hidden name).
static PARTIAL: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes `path` if a signal ends the command before [`finish_partial`] is called for it.
pub fn remove_on_signal(path: &std::path::Path) {
    PARTIAL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.to_path_buf());
}

/// Runs `finish` (which renames `path` into place or removes it) where no signal can
/// remove `path` meanwhile, and forgets it.
pub fn finish_partial<T>(path: &std::path::Path, finish: impl FnOnce() -> T) -> T {
    let mut partial = PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = finish();
    partial.retain(|p| p != path);
    out
}

/// What a stopped command leaves, by command.
pub fn leaves(command: &crate::Command) -> Option<&'static str> {
    use crate::Command as C;
    Some(match command {
        C::Capture(args) if !args.live.live => {
            "a restore point appears only once complete; run the capture again"
        }
        C::Restore(_) => {
            "the target is partly written and will not boot as it is; run the restore again"
        }
        C::Verify(_) => "nothing was changed; verification did not finish",
        C::Export(_) => "the export was not finished (its partial file is removed); run it again",
        C::Prune(_) => {
            "the repository stays consistent; run prune again to free what it had not freed yet"
        }
        C::Replicate(args) if !args.continuous.continuous => {
            "the target shows only complete restore points; run it again to resume"
        }
        C::Changemap(_) => "run the command again",
        C::Rescue(_) => "no image was written; run the build again",
        _ => return None,
    })
}
