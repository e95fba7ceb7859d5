//! How consistent a capture is, and the claim that makes a capture of disks nobody uses
//! "offline": each source opened exclusively (a block device that is mounted or held by
//! device-mapper, md or another exclusive opener is refused by the kernel), image files
//! checked for a mounted loop device over them and for another program's file lock
//! (QEMU locks the images of a running VM). The claim is held until the capture ends, so
//! nothing mounts a source meanwhile.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The manifest's `consistency` (spec/format.md §7.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// One snapshot of every source at one instant, filesystems frozen for it.
    FrozenSnapshot,
    /// One snapshot of every source at one instant.
    Snapshot,
    /// Sources nothing else had mounted, claimed or locked while they were read.
    Offline,
    /// Read while possibly in use (`--allow-inconsistent`).
    Inconsistent,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::FrozenSnapshot => "frozen-snapshot",
            Consistency::Snapshot => "snapshot",
            Consistency::Offline => "offline",
            Consistency::Inconsistent => "inconsistent",
        }
    }
}

/// A source in use: what holds it.
#[derive(Debug, thiserror::Error)]
#[error(
    "source {path} is in use ({why}): a copy read now would not be consistent: unmount it \
     and stop what uses it, capture it live (--live), or accept an inconsistent copy with \
     --allow-inconsistent"
)]
pub struct InUse {
    pub path: String,
    pub why: String,
}

/// Exclusive holds on the sources of an offline capture; released when dropped.
pub struct Claim {
    _held: Vec<File>,
}

/// Claims every source for an offline capture, or says which one is in use.
pub fn claim_offline(sources: &[PathBuf]) -> Result<Claim, InUse> {
    let mut held = Vec::new();
    for source in sources {
        let in_use = |why: String| InUse {
            path: source.display().to_string(),
            why,
        };
        // Unreadable sources are reported by the capture itself.
        let Ok(meta) = std::fs::metadata(source) else {
            continue;
        };
        if meta.file_type().is_block_device() {
            match exclusive(source) {
                Ok(f) => held.push(f),
                Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                    return Err(in_use(
                        "mounted, or held by device-mapper, md or another program".into(),
                    ))
                }
                Err(_) => {}
            }
        } else if meta.is_file() {
            for dev in bkimg_format::loopdev::over(&meta) {
                match exclusive(Path::new(&dev)) {
                    Ok(f) => held.push(f),
                    Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                        return Err(in_use(format!("it backs {dev}, which is mounted or held")))
                    }
                    Err(_) => {}
                }
            }
            if let Ok(f) = File::open(source) {
                if let Some(pid) = write_locked(&f) {
                    return Err(in_use(format!(
                        "process {pid} holds a lock on it (a running virtual machine?)"
                    )));
                }
            }
        }
    }
    Ok(Claim { _held: held })
}

/// Opens a block device exclusively. `EBUSY` is retried for a few seconds: a holder can be
/// on its way out (a filesystem just unmounted, a loop device being detached, a probe by
/// udev), and refusing the capture for that would be wrong; a real mount stays busy.
fn exclusive(path: &Path) -> std::io::Result<File> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(path);
        match r {
            Err(e)
                if e.raw_os_error() == Some(nix::libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// The process holding a lock that conflicts with reading the whole file consistently
/// (any record lock another process or open file description holds), if one does.
fn write_locked(f: &File) -> Option<i32> {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsRawFd;
    for ofd in [true, false] {
        let mut lock = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as i16,
            l_whence: nix::libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        let arg = if ofd {
            FcntlArg::F_OFD_GETLK(&mut lock)
        } else {
            FcntlArg::F_GETLK(&mut lock)
        };
        if fcntl(f.as_raw_fd(), arg).is_ok() && lock.l_type != nix::libc::F_UNLCK as i16 {
            return Some(lock.l_pid);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_another_process_locks_is_in_use_and_a_plain_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert!(claim_offline(std::slice::from_ref(&img)).is_ok());
        // flock(1) takes a whole-file lock in another process, as QEMU's image locking
        // does with record locks: flock locks do not show in F_GETLK, so use a record
        // lock through python (always present where the tests run).
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import fcntl,sys,time\nf=open(sys.argv[1],'r+')\nfcntl.lockf(f,fcntl.LOCK_SH,1,100)\nprint('locked',flush=True)\ntime.sleep(60)",
                img.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        let e = claim_offline(std::slice::from_ref(&img))
            .err()
            .expect("in use");
        assert!(e.why.contains(&child.id().to_string()), "{e}");
        let _ = child.kill();
        let _ = child.wait();
        assert!(claim_offline(&[img]).is_ok());
    }
}
