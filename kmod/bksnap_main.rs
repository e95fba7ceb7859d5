// SPDX-License-Identifier: GPL-2.0
//! bksnap: live copy-on-write snapshots and changed-block tracking of any block device.
//!
//! Userspace drives it through ioctls on /dev/bksnap (spec/kmod-uapi.md). The C shim
//! (shim.c) hooks writes and provides the block-layer plumbing; everything here decides.

use kernel::prelude::*;
use kernel::sync::{new_condvar, new_mutex, new_spinlock, Arc, CondVar, Mutex, SpinLock};
use kernel::uaccess::{UserPtr, UserSlice, UserSliceReader};

mod snapshot;
mod sys;
mod tracker;
mod uapi;

use snapshot::{Shared, SnapDev};
use tracker::{Saved, Tracker};

module! {
    type: Bksnap,
    name: "bksnap",
    author: "bkimg developers",
    description: "Live copy-on-write snapshots and changed-block tracking",
    license: "GPL",
}

struct Bksnap {
    _state: Arc<State>,
}

impl kernel::Module for Bksnap {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let events = Arc::pin_init(Events::new(), GFP_KERNEL)?;
        let state = Arc::pin_init(
            pin_init!(State {
                create <- new_mutex!((), "bksnap_create"),
                inner <- new_mutex!(Inner {
                    trackers: KVec::new(),
                    snapshots: KVec::new(),
                    next_id: 1,
                }, "bksnap_inner"),
                events,
            }),
            GFP_KERNEL,
        )?;
        sys::init(&state)?;
        pr_info!(
            "bksnap: loaded (uapi {}.{})\n",
            uapi::VERSION_MAJOR,
            uapi::VERSION_MINOR
        );
        Ok(Bksnap { _state: state })
    }
}

impl Drop for Bksnap {
    fn drop(&mut self) {
        // Trackers and snapshots hold module references: there are none left here.
        sys::exit();
        pr_info!("bksnap: unloaded\n");
    }
}

/// Events for userspace: the store running low, a snapshot failing.
#[pin_data]
pub(crate) struct Events {
    #[pin]
    queue: SpinLock<EventQueue>,
    #[pin]
    cv: CondVar,
}

const EVENT_SLOTS: usize = 64;

struct EventQueue {
    items: [uapi::EventArg; EVENT_SLOTS],
    head: usize,
    len: usize,
}

impl Events {
    fn new() -> impl PinInit<Self> {
        pin_init!(Events {
            queue <- new_spinlock!(EventQueue {
                items: [uapi::EventArg::default(); EVENT_SLOTS],
                head: 0,
                len: 0,
            }, "bksnap_events"),
            cv <- new_condvar!("bksnap_events_cv"),
        })
    }

    /// Queues an event; the oldest is dropped when the queue is full.
    pub(crate) fn push(&self, kind: u32, id: u64, error: i32, total: u64, used: u64) {
        let mut q = self.queue.lock();
        if q.len == EVENT_SLOTS {
            q.head = (q.head + 1) % EVENT_SLOTS;
            q.len -= 1;
        }
        let at = (q.head + q.len) % EVENT_SLOTS;
        q.items[at] = uapi::EventArg {
            kind,
            snapshot_id: id,
            error,
            store_sectors: total,
            store_used_sectors: used,
            ..Default::default()
        };
        q.len += 1;
        drop(q);
        self.cv.notify_all();
    }

    /// Takes the oldest event (of snapshot `id`, or of any if 0), waiting for one.
    fn wait(&self, timeout_ms: u32, id: u64) -> Result<uapi::EventArg> {
        let mut q = self.queue.lock();
        let mut left = kernel::time::msecs_to_jiffies(timeout_ms);
        loop {
            if let Some(ev) = q.take(id) {
                return Ok(ev);
            }
            if left == 0 {
                return Ok(uapi::EventArg {
                    kind: uapi::EVENT_NONE,
                    ..Default::default()
                });
            }
            match self.cv.wait_interruptible_timeout(&mut q, left) {
                kernel::sync::CondVarTimeoutResult::Signal { .. } => return Err(EINTR),
                kernel::sync::CondVarTimeoutResult::Timeout => left = 0,
                kernel::sync::CondVarTimeoutResult::Woken { jiffies } => left = jiffies,
            }
        }
    }
}

impl EventQueue {
    fn take(&mut self, id: u64) -> Option<uapi::EventArg> {
        let pos = (0..self.len)
            .find(|i| id == 0 || self.items[(self.head + i) % EVENT_SLOTS].snapshot_id == id)?;
        let ev = self.items[(self.head + pos) % EVENT_SLOTS];
        // Close the gap: later events move up one place.
        for i in pos..self.len - 1 {
            self.items[(self.head + i) % EVENT_SLOTS] =
                self.items[(self.head + i + 1) % EVENT_SLOTS];
        }
        self.len -= 1;
        Some(ev)
    }
}

struct Snapshot {
    shared: Arc<Shared>,
    devs: KVec<Arc<SnapDev>>,
}

struct Inner {
    trackers: KVec<Arc<Tracker>>,
    snapshots: KVec<Snapshot>,
    next_id: u64,
}

impl Inner {
    fn tracker(&self, major: u32, minor: u32) -> Option<Arc<Tracker>> {
        self.trackers
            .iter()
            .find(|t| t.major == major && t.minor == minor)
            .cloned()
    }

    fn snapshot(&self, id: u64) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.shared.id == id)
    }
}

#[pin_data]
pub(crate) struct State {
    /// Serialises everything that holds a device's writes back or ends its tracking:
    /// snapshot creation and destruction (which lock several devices), marking, detaching.
    /// So a tracker is never detached while its writes are held, nor a snapshot activated
    /// on a tracker being detached. Taken before `inner`.
    #[pin]
    create: Mutex<()>,
    #[pin]
    inner: Mutex<Inner>,
    events: Arc<Events>,
}

fn read<T: kernel::types::FromBytes>(arg: usize) -> Result<T> {
    UserSlice::new(arg as UserPtr, core::mem::size_of::<T>())
        .reader()
        .read::<T>()
}

fn write<T: kernel::types::AsBytes>(arg: usize, value: &T) -> Result {
    UserSlice::new(arg as UserPtr, core::mem::size_of::<T>())
        .writer()
        .write(value)
}

/// Reads `count` structures from a user array.
fn read_array<T: kernel::types::FromBytes>(ptr: u64, count: u32) -> Result<KVVec<T>> {
    let size = core::mem::size_of::<T>();
    let mut reader: UserSliceReader =
        UserSlice::new(ptr as UserPtr, size * count as usize).reader();
    let mut out = KVVec::with_capacity(count as usize, GFP_KERNEL)?;
    for _ in 0..count {
        out.push(reader.read::<T>()?, GFP_KERNEL)?;
    }
    Ok(out)
}

/// Writes a table from [`tracker_info`] to the caller's `table_ptr`.
fn write_table(a: &uapi::TrackerArg, table: Option<KVVec<u8>>) -> Result {
    match table {
        Some(table) => UserSlice::new(a.table_ptr as UserPtr, a.table_len as usize)
            .writer()
            .write_slice(&table),
        None => Ok(()),
    }
}

/// Removes the element at `pos` (KVec has no `remove` in 6.12).
fn remove_at<T>(v: &mut KVec<T>, pos: usize) -> Result<T> {
    let old = core::mem::replace(v, KVec::with_capacity(v.len(), GFP_KERNEL)?);
    let mut taken = None;
    for (i, x) in old.into_iter().enumerate() {
        if i == pos {
            taken = Some(x);
        } else {
            v.push(x, GFP_KERNEL)?;
        }
    }
    taken.ok_or(EINVAL)
}

/// Fills the output fields; returns the table if asked for.
fn tracker_info(
    t: &Tracker,
    out: &mut uapi::TrackerArg,
    with_table: bool,
) -> Result<Option<KVVec<u8>>> {
    let (generation, sequence, table) = t.state(with_table)?;
    out.block_size = t.block_size();
    out.device_sectors = t.sectors;
    out.blocks = t.blocks();
    out.generation = generation;
    out.sequence = sequence;
    out.writes = t.writes();
    out.snapshot_id = t.snapshot().map_or(0, |d| d.shared.id);
    Ok(table)
}

impl State {
    pub(crate) fn ioctl(&self, cmd: u32, arg: usize) -> Result {
        match cmd {
            uapi::IOC_VERSION => write(
                arg,
                &uapi::Version {
                    major: uapi::VERSION_MAJOR,
                    minor: uapi::VERSION_MINOR,
                    features: uapi::FEATURE_CBT | uapi::FEATURE_SNAPSHOT,
                    reserved: [0; 6],
                },
            ),
            uapi::IOC_TRACKER_ATTACH => self.attach(arg),
            uapi::IOC_TRACKER_DETACH => self.detach(arg),
            uapi::IOC_TRACKER_LIST => self.list_trackers(arg),
            uapi::IOC_TRACKER_READ => self.read_tracker(arg),
            uapi::IOC_TRACKER_MARK => self.mark(arg),
            uapi::IOC_SNAPSHOT_CREATE => self.create(arg),
            uapi::IOC_SNAPSHOT_DESTROY => self.destroy(arg),
            uapi::IOC_SNAPSHOT_INFO => self.info(arg),
            uapi::IOC_SNAPSHOT_LIST => self.list_snapshots(arg),
            uapi::IOC_STORE_ADD => self.store_add(arg),
            uapi::IOC_WAIT_EVENT => {
                let mut ev: uapi::EventArg = read(arg)?;
                if ev.kind != 0 || ev.reserved0 != 0 || !uapi::zero(&ev.reserved) {
                    return Err(EINVAL);
                }
                let (timeout, id) = (ev.timeout_ms, ev.snapshot_id);
                ev = self.events.wait(timeout, id)?;
                ev.timeout_ms = timeout;
                write(arg, &ev)
            }
            _ => Err(ENOTTY),
        }
    }

    fn attach(&self, arg: usize) -> Result {
        let mut a: uapi::TrackerArg = read(arg)?;
        if a.flags & !uapi::TRACKER_RESTORE != 0 || !uapi::zero(&a.reserved) {
            return Err(EINVAL);
        }
        let table;
        let saved = if a.flags & uapi::TRACKER_RESTORE != 0 {
            if a.table_len > 1 << 26 {
                return Err(EINVAL);
            }
            let mut buf = KVVec::with_capacity(a.table_len as usize, GFP_KERNEL)?;
            buf.extend_with(a.table_len as usize, 0u8, GFP_KERNEL)?;
            UserSlice::new(a.table_ptr as UserPtr, a.table_len as usize)
                .reader()
                .read_slice(&mut buf)?;
            table = buf;
            Some(Saved {
                generation: a.generation,
                sequence: a.sequence,
                table: &table,
            })
        } else {
            None
        };
        let mut inner = self.inner.lock();
        if inner.tracker(a.major, a.minor).is_some() {
            return Err(EEXIST);
        }
        let t = Tracker::attach(a.major, a.minor, a.block_size, saved)?;
        inner.trackers.push(t.clone(), GFP_KERNEL)?;
        drop(inner);
        tracker_info(&t, &mut a, false)?;
        write(arg, &a)
    }

    fn detach(&self, arg: usize) -> Result {
        let mut a: uapi::TrackerArg = read(arg)?;
        if a.flags & !uapi::TRACKER_SAVE != 0 || !uapi::zero(&a.reserved) {
            return Err(EINVAL);
        }
        let _create = self.create.lock();
        let mut inner = self.inner.lock();
        let pos = inner
            .trackers
            .iter()
            .position(|t| t.major == a.major && t.minor == a.minor)
            .ok_or(ENOENT)?;
        let t = inner.trackers[pos].clone();
        if t.snapshot().is_some() {
            return Err(EBUSY);
        }
        let save = a.flags & uapi::TRACKER_SAVE != 0;
        if save && a.table_len < t.blocks() {
            return Err(EINVAL);
        }
        remove_at(&mut inner.trackers, pos)?;
        drop(inner);
        // Detached first, then saved: no write can fall between the table and the end of
        // tracking. If the copy fails the table is lost, which only costs a full read.
        t.detach();
        let table = tracker_info(&t, &mut a, save)?;
        write_table(&a, table)?;
        write(arg, &a)
    }

    fn read_tracker(&self, arg: usize) -> Result {
        let mut a: uapi::TrackerArg = read(arg)?;
        if a.flags != 0 || !uapi::zero(&a.reserved) {
            return Err(EINVAL);
        }
        let t = self.inner.lock().tracker(a.major, a.minor).ok_or(ENOENT)?;
        if a.table_ptr != 0 && a.table_len < t.blocks() {
            return Err(EINVAL);
        }
        let with_table = a.table_ptr != 0;
        let table = tracker_info(&t, &mut a, with_table)?;
        write_table(&a, table)?;
        write(arg, &a)
    }

    fn list_trackers(&self, arg: usize) -> Result {
        let mut l: uapi::ListArg = read(arg)?;
        if l.capacity > uapi::MAX_LIST || !uapi::zero(&l.reserved) {
            return Err(EINVAL);
        }
        let trackers: KVec<Arc<Tracker>> = {
            let inner = self.inner.lock();
            let mut v = KVec::with_capacity(inner.trackers.len(), GFP_KERNEL)?;
            for t in inner.trackers.iter() {
                v.push(t.clone(), GFP_KERNEL)?;
            }
            v
        };
        let n = trackers.len().min(l.capacity as usize);
        let size = core::mem::size_of::<uapi::TrackerArg>();
        let mut w = UserSlice::new(l.ptr as UserPtr, n * size).writer();
        for t in trackers.iter().take(n) {
            let mut a = uapi::TrackerArg {
                major: t.major,
                minor: t.minor,
                ..Default::default()
            };
            tracker_info(t, &mut a, false)?;
            w.write(&a)?;
        }
        l.count = trackers.len() as u32;
        write(arg, &l)
    }

    fn mark(&self, arg: usize) -> Result {
        let m: uapi::MarkArg = read(arg)?;
        if m.count == 0 || m.count > uapi::MAX_MARK_RANGES || m.reserved0 != 0 || m.reserved != 0 {
            return Err(EINVAL);
        }
        let ranges: KVVec<uapi::Range> = read_array(m.ranges_ptr, m.count)?;
        let mut pairs = KVVec::with_capacity(ranges.len(), GFP_KERNEL)?;
        for r in ranges.iter() {
            pairs.push((r.sector, r.sectors), GFP_KERNEL)?;
        }
        let _create = self.create.lock();
        let t = self.inner.lock().tracker(m.major, m.minor).ok_or(ENOENT)?;
        t.mark_ranges(&pairs)
    }

    fn create(&self, arg: usize) -> Result {
        let mut c: uapi::CreateArg = read(arg)?;
        if c.flags & !uapi::CREATE_NO_FREEZE != 0 || c.id != 0 || !uapi::zero(&c.reserved) {
            return Err(EINVAL);
        }
        if c.dev_count == 0
            || c.dev_count > uapi::MAX_SNAPSHOT_DEVS
            || c.store_count == 0
            || c.store_count > uapi::MAX_STORE_EXTENTS
        {
            return Err(EINVAL);
        }
        let chunk_sectors = match c.chunk_sectors {
            0 => snapshot::DEFAULT_CHUNK_SECTORS,
            n if n.is_power_of_two() && (8..=2048).contains(&n) => n,
            _ => return Err(EINVAL),
        };
        let devs: KVVec<uapi::DevNum> = read_array(c.devs_ptr, c.dev_count)?;
        let extents: KVVec<uapi::Extent> = read_array(c.store_ptr, c.store_count)?;
        let store = snapshot::open_extents(&extents)?;
        let total: u64 = extents.iter().map(|e| e.sectors).sum();
        let low_water = if c.low_water_sectors == 0 {
            total / 4
        } else {
            c.low_water_sectors
        };

        let _create = self.create.lock();
        // Devices not tracked yet are attached for the snapshot (a new generation starts
        // with them); if it is not taken they are detached again.
        let mut attached = KVec::new();
        let freeze = c.flags & uapi::CREATE_NO_FREEZE == 0;
        let result = self.create_locked(
            &devs,
            store,
            (chunk_sectors, low_water, freeze),
            &mut attached,
        );
        if result.is_err() {
            for t in attached.iter() {
                let mut inner = self.inner.lock();
                if let Some(pos) = inner.trackers.iter().position(|x| Arc::ptr_eq(x, t)) {
                    // Cannot fail: the vector only shrinks.
                    let _ = remove_at(&mut inner.trackers, pos);
                }
                drop(inner);
                t.detach();
            }
        }
        c.id = result?;
        write(arg, &c)
    }

    /// Takes the snapshot (the `create` lock held); returns its id. Trackers it attaches
    /// are added to `attached`.
    fn create_locked(
        &self,
        devs: &[uapi::DevNum],
        store: KVec<Arc<snapshot::StoreExtent>>,
        (chunk_sectors, low_water, freeze): (u32, u64, bool),
        attached: &mut KVec<Arc<Tracker>>,
    ) -> Result<u64> {
        let mut trackers: KVec<Arc<Tracker>> = KVec::with_capacity(devs.len(), GFP_KERNEL)?;
        let id = {
            let mut inner = self.inner.lock();
            for d in devs.iter() {
                let t = match inner.tracker(d.major, d.minor) {
                    Some(t) => t,
                    None => {
                        attached.reserve(1, GFP_KERNEL)?;
                        inner.trackers.reserve(1, GFP_KERNEL)?;
                        let t = Tracker::attach(d.major, d.minor, 0, None)?;
                        inner.trackers.push(t.clone(), GFP_KERNEL)?;
                        attached.push(t.clone(), GFP_KERNEL)?;
                        t
                    }
                };
                if t.snapshot().is_some() {
                    return Err(EBUSY);
                }
                trackers.push(t, GFP_KERNEL)?;
            }
            // Room for the new snapshot now: nothing may fail after activation but the
            // image disks, which are undone.
            inner.snapshots.reserve(1, GFP_KERNEL)?;
            let id = inner.next_id;
            inner.next_id += 1;
            id
        };
        // No device twice, and none inside another (a partition and its whole disk, by
        // where they lie on the disk): each would copy on write into the store for the
        // other.
        for (i, a) in trackers.iter().enumerate() {
            let span = a.span();
            if trackers[i + 1..].iter().any(|b| span.overlaps(&b.span())) {
                return Err(EINVAL);
            }
        }
        let shared = Shared::new(
            id,
            chunk_sectors,
            low_water,
            store,
            self.events.clone(),
            kernel::time::Ktime::ktime_get().to_ns() as u64,
        )?;
        let mut snapdevs = KVec::with_capacity(trackers.len(), GFP_KERNEL)?;
        for (i, t) in trackers.iter().enumerate() {
            snapdevs.push(
                SnapDev::new(shared.clone(), t.clone(), i as u32)?,
                GFP_KERNEL,
            )?;
        }

        // The instant: filesystems frozen, writes held back and drained, then every device
        // starts copying on write at once.
        let frozen = if freeze { &trackers[..] } else { &[] };
        for (i, t) in frozen.iter().enumerate() {
            if let Err(e) = t.file.freeze() {
                frozen[..i].iter().for_each(|t| t.file.thaw());
                return Err(e);
            }
        }
        let result = activate(&trackers, &snapdevs);
        frozen.iter().for_each(|t| t.file.thaw());
        result?;

        for d in snapdevs.iter() {
            if let Err(e) = SnapDev::add_image(d) {
                deactivate(&snapdevs);
                return Err(e);
            }
        }
        self.inner.lock().snapshots.push(
            Snapshot {
                shared,
                devs: snapdevs,
            },
            GFP_KERNEL,
        )?;
        pr_info!(
            "bksnap: snapshot {} of {} device(s) taken\n",
            id,
            trackers.len()
        );
        Ok(id)
    }

    fn destroy(&self, arg: usize) -> Result {
        let a: uapi::SnapshotIdArg = read(arg)?;
        if a.reserved != 0 {
            return Err(EINVAL);
        }
        let _create = self.create.lock();
        let snap = {
            let mut inner = self.inner.lock();
            let pos = inner
                .snapshots
                .iter()
                .position(|s| s.shared.id == a.id)
                .ok_or(ENOENT)?;
            remove_at(&mut inner.snapshots, pos)?
        };
        deactivate(&snap.devs);
        // Store writes still queued hold the devices: let them finish first.
        sys::cow_flush();
        // Dropping the devices removes their image disks (waiting for reads in flight).
        drop(snap);
        pr_info!("bksnap: snapshot {} released\n", a.id);
        Ok(())
    }

    fn info(&self, arg: usize) -> Result {
        let mut a: uapi::InfoArg = read(arg)?;
        if a.reserved0 != 0 || !uapi::zero(&a.reserved) {
            return Err(EINVAL);
        }
        // Filled in kernel memory under `inner`, copied to the caller after: a user page
        // fault must not happen with the lock held.
        let mut devs = KVVec::new();
        {
            let inner = self.inner.lock();
            let snap = inner.snapshot(a.id).ok_or(ENOENT)?;
            snap.shared.info(&mut a);
            a.dev_count = snap.devs.len() as u32;
            let n = snap.devs.len().min(a.devs_capacity as usize);
            devs.reserve(n, GFP_KERNEL)?;
            for d in snap.devs.iter().take(n) {
                let (image_major, image_minor) = d.image_dev();
                devs.push(
                    uapi::SnapshotDev {
                        major: d.tracker.major,
                        minor: d.tracker.minor,
                        image_major,
                        image_minor,
                        sectors: d.sectors,
                        generation: *d.generation.lock(),
                        sequence: d.sequence.load(core::sync::atomic::Ordering::Acquire),
                        reserved: [0; 2],
                    },
                    GFP_KERNEL,
                )?;
            }
        }
        let size = core::mem::size_of::<uapi::SnapshotDev>();
        let mut w = UserSlice::new(a.devs_ptr as UserPtr, devs.len() * size).writer();
        for d in devs.iter() {
            w.write(d)?;
        }
        write(arg, &a)
    }

    fn list_snapshots(&self, arg: usize) -> Result {
        let mut l: uapi::ListArg = read(arg)?;
        if l.capacity > uapi::MAX_LIST || !uapi::zero(&l.reserved) {
            return Err(EINVAL);
        }
        // As in `info`: gathered under the lock, copied out after.
        let mut ids = KVVec::new();
        {
            let inner = self.inner.lock();
            let n = inner.snapshots.len().min(l.capacity as usize);
            ids.reserve(n, GFP_KERNEL)?;
            for s in inner.snapshots.iter().take(n) {
                ids.push(s.shared.id, GFP_KERNEL)?;
            }
            l.count = inner.snapshots.len() as u32;
        }
        let mut w = UserSlice::new(l.ptr as UserPtr, ids.len() * 8).writer();
        for id in ids.iter() {
            w.write(id)?;
        }
        write(arg, &l)
    }

    fn store_add(&self, arg: usize) -> Result {
        let a: uapi::StoreAddArg = read(arg)?;
        if a.store_count == 0
            || a.store_count > uapi::MAX_STORE_EXTENTS
            || a.reserved0 != 0
            || a.reserved != 0
        {
            return Err(EINVAL);
        }
        let extents: KVVec<uapi::Extent> = read_array(a.store_ptr, a.store_count)?;
        let store = snapshot::open_extents(&extents)?;
        let shared = self
            .inner
            .lock()
            .snapshot(a.id)
            .ok_or(ENOENT)?
            .shared
            .clone();
        shared.add_extents(store)
    }
}

/// Starts copy-on-write on every device at one instant.
fn activate(trackers: &[Arc<Tracker>], devs: &[Arc<SnapDev>]) -> Result {
    // Writes to every device held back, in slot order (the hook takes them in that order).
    let mut order = KVec::with_capacity(trackers.len(), GFP_KERNEL)?;
    for (i, t) in trackers.iter().enumerate() {
        order.push((t.slot_index(), i), GFP_KERNEL)?;
    }
    order.sort_unstable();
    let mut guards = KVec::with_capacity(order.len(), GFP_KERNEL)?;
    for (_, i) in order.iter() {
        guards.push(trackers[*i].block_writes()?, GFP_KERNEL)?;
    }
    // Writes already submitted are completed before the instant.
    for t in trackers.iter() {
        t.file.freeze_queue();
    }
    for (t, d) in trackers.iter().zip(devs.iter()) {
        let (seq, generation) = t.start_snapshot(d.clone());
        d.sequence.store(seq, core::sync::atomic::Ordering::Release);
        *d.generation.lock() = generation;
    }
    for t in trackers.iter() {
        t.file.unfreeze_queue();
    }
    drop(guards);
    Ok(())
}

/// Stops copy-on-write on every device of a snapshot.
fn deactivate(devs: &[Arc<SnapDev>]) {
    for d in devs.iter() {
        // A tracker is never detached under a snapshot; without a slot there is no write
        // to hold back anyway.
        let _guard = d.tracker.block_writes().ok();
        d.tracker.end_snapshot();
    }
}
