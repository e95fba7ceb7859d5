//! A saved state's binding checked against a real block device (a loop device over a
//! file): the load path's decision without the module. Needs root and loop devices;
//! skipped (with a note) otherwise.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bkimg_kmod::{saved_mismatch, Binding, DevNum, SavedTracker};

struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach(file: &Path) -> Option<Loop> {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(file)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "skipped: losetup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(Loop(PathBuf::from(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )))
}

/// Writes through the loop device (not its backing file, whose page cache is another).
fn write_through(dev: &Path, at: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_SYNC)
        .open(dev)
        .unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_state_is_refused_once_its_device_is_written_untracked() {
    if effective_uid() != 0 {
        eprintln!("skipped: needs root (loop devices)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0x5a; 8 << 20]).unwrap();
    let Some(lo) = attach(&img) else { return };
    let dev = DevNum::of_block_device(&lo.0).unwrap();

    let binding = Binding::of_device(dev).unwrap();
    assert!(
        binding
            .identity
            .iter()
            .any(|(k, v)| k == "loop_backing_file" && v.ends_with("disk.img")),
        "{binding:?}"
    );
    assert_eq!(binding.regions.len(), 2, "first and last MiB: {binding:?}");
    let blocks = (8u64 << 20).div_ceil(65536) as usize;
    let saved = SavedTracker {
        dev,
        block_size: 65536,
        device_sectors: (8 << 20) / 512,
        generation: *b"0123456789abcdef",
        sequence: 2,
        table: vec![1; blocks],
        binding: Some(binding),
    };
    let path = dir.path().join("loop.cbt");
    saved.write_to(&path).unwrap();
    let saved = SavedTracker::read_from(&path).unwrap();
    assert_eq!(saved_mismatch(&saved, dev).unwrap(), None);

    // Untouched bytes outside the fingerprint: still matches (it is a sample).
    write_through(&lo.0, 4 << 20, b"middle");
    assert_eq!(saved_mismatch(&saved, dev).unwrap(), None);

    // A write to the first MiB while untracked: refused, and the message says where.
    write_through(&lo.0, 1024, b"superblock changed");
    let why = saved_mismatch(&saved, dev).unwrap().expect("a mismatch");
    assert!(why.contains("its first MiB"), "{why}");

    // A version 1 state (no binding) is never trusted.
    let v1 = SavedTracker {
        binding: None,
        ..saved.clone()
    };
    let why = saved_mismatch(&v1, dev).unwrap().expect("a mismatch");
    assert!(why.contains("without the device's identity"), "{why}");

    // Another size: another device.
    let other = SavedTracker {
        device_sectors: saved.device_sectors + 8,
        ..saved.clone()
    };
    let why = saved_mismatch(&other, dev).unwrap().expect("a mismatch");
    assert!(why.contains("another device"), "{why}");

    // Another backing file (same content, same size): another device.
    let mut b = saved.binding.clone().unwrap();
    for (k, v) in &mut b.identity {
        if k == "loop_backing_file" {
            *v = "/elsewhere/disk.img".into();
        }
    }
    let moved = SavedTracker {
        binding: Some(b),
        ..saved.clone()
    };
    let why = saved_mismatch(&moved, dev).unwrap().expect("a mismatch");
    assert!(why.contains("loop_backing_file"), "{why}");
}

/// The effective user id, from /proc (no `unsafe` outside the crate's `sys` module).
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(u32::MAX)
}
