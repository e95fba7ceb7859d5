//! Growing a snapshot's difference store while it runs low, up to a limit (shared by a
//! live capture and `bkimg snapshot watch`).

use std::sync::Mutex;
use std::time::Duration;

use bkimg_kmod::{ErrorKind, EventKind, SnapshotState, StoreFile};

use super::control::{failure_text, human_bytes, SnapshotControl};

/// How a watched snapshot is doing.
pub enum Step {
    Running,
    Failed(String),
    /// Destroyed.
    Gone,
}

/// Grows a snapshot's store when it runs low, up to a limit. What it does and warnings
/// go to `log` as lines for a person.
pub struct Grower<'a> {
    control: &'a dyn SnapshotControl,
    id: u64,
    store: &'a Mutex<Option<StoreFile>>,
    grow_by: u64,
    max: u64,
    log: &'a (dyn Fn(&str) + Sync),
    pub grown: u64,
    at_limit: bool,
}

impl<'a> Grower<'a> {
    pub fn new(
        control: &'a dyn SnapshotControl,
        id: u64,
        store: &'a Mutex<Option<StoreFile>>,
        grow_by: u64,
        max: u64,
        log: &'a (dyn Fn(&str) + Sync),
    ) -> Grower<'a> {
        Grower {
            control,
            id,
            store,
            grow_by,
            max,
            log,
            grown: 0,
            at_limit: false,
        }
    }

    /// Waits up to `timeout` for an event of this snapshot, then acts. The snapshot's
    /// state is also read every time, and the store grown when its free space is at or
    /// below the low-water mark, event or not (an event dropped from a full queue is not
    /// missed).
    pub fn step(&mut self, timeout: Duration) -> Step {
        match self.control.wait_event(timeout, self.id) {
            Ok(Some(ev)) if ev.snapshot_id == self.id && ev.kind == EventKind::LowSpace => {
                self.grow()
            }
            Ok(_) => {}
            Err(e) => {
                (self.log)(&format!("warning: {e}"));
                std::thread::sleep(timeout);
            }
        }
        match self.control.info(self.id) {
            Err(e) if e.kind() == ErrorKind::NotFound => Step::Gone,
            Err(e) => {
                (self.log)(&format!("warning: {e}"));
                Step::Running
            }
            Ok(info) if info.state == SnapshotState::Failed => Step::Failed(failure_text(&info)),
            Ok(info) => {
                let free = info.store_sectors.saturating_sub(info.store_used_sectors);
                if free <= info.low_water_sectors {
                    self.grow();
                }
                Step::Running
            }
        }
    }

    fn grow(&mut self) {
        let mut guard = self.store.lock().expect("store lock");
        let Some(file) = guard.as_mut() else { return };
        let room = self.max.saturating_sub(file.size());
        if room < bkimg_kmod::STORE_ALIGN {
            if !self.at_limit {
                (self.log)(&format!(
                    "warning: the store of snapshot {} is running low and at its limit \
                     ({}); the snapshot fails if it fills up",
                    self.id,
                    human_bytes(file.size())
                ));
                self.at_limit = true;
            }
            return;
        }
        let by = self.grow_by.min(room);
        let added = file
            .grow(by)
            .map_err(anyhow::Error::from)
            .and_then(|extents| Ok(self.control.store_add(self.id, &extents)?));
        match added {
            Ok(()) => {
                self.grown += 1;
                (self.log)(&format!(
                    "store of snapshot {} grown to {} ({})",
                    self.id,
                    human_bytes(file.size()),
                    file.path().display()
                ));
            }
            Err(e) => {
                // Not again: growing failed for a reason more tries will not fix.
                (self.log)(&format!(
                    "warning: cannot grow the store of snapshot {}: {e:#}",
                    self.id
                ));
                self.max = file.size();
                self.at_limit = true;
            }
        }
    }
}
