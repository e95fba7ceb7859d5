//! A deterministic writer of "newc" cpio archives, the format the kernel unpacks into its
//! initial root filesystem.
//!
//! Entries are kept sorted by path, every parent directory is created before its
//! children, and every timestamp, owner and inode number is fixed: the same entries give
//! the same bytes on every machine and at every time (reproducible images).

use std::collections::BTreeMap;
use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// What one path of the archive holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An archive being assembled; paths are relative ("bin/sh"), without a leading slash.
#[derive(Default)]
pub struct Archive {
    nodes: BTreeMap<String, Node>,
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds (or replaces) `path`, creating its missing parent directories (mode 0755).
    pub fn insert(&mut self, path: &str, node: Node) {
        let path = path.trim_matches('/').to_string();
        assert!(!path.is_empty(), "the archive root is implicit");
        let mut parent = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.nodes
                .entry(parent.clone())
                .or_insert(Node::Dir { mode: 0o755 });
        }
        self.nodes.insert(path, node);
    }

    pub fn dir(&mut self, path: &str) {
        self.insert(path, Node::Dir { mode: 0o755 });
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.insert(path, Node::File { mode, data });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        );
    }

    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path.trim_matches('/'))
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path.trim_matches('/'))
    }

    /// Bytes of file contents held.
    pub fn content_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match n {
                Node::File { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Writes the archive; `mtime` is the one timestamp every entry gets.
    pub fn write(&self, out: &mut dyn Write, mtime: u32) -> io::Result<()> {
        let mut w = Counting { out, written: 0 };
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (0o040000 | mode, 2, &[], (0, 0)),
                Node::File { mode, data } => (0o100000 | mode, 1, data, (0, 0)),
                Node::Symlink { target } => (0o120777, 1, target.as_bytes(), (0, 0)),
                Node::CharDev { mode, major, minor } => (0o020000 | mode, 1, &[], (*major, *minor)),
            };
            entry(&mut w, path, ino as u32 + 1, mode, nlink, mtime, data, rdev)?;
        }
        entry(&mut w, TRAILER, 0, 0, 1, 0, &[], (0, 0))?;
        // The kernel reads archives in 512-byte blocks, as cpio(1) writes them.
        let pad = (512 - w.written % 512) % 512;
        w.write_all(&vec![0; pad as usize])
    }
}

#[allow(clippy::too_many_arguments)]
fn entry(
    w: &mut Counting,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    data: &[u8],
    (rmajor, rminor): (u32, u32),
) -> io::Result<()> {
    let namesize = name.len() + 1;
    let header = format!(
        "{MAGIC}{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
         {major:08x}{minor:08x}{rmajor:08x}{rminor:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        size = data.len(),
        major = 0,
        minor = 0,
        check = 0,
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.pad4()?;
    w.write_all(data)?;
    w.pad4()
}

struct Counting<'a> {
    out: &'a mut dyn Write,
    written: u64,
}

impl Counting<'_> {
    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.write_all(&[0; 3][..pad as usize])
    }
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (path, mode, nlink, mtime, data) of every entry before the trailer.
    fn parse(mut buf: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap(),
                    16,
                )
                .unwrap()
            };
            assert_eq!(&buf[..6], MAGIC.as_bytes(), "magic at offset {offset}");
            let (mode, nlink, mtime, size, namesize) = (
                field(1),
                field(4),
                field(5),
                field(6) as usize,
                field(11) as usize,
            );
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = buf[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            offset += next;
            buf = &buf[next..];
            if name == TRAILER {
                assert!(
                    buf.iter().all(|&b| b == 0),
                    "only padding after the trailer"
                );
                assert_eq!((offset + buf.len()) % 512, 0);
                return out;
            }
            out.push((name, mode, nlink, mtime, data));
        }
    }

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.file("bin/busybox", 0o755, b"\x7fELF...".to_vec());
        a.symlink("bin/sh", "busybox");
        a.file("init", 0o755, vec![1, 2, 3]);
        a.file("etc/bkimg/media-id", 0o644, b"abc\n".to_vec());
        a.insert(
            "dev/console",
            Node::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        );
        a
    }

    #[test]
    fn parents_come_first_and_fields_round_trip() {
        let mut buf = Vec::new();
        sample().write(&mut buf, 1_700_000_000).unwrap();
        let entries = parse(&buf);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/bkimg",
                "etc/bkimg/media-id",
                "init"
            ]
        );
        let sh = &entries[2];
        assert_eq!((sh.1, sh.4.as_slice()), (0o120777, &b"busybox"[..]));
        let init = &entries[8];
        assert_eq!(
            (init.1, init.2, init.4.as_slice()),
            (0o100755, 1, &[1u8, 2, 3][..])
        );
        assert_eq!(entries[0].1, 0o040755);
        assert_eq!(entries[4].1, 0o020600);
        assert!(entries.iter().all(|e| e.3 == 1_700_000_000));
    }

    #[test]
    fn the_same_entries_give_the_same_bytes_in_any_insertion_order() {
        let mut a = Vec::new();
        sample().write(&mut a, 7).unwrap();
        let mut reversed = Archive::new();
        reversed.file("etc/bkimg/media-id", 0o644, b"abc\n".to_vec());
        reversed.file("init", 0o755, vec![1, 2, 3]);
        reversed.insert(
            "dev/console",
            Node::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        );
        reversed.symlink("bin/sh", "busybox");
        reversed.file("bin/busybox", 0o755, b"\x7fELF...".to_vec());
        let mut b = Vec::new();
        reversed.write(&mut b, 7).unwrap();
        assert_eq!(a, b);
    }

    /// cpio(1) reads what we write, as the kernel's unpacker does.
    #[test]
    fn gnu_cpio_extracts_it() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(std::env::var_os("CI").is_none(), "cpio is missing in CI");
            eprintln!("skipped: cpio is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut a = sample();
        a.nodes.remove("dev/console"); // mknod needs root
        let mut buf = Vec::new();
        a.write(&mut buf, 0).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&buf).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.path().join("init")).unwrap(), [1, 2, 3]);
        assert_eq!(
            std::fs::read_link(dir.path().join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
        assert_eq!(
            std::fs::read(dir.path().join("etc/bkimg/media-id")).unwrap(),
            b"abc\n"
        );
    }
}
