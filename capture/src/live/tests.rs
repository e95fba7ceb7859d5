//! The session's phases against a fake control device: images are plain files, devices
//! block nodes made in a temporary directory (root only: skipped otherwise).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bkimg_format::repo::Repository;
use bkimg_format::store::LocalDir;
use bkimg_kmod::{
    DevNum, Event, EventKind, Extent, KmodError, SnapshotDev, SnapshotInfo, SnapshotOptions,
    SnapshotState, TrackerState,
};
use nix::errno::Errno;

use super::*;
use crate::Silent;

const SIZE: u64 = 4 << 20;
const BLOCK: u32 = 65536;

#[derive(Default)]
struct FakeState {
    tracked: HashSet<DevNum>,
    snapshots: HashMap<u64, SnapshotInfo>,
    next_id: u64,
    destroyed: Vec<u64>,
    store_added: Vec<(u64, usize)>,
}

/// A control device that keeps its snapshots in memory; images are files in `dir`.
struct Fake {
    dir: PathBuf,
    state: Mutex<FakeState>,
    /// Report low space once, then clear.
    low_space: AtomicBool,
    /// Refuse to destroy snapshots (as a busy or confused module would).
    refuse_destroy: AtomicBool,
}

fn not_found(what: &str) -> KmodError {
    KmodError::Ioctl {
        what: what.into(),
        errno: Errno::ENOENT,
        hint: String::new(),
    }
}

impl Fake {
    fn new(dir: &Path) -> Arc<Fake> {
        Arc::new(Fake {
            dir: dir.to_path_buf(),
            state: Mutex::new(FakeState {
                next_id: 1,
                ..Default::default()
            }),
            low_space: AtomicBool::new(false),
            refuse_destroy: AtomicBool::new(false),
        })
    }

    fn fail(&self, id: u64) {
        let mut s = self.state.lock().unwrap();
        let info = s.snapshots.get_mut(&id).unwrap();
        info.state = SnapshotState::Failed;
        info.error = -nix::libc::ENOSPC;
    }

    fn destroyed(&self) -> Vec<u64> {
        self.state.lock().unwrap().destroyed.clone()
    }
}

impl SnapshotControl for Fake {
    fn read(&self, dev: DevNum, with_table: bool) -> Result<TrackerState, KmodError> {
        let s = self.state.lock().unwrap();
        if !s.tracked.contains(&dev) {
            return Err(not_found("no tracker"));
        }
        let blocks = SIZE / u64::from(BLOCK);
        Ok(TrackerState {
            dev,
            block_size: BLOCK,
            device_sectors: SIZE / 512,
            blocks,
            generation: [7; 16],
            sequence: 2,
            snapshot_id: None,
            writes: 0,
            // Block 3 written in sequence 1.
            table: with_table.then(|| {
                let mut t = vec![0u8; blocks as usize];
                t[3] = 1;
                t
            }),
        })
    }

    fn attach(&self, dev: DevNum) -> Result<(), KmodError> {
        self.state.lock().unwrap().tracked.insert(dev);
        Ok(())
    }

    fn create(
        &self,
        devs: &[DevNum],
        store: &[Extent],
        _opts: SnapshotOptions,
    ) -> Result<u64, KmodError> {
        let mut s = self.state.lock().unwrap();
        let id = s.next_id;
        s.next_id += 1;
        let mut snapshot_devs = Vec::new();
        for (i, d) in devs.iter().enumerate() {
            let image_path = self.dir.join(format!("bksnap{id}-{i}"));
            let data: Vec<u8> = (0..SIZE as u32).map(|b| (b % 251) as u8).collect();
            std::fs::write(&image_path, data).unwrap();
            snapshot_devs.push(SnapshotDev {
                dev: *d,
                image: DevNum::new(252, i as u32),
                image_path,
                sectors: SIZE / 512,
                generation: [7; 16],
                sequence: 1,
            });
        }
        let store_sectors = store.iter().map(|e| e.sectors).sum();
        s.snapshots.insert(
            id,
            SnapshotInfo {
                id,
                state: SnapshotState::Active,
                error: 0,
                store_sectors,
                store_used_sectors: 0,
                low_water_sectors: 0,
                chunk_sectors: 128,
                copied_chunks: 0,
                created_ns: 0,
                devs: snapshot_devs,
            },
        );
        Ok(id)
    }

    fn info(&self, id: u64) -> Result<SnapshotInfo, KmodError> {
        let s = self.state.lock().unwrap();
        s.snapshots
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found("no snapshot"))
    }

    fn destroy(&self, id: u64) -> Result<(), KmodError> {
        if self.refuse_destroy.load(Ordering::SeqCst) {
            return Err(KmodError::Ioctl {
                what: format!("destroying snapshot {id}"),
                errno: Errno::EBUSY,
                hint: String::new(),
            });
        }
        let mut s = self.state.lock().unwrap();
        s.snapshots
            .remove(&id)
            .ok_or_else(|| not_found("no snapshot"))?;
        s.destroyed.push(id);
        Ok(())
    }

    fn store_add(&self, id: u64, extents: &[Extent]) -> Result<(), KmodError> {
        let mut s = self.state.lock().unwrap();
        let info = s
            .snapshots
            .get_mut(&id)
            .ok_or_else(|| not_found("no snapshot"))?;
        info.store_sectors += extents.iter().map(|e| e.sectors).sum::<u64>();
        s.store_added.push((id, extents.len()));
        Ok(())
    }

    fn wait_event(&self, timeout: Duration, id: u64) -> Result<Option<Event>, KmodError> {
        if self.low_space.swap(false, Ordering::SeqCst) {
            return Ok(Some(Event {
                kind: EventKind::LowSpace,
                snapshot_id: id,
                error: 0,
                store_sectors: 0,
                store_used_sectors: 0,
            }));
        }
        std::thread::sleep(timeout.min(Duration::from_millis(20)));
        Ok(None)
    }

    fn wait_for_images(&self, _info: &SnapshotInfo) -> anyhow::Result<()> {
        Ok(())
    }
}

struct Setup {
    dir: tempfile::TempDir,
    fake: Arc<Fake>,
    opts: CaptureOptions,
    live: LiveOptions,
    repo: Repository,
    store: LocalDir,
}

/// A block node for a device that does not exist (the session only asks its number);
/// None when not root.
fn setup() -> Option<Setup> {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("disk");
    if let Err(e) = nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(251, 7),
    ) {
        eprintln!("skipped: cannot make a block device node ({e}): run as root");
        return None;
    }
    let root = dir.path().join("repo");
    let store = LocalDir::open_or_create(&root, "r", "2026-01-01T00:00:00Z").unwrap();
    let repo = Repository::new(Box::new(LocalDir::open(&root).unwrap()));
    let live = LiveOptions {
        store: Some(dir.path().join("live.store")),
        store_size: Some(1 << 20),
        max_store: Some(4 << 20),
        ..Default::default()
    };
    Some(Setup {
        fake: Fake::new(dir.path()),
        opts: CaptureOptions {
            sources: vec![node],
            source_names: Vec::new(),
            changed_blocks: Vec::new(),
            chunk_size: 64 << 10,
            level: 1,
            raw: true,
            workers: 2,
            id: "p1".into(),
            created: "2026-01-01T00:00:01Z".into(),
            host: "test".into(),
            tool: "test".into(),
            consistency: crate::claim::Consistency::FrozenSnapshot,
            verify_cbt_every: 0,
        },
        live,
        repo,
        store,
        dir,
    })
}

fn session(s: &Setup) -> Session {
    let fake = s.fake.clone();
    Session::new(
        &s.live,
        &s.opts.sources,
        move || Ok(fake as Arc<dyn SnapshotControl>),
        Arc::new(|_| {}),
    )
    .unwrap()
}

/// The error of a capture that must not commit.
fn failed(r: anyhow::Result<CaptureResult>) -> anyhow::Error {
    match r {
        Ok(r) => panic!("{} was committed", r.manifest.id),
        Err(e) => e,
    }
}

fn committed(repo: &Repository) -> usize {
    repo.points().unwrap().0.len()
}

#[test]
fn released_on_success() {
    let Some(mut s) = setup() else { return };
    let mut session = session(&s);
    session.start(&mut s.opts, None, &Silent).unwrap();
    assert_eq!(session.phase(), Phase::Holding(1));
    // The untracked device got a tracker; capture reads the image, records the device.
    assert!(s
        .fake
        .state
        .lock()
        .unwrap()
        .tracked
        .contains(&DevNum::new(251, 7)));
    assert_eq!(s.opts.sources, vec![s.dir.path().join("bksnap1-0")]);
    let result = session
        .capture(&s.repo, &s.store, None, &s.opts, &Silent)
        .unwrap();
    assert_eq!(
        result.manifest.disks[0].source,
        s.dir.path().join("disk").display().to_string()
    );
    let report = session.finish();
    assert_eq!(s.fake.destroyed(), vec![1]);
    assert!(!s.dir.path().join("live.store").exists());
    assert_eq!(report.snapshot, 1);
    assert_eq!(report.store_size, 1 << 20);
    let map = report.disks[0].change_map.as_ref().unwrap();
    assert_eq!((map.from_sequence, map.to_sequence, map.ranges), (0, 1, 1));
    assert_eq!(map.bytes, u64::from(BLOCK));
    assert!(
        report.notes[0].contains("was not tracked"),
        "{:?}",
        report.notes
    );
    assert_eq!(committed(&s.repo), 1);
}

#[test]
fn released_on_an_error_mid_capture() {
    let Some(mut s) = setup() else { return };
    let mut session = session(&s);
    session.start(&mut s.opts, None, &Silent).unwrap();
    // The image goes away under the capture.
    std::fs::remove_file(s.dir.path().join("bksnap1-0")).unwrap();
    let err = failed(session.capture(&s.repo, &s.store, None, &s.opts, &Silent));
    assert!(err.downcast_ref::<Interrupted>().is_none(), "{err:#}");
    drop(session);
    assert_eq!(s.fake.destroyed(), vec![1]);
    assert!(!s.dir.path().join("live.store").exists());
    assert_eq!(committed(&s.repo), 0);
}

#[test]
fn released_when_interrupted() {
    let Some(mut s) = setup() else { return };
    let mut session = session(&s);
    session.start(&mut s.opts, None, &Silent).unwrap();
    let mut seen = Vec::new();
    session
        .interrupter()
        .interrupt(|what| seen.push(what), |_| {});
    assert_eq!(seen, vec![Interruption::Releasing(1)]);
    assert_eq!(session.phase(), Phase::Released);
    assert_eq!(s.fake.destroyed(), vec![1]);
    let err = failed(session.capture(&s.repo, &s.store, None, &s.opts, &Silent));
    assert!(err.downcast_ref::<Interrupted>().is_some(), "{err:#}");
    session.finish();
    // Released once, by the interruption.
    assert_eq!(s.fake.destroyed(), vec![1]);
    assert!(!s.dir.path().join("live.store").exists());
    assert_eq!(committed(&s.repo), 0);
}

#[test]
fn interrupted_before_the_snapshot_takes_none() {
    let Some(mut s) = setup() else { return };
    let mut session = session(&s);
    let mut seen = None;
    session.interrupter().interrupt(|w| seen = Some(w), |_| {});
    assert_eq!(seen, Some(Interruption::Preparing));
    let err = session.start(&mut s.opts, None, &Silent).unwrap_err();
    assert!(err.downcast_ref::<Interrupted>().is_some(), "{err:#}");
    assert!(s.fake.state.lock().unwrap().snapshots.is_empty());
    drop(session);
    assert!(!s.dir.path().join("live.store").exists());
}

#[test]
fn a_failed_snapshot_commits_nothing() {
    let Some(mut s) = setup() else { return };
    let mut session = session(&s);
    session.start(&mut s.opts, None, &Silent).unwrap();
    s.fake.fail(1);
    let err = failed(session.capture(&s.repo, &s.store, None, &s.opts, &Silent));
    let failed = err
        .downcast_ref::<SnapshotFailed>()
        .expect("SnapshotFailed");
    assert!(
        failed
            .0
            .contains("its difference store (1.00 MiB) was full"),
        "{failed}"
    );
    session.finish();
    assert_eq!(s.fake.destroyed(), vec![1]);
    assert_eq!(committed(&s.repo), 0);
}

#[test]
fn store_growth_reaches_the_control() {
    let Some(mut s) = setup() else { return };
    let mut session = session(&s);
    s.fake.low_space.store(true, Ordering::SeqCst);
    session.start(&mut s.opts, None, &Silent).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.fake.state.lock().unwrap().store_added.is_empty() {
        assert!(Instant::now() < deadline, "the store was never grown");
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = session.finish();
    assert_eq!(s.fake.state.lock().unwrap().store_added[0].0, 1);
    assert_eq!(report.store_grown, 1);
    assert_eq!(report.store_size, 2 << 20);
}

/// A snapshot the module will not destroy may still copy into its store: the store file
/// stays (removing it would free blocks the kernel still writes), on finish and on a
/// second Ctrl-C alike, and the warning says how to finish by hand.
#[test]
fn the_store_stays_while_the_snapshot_may_write_to_it() {
    let Some(mut s) = setup() else { return };
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = log.clone();
    let fake = s.fake.clone();
    let mut session = Session::new(
        &s.live,
        &s.opts.sources,
        move || Ok(fake as Arc<dyn SnapshotControl>),
        Arc::new(move |m: &str| seen.lock().unwrap().push(m.to_string())),
    )
    .unwrap();
    session.start(&mut s.opts, None, &Silent).unwrap();
    let store = s.dir.path().join("live.store");
    assert!(store.exists());
    s.fake.refuse_destroy.store(true, Ordering::SeqCst);
    // A second Ctrl-C while the snapshot is held: the store is not removed.
    let interrupter = session.interrupter();
    assert_eq!(interrupter.remove_store(), Some(store.clone()));
    assert!(store.exists());
    interrupter.interrupt(|_| {}, |_| {});
    assert_eq!(interrupter.remove_store(), Some(store.clone()));
    drop(session);
    assert!(store.exists(), "the store went while the snapshot held it");
    let log = log.lock().unwrap().join("\n");
    assert!(
        log.contains("is kept") && log.contains("bkimg snapshot destroy 1"),
        "{log}"
    );
    // Once destroyed for real, removing it is the user's to do (`snapshot destroy ID
    // --store FILE`): it stays immutable until then where the filesystem has the flag.
    s.fake.refuse_destroy.store(false, Ordering::SeqCst);
    bkimg_kmod::remove_store_path(&store).unwrap();
    assert!(!store.exists());
}
