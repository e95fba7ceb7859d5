//! `bkimg demo`: a self-contained tour on a disk image it builds with the system's own
//! partitioning and mkfs tools (no root, no loop devices): capture, restore, verify, then
//! prove the restored disk is the same by capturing it again and comparing digests.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use bkimg_format::manifest::Content;
use bkimg_format::repo::Repository;
use serde_json::json;

use crate::exit;

const DISK_MIB: u64 = 256;

/// With `json`, the running commentary goes to stderr and stdout gets one JSON object.
pub fn run(dir: &Path, json: bool) -> Result<i32> {
    let say = |text: &str| {
        if json {
            eprintln!("{text}");
        } else {
            crate::out(text);
        }
    };
    let step = |text: &str| say(&format!("==> {text}"));
    for (tool, package) in [
        ("sgdisk", "gdisk"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("mkfs.vfat", "dosfstools"),
        ("mkswap", "util-linux"),
    ] {
        if which(tool).is_none() {
            bail!("the demo needs {tool}: install it with `apt-get install {package}`");
        }
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    let disk = dir.join("disk.img");
    let repo = dir.join("repo");
    let restored = dir.join("restored.img");
    let me = std::env::current_exe()?;

    step("building a 256 MiB GPT disk: EFI system partition, swap, ext4 root with files");
    build_disk(dir, &disk)?;

    step("capturing it");
    let id = bkimg(&me, &["capture", "--repo", s(&repo), s(&disk), "--quiet"])?;
    bkimg(&me, &["info", "--repo", s(&repo), id.trim()]).map(|t| say(t.trim_end()))?;

    step("restoring it to a new image");
    bkimg(
        &me,
        &[
            "restore",
            "--repo",
            s(&repo),
            id.trim(),
            "--target",
            s(&restored),
            "--quiet",
        ],
    )?;

    step("verifying the repository");
    bkimg(&me, &["verify", "--repo", s(&repo), "--quiet"])?;

    step("checking the restored disk: partition table, fsck, contents");
    let table = |img: &Path| -> Result<String> { run_tool("sgdisk", &["-p", s(img)]) };
    if table(&disk)?.replace(s(&disk), "") != table(&restored)?.replace(s(&restored), "") {
        bail!("the restored partition table differs from the original");
    }
    let recaptured = bkimg(
        &me,
        &["capture", "--repo", s(&repo), s(&restored), "--quiet"],
    )?;
    let r = Repository::open(&repo)?;
    let (a, b) = (r.resolve(id.trim())?, r.resolve(recaptured.trim())?);
    let mut volumes = Vec::new();
    for (va, vb) in a.manifest.disks[0]
        .volumes
        .iter()
        .zip(&b.manifest.disks[0].volumes)
    {
        let same = match (&va.content, &vb.content) {
            (Content::Data { index: x, .. }, Content::Data { index: y, .. }) => x == y,
            (x, y) => x == y,
        };
        if !same || va.filesystem != vb.filesystem {
            bail!(
                "volume {} of the restored disk differs from the original",
                va.name
            );
        }
        let fs = va.filesystem.as_ref().map(|f| f.fs_type.as_str());
        say(&format!(
            "    {:<6} identical ({})",
            va.name,
            fs.unwrap_or("raw")
        ));
        volumes.push(json!({"volume": va.name, "filesystem": fs}));
    }
    let root = a.manifest.disks[0]
        .volumes
        .iter()
        .find(|v| v.partition == Some(3))
        .context("demo root partition")?;
    let extracted = dir.join("restored-root.img");
    copy_range(&restored, &extracted, root.offset, root.size)?;
    run_tool("e2fsck", &["-fn", s(&extracted)]).context("fsck of the restored root filesystem")?;
    fs::remove_file(&extracted)?;
    say("    e2fsck -fn of the restored root: clean");

    step(&format!("done: everything is in {}", dir.display()));
    say(&format!(
        "    try: bkimg list --repo {0}; bkimg verify --repo {0}",
        repo.display()
    ));
    if json {
        crate::out_json(&json!({
            "dir": dir, "repo": repo, "disk": disk, "restored": restored,
            "id": id.trim(), "recaptured": recaptured.trim(), "volumes": volumes,
        }));
    }
    Ok(exit::OK)
}

fn build_disk(dir: &Path, disk: &Path) -> Result<()> {
    let content = dir.join("content");
    fs::create_dir_all(content.join("etc"))?;
    fs::create_dir_all(content.join("var/log"))?;
    fs::write(content.join("etc/hostname"), "bkimg-demo\n")?;
    let mut log = File::create(content.join("var/log/syslog"))?;
    for i in 0..200_000 {
        writeln!(
            log,
            "Nov 21 12:00:{:02} demo kernel: message number {i}",
            i % 60
        )?;
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(content.join("var/random.bin"), noise)?;

    File::create(disk)?.set_len(DISK_MIB << 20)?;
    run_tool(
        "sgdisk",
        &[
            "-n1:2048:+32M",
            "-t1:ef00",
            "-c1:EFI system",
            "-n2:0:+16M",
            "-t2:8200",
            "-c2:swap",
            "-n3:0:0",
            "-t3:8300",
            "-c3:root",
            s(disk),
        ],
    )?;
    let layout = bkimg_capture::table::read(
        &bkimg_capture::region::Region::new(
            std::sync::Arc::new(File::open(disk)?),
            0,
            DISK_MIB << 20,
        ),
        512,
    )?;
    for p in &layout.partitions {
        let part = dir.join(format!("part{}.img", p.number));
        File::create(&part)?.set_len(p.size)?;
        match p.number {
            1 => run_tool("mkfs.vfat", &["-F", "32", "-n", "DEMOESP", s(&part)])?,
            2 => run_tool("mkswap", &["-L", "demoswap", s(&part)])?,
            _ => run_tool(
                "mkfs.ext4",
                &["-q", "-F", "-L", "demoroot", "-d", s(&content), s(&part)],
            )?,
        };
        let bytes = fs::read(&part)?;
        File::options()
            .write(true)
            .open(disk)?
            .write_all_at(&bytes, p.offset)?;
        fs::remove_file(&part)?;
    }
    fs::remove_dir_all(&content)?;
    Ok(())
}

fn copy_range(from: &Path, to: &Path, offset: u64, len: u64) -> Result<()> {
    let src = File::open(from)?;
    let mut buf = vec![0u8; len as usize];
    src.read_exact_at(&mut buf, offset)?;
    fs::write(to, buf)?;
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("demo paths are UTF-8")
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/sbin", "/usr/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn run_tool(tool: &str, args: &[&str]) -> Result<String> {
    let path = which(tool).with_context(|| format!("{tool} not found"))?;
    let out = Command::new(path)
        .args(args)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bkimg(me: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(me).args(args).output()?;
    if !out.status.success() {
        bail!(
            "bkimg {} failed: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
