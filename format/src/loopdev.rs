//! Loop devices over files: a restore must not write, and an offline capture must not
//! read, a file that a loop device (and whatever is mounted from it) is using.

use std::os::unix::fs::MetadataExt;

/// The loop devices (/dev/loopN) whose backing file is the file with `meta`'s device and
/// inode, from sysfs (`loop/backing_file` exists only while a file is attached).
pub fn over(meta: &std::fs::Metadata) -> Vec<String> {
    let (dev, ino) = (meta.dev(), meta.ino());
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let m = std::fs::metadata(backing.trim_end_matches('\n')).ok()?;
            (m.dev() == dev && m.ino() == ino).then(|| format!("/dev/{name}"))
        })
        .collect()
}
