//! `bkimg rescue build`: one hybrid image (USB stick or CD, UEFI or BIOS) holding a Debian
//! kernel, an initramfs whose init is bkimg itself, and optionally exports to restore.
//!
//! The kernel comes from Debian's `linux-image-amd64` (downloaded with apt and kept in a
//! cache keyed by the package file's SHA-256); GRUB (grub-mkimage) and xorriso make the
//! image bootable both ways, as grub-mkrescue would but with no time or random number in
//! it. Every timestamp is SOURCE_DATE_EPOCH (default: the kernel
//! image's time in its package), so the same inputs give the same bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::config::{secrets_in, SiteConfig};
use crate::cpio::{Archive, Node};
use crate::modules::{ModuleDb, WANTED};

/// Where things are inside the image and the initramfs (the init reads the same names).
pub const MEDIA_ID: &str = "bkimg/media-id";
pub const EXPORTS_DIR: &str = "bkimg/exports";
pub const INITRD_CONFIG: &str = "etc/bkimg/bkimg.toml";
pub const INITRD_MEDIA_ID: &str = "etc/bkimg/media-id";
pub const INITRD_MODULES: &str = "etc/bkimg/modules.load";

/// Debian packages whose tools the build runs.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("grub-mkimage", "grub-common"),
    ("xorriso", "xorriso"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("depmod", "kmod"),
    ("dpkg-deb", "dpkg"),
];
const GRUB_PLATFORMS: &[(&str, &str)] = &[
    ("/usr/lib/grub/i386-pc", "grub-pc-bin"),
    ("/usr/lib/grub/x86_64-efi", "grub-efi-amd64-bin"),
];

pub struct BuildOptions {
    pub output: PathBuf,
    /// The bkimg config file to build in: its `[rescue]` table (`unattended`, `after`,
    /// `[[rescue.disk]]` rules...) and `repository`.
    pub config: Option<PathBuf>,
    /// Export files the image carries, restored offline from the media itself.
    pub exports: Vec<PathBuf>,
    /// A kernel package (.deb) or a bzImage whose modules are in /lib/modules/VERSION;
    /// default: Debian's linux-image-amd64 through apt.
    pub kernel: Option<PathBuf>,
    /// Also write the files a PXE/HTTP boot server serves.
    pub pxe_dir: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// The bkimg binary the image runs (normally the one running).
    pub bkimg: PathBuf,
    /// A statically linked busybox (Debian's busybox-static).
    pub busybox: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct BuildReport {
    pub output: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub media_id: String,
    pub kernel: String,
    pub modules: usize,
    /// Wanted drivers this kernel does not ship as modules.
    pub modules_missing: Vec<String>,
    pub initramfs_bytes: u64,
    pub exports: Vec<String>,
    /// Config settings that give access to a repository (built in on purpose).
    pub secrets: Vec<String>,
    pub source_date_epoch: u64,
    pub pxe_dir: Option<PathBuf>,
    pub seconds: f64,
}

/// The kernel the image boots.
struct Kernel {
    vmlinuz: PathBuf,
    /// .../lib/modules/VERSION, with a modules.dep.
    modules: PathBuf,
    version: String,
    /// Its time, the default SOURCE_DATE_EPOCH.
    epoch: u64,
}

pub fn build(opts: &BuildOptions, log: &dyn Fn(&str)) -> Result<BuildReport> {
    let started = Instant::now();
    check_host()?;
    if opts.output.exists() {
        bail!(
            "{} already exists: choose another --output or remove it",
            opts.output.display()
        );
    }
    let config_text = match &opts.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the config file {}", path.display()))?;
            SiteConfig::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            Some(text)
        }
        None => None,
    };
    let mut export_names = Vec::new();
    for e in &opts.exports {
        let name = e
            .file_name()
            .with_context(|| format!("--include-export {} names no file", e.display()))?
            .to_string_lossy()
            .into_owned();
        // Its structure only: a protected export is opened with its key at restore time.
        bkimg_format::store::ExportFile::open(e)
            .with_context(|| format!("--include-export {}", e.display()))?;
        if export_names.contains(&name) {
            bail!("two exports are named {name}: rename one");
        }
        export_names.push(name);
    }
    let secrets = config_text.as_deref().map(secrets_in).unwrap_or_default();

    let kernel = match &opts.kernel {
        None => debian_kernel(&opts.cache_dir, log)?,
        Some(k) if k.extension().is_some_and(|e| e == "deb") => {
            log(&format!("using the kernel package {}", k.display()));
            extract_kernel(k, &opts.cache_dir)?
        }
        Some(k) => own_kernel(k)?,
    };
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow!("SOURCE_DATE_EPOCH={v} is not a number of seconds"))?,
        Err(_) => kernel.epoch,
    };
    log(&format!("kernel {}", kernel.version));

    let mut initrd = Archive::new();
    let (modules, missing) = add_modules(&mut initrd, &kernel)?;
    add_userland(&mut initrd, opts)?;
    if let Some(text) = &config_text {
        initrd.file(INITRD_CONFIG, 0o600, text.clone().into_bytes());
    }
    // The media id ties the initramfs to the media it was built with (the init looks for
    // it on every disk), and is derived from the inputs so it is reproducible too.
    let mut h = Sha256::new();
    let mut raw = Vec::new();
    initrd.write(&mut raw, epoch as u32)?;
    h.update(&raw);
    h.update(std::fs::read(&kernel.vmlinuz)?);
    for (name, path) in export_names.iter().zip(&opts.exports) {
        h.update(name.as_bytes());
        h.update(std::fs::metadata(path)?.len().to_le_bytes());
    }
    let media_id = hex::encode(&h.finalize()[..12]);
    initrd.file(INITRD_MEDIA_ID, 0o644, format!("{media_id}\n").into_bytes());
    raw.clear();
    initrd.write(&mut raw, epoch as u32)?;
    log(&format!(
        "initramfs: {} modules, {} MiB before compression",
        modules,
        raw.len() >> 20
    ));
    let compressed = zstd::bulk::compress(&raw, 12).context("compressing the initramfs")?;
    drop(raw);

    let stage = tempfile::Builder::new()
        .prefix(".bkimg-rescue-")
        .tempdir_in(parent_of(&opts.output))
        .context("creating a staging directory beside --output")?;
    let root = stage.path().join("iso");
    std::fs::create_dir_all(root.join("boot/grub"))?;
    std::fs::create_dir_all(root.join("bkimg"))?;
    std::fs::copy(&kernel.vmlinuz, root.join("boot/vmlinuz"))?;
    std::fs::write(root.join("boot/initrd.zst"), &compressed)?;
    std::fs::write(root.join(MEDIA_ID), format!("{media_id}\n"))?;
    std::fs::write(root.join("boot/grub/grub.cfg"), grub_cfg(&media_id))?;

    let partial = stage.path().join("image");
    log("writing the image (grub-mkimage, xorriso)");
    let exports: Vec<(String, PathBuf)> = export_names
        .iter()
        .cloned()
        .zip(
            opts.exports
                .iter()
                .map(std::fs::canonicalize)
                .collect::<Result<Vec<_>, _>>()?,
        )
        .collect();
    hybrid_image(
        &root,
        &stage.path().join("work"),
        &partial,
        &media_id,
        &exports,
        epoch,
    )?;
    let bytes = std::fs::metadata(&partial)?.len();
    let sha256 = {
        let mut h = Sha256::new();
        let mut f = std::fs::File::open(&partial)?;
        std::io::copy(&mut f, &mut h)?;
        hex::encode(h.finalize())
    };
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, &opts.output).or_else(|_| {
        // Another filesystem: copy, then sync.
        std::fs::copy(&partial, &opts.output)?;
        std::fs::File::open(&opts.output)?.sync_all()
    })?;

    if let Some(dir) = &opts.pxe_dir {
        write_pxe(dir, &kernel.vmlinuz, &compressed)?;
        log(&format!("PXE files in {}", dir.display()));
    }
    Ok(BuildReport {
        output: opts.output.clone(),
        bytes,
        sha256,
        media_id,
        kernel: kernel.version,
        modules,
        modules_missing: missing,
        initramfs_bytes: compressed.len() as u64,
        exports: export_names,
        secrets,
        source_date_epoch: epoch,
        pxe_dir: opts.pxe_dir.clone(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// GRUB modules built into both boot images: enough to find the media and boot Linux;
/// the rest load from /boot/grub/PLATFORM on the media.
const GRUB_MODULES: &[&str] = &[
    "part_gpt",
    "part_msdos",
    "iso9660",
    "fat",
    "search",
    "search_fs_file",
    "normal",
    "configfile",
    "linux",
    "echo",
    "test",
    "serial",
    "terminal",
    "all_video",
];

/// Writes the ISO 9660 hybrid `out` from the tree `root` plus `exports` (name, file):
/// El Torito BIOS boot (GRUB's eltorito core) and a hybrid MBR for USB sticks under BIOS,
/// an EFI system partition image with BOOTX64.EFI for UEFI (CD and disk). Both GRUB cores
/// find the media by a file named after its id and read /boot/grub/grub.cfg from it.
fn hybrid_image(
    root: &Path,
    work: &Path,
    out: &Path,
    media_id: &str,
    exports: &[(String, PathBuf)],
    epoch: u64,
) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let marker = format!("/bkimg/media-{media_id}");
    std::fs::write(root.join(marker.trim_start_matches('/')), b"")?;
    let early = work.join("early.cfg");
    std::fs::write(
        &early,
        format!("search --no-floppy --file --set=root {marker}\nset prefix=($root)/boot/grub\n"),
    )?;
    // BIOS: the El Torito core, and the platform's modules beside it.
    let bios_dir = root.join("boot/grub/i386-pc");
    copy_grub_platform(Path::new("/usr/lib/grub/i386-pc"), &bios_dir)?;
    run(Command::new("grub-mkimage")
        .args([
            "-O",
            "i386-pc-eltorito",
            "-d",
            "/usr/lib/grub/i386-pc",
            "-p",
            "/boot/grub",
        ])
        .arg("-c")
        .arg(&early)
        .arg("-o")
        .arg(bios_dir.join("eltorito.img"))
        .args(GRUB_MODULES)
        .arg("biosdisk"))?;
    // UEFI: BOOTX64.EFI in a small FAT image that becomes the EFI system partition.
    copy_grub_platform(
        Path::new("/usr/lib/grub/x86_64-efi"),
        &root.join("boot/grub/x86_64-efi"),
    )?;
    let efi = work.join("bootx64.efi");
    run(Command::new("grub-mkimage")
        .args([
            "-O",
            "x86_64-efi",
            "-d",
            "/usr/lib/grub/x86_64-efi",
            "-p",
            "/boot/grub",
        ])
        .arg("-c")
        .arg(&early)
        .arg("-o")
        .arg(&efi)
        .args(GRUB_MODULES))?;
    let fat = root.join("efi.img");
    let kib = (std::fs::metadata(&efi)?.len() / 1024 + 512).next_multiple_of(64);
    run(Command::new("mkfs.vfat")
        .args(["--invariant", "-n", "BKIMG_EFI", "-C"])
        .arg(&fat)
        .arg(kib.to_string()))?;
    // Copied as a tree with its times kept: mtools' mmd would stamp the directories with
    // the current time.
    let esp = work.join("esp");
    std::fs::create_dir_all(esp.join("EFI/BOOT"))?;
    std::fs::rename(&efi, esp.join("EFI/BOOT/BOOTX64.EFI"))?;
    set_tree_time(&esp, epoch)?;
    run(Command::new("mcopy")
        .args(["-s", "-m", "-i"])
        .arg(&fat)
        .arg(esp.join("EFI"))
        .arg("::/"))?;
    // The exports' directory exists in the tree so that it gets the fixed time too.
    std::fs::create_dir_all(root.join(EXPORTS_DIR))?;
    set_tree_time(root, epoch)?;

    let mut cmd = Command::new("xorriso");
    cmd.env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(["-as", "mkisofs", "-graft-points", "-R", "-iso-level", "3"])
        .args(["-V", "BKIMG_RESCUE"])
        .arg(format!("--modification-date={}", iso_date(epoch)))
        .args(["-b", "boot/grub/i386-pc/eltorito.img", "-no-emul-boot"])
        .args([
            "-boot-load-size",
            "4",
            "-boot-info-table",
            "--grub2-boot-info",
        ])
        .args(["--grub2-mbr", "/usr/lib/grub/i386-pc/boot_hybrid.img"])
        .args([
            "--efi-boot",
            "efi.img",
            "-efi-boot-part",
            "--efi-boot-image",
        ])
        .arg("--protective-msdos-label")
        .arg("-o")
        .arg(out)
        .arg(root);
    for (name, path) in exports {
        cmd.arg(format!("/{EXPORTS_DIR}/{name}={}", path.display()));
    }
    run(&mut cmd).context("writing the image (xorriso)")?;
    Ok(())
}

/// GRUB's modules and lists of one platform (what its config may load at boot).
fn copy_grub_platform(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let mut names: Vec<_> = std::fs::read_dir(from)
        .with_context(|| format!("reading {}", from.display()))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let n = name.to_string_lossy();
        if n.ends_with(".mod") || n.ends_with(".lst") {
            std::fs::copy(from.join(&name), to.join(&name))?;
        }
    }
    Ok(())
}

/// Every file and directory under `root` gets the time `epoch` (xorriso records them).
fn set_tree_time(root: &Path, epoch: u64) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            }
            all.push(e.path());
        }
    }
    all.push(root.to_path_buf());
    for chunk in all.chunks(200) {
        run(Command::new("touch")
            .args(["-h", "-d", &format!("@{epoch}")])
            .args(chunk))?;
    }
    Ok(())
}

/// "YYYYMMDDhhmmss00" (UTC) of a Unix time, as xorriso's --modification-date wants it.
pub fn iso_date(epoch: u64) -> String {
    let t = i64::try_from(epoch)
        .ok()
        .and_then(|e| time::OffsetDateTime::from_unix_timestamp(e).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year][month][day][hour][minute][second]00");
    t.format(f).expect("a fixed format of a valid date")
}

/// Every tool the build runs is there, or one message names the packages to install.
fn check_host() -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for (tool, package) in HOST_TOOLS {
        if which(tool).is_none() && !missing.contains(package) {
            missing.push(package);
        }
    }
    for (dir, package) in GRUB_PLATFORMS {
        if !Path::new(dir).join("modinfo.sh").exists() {
            missing.push(package);
        }
    }
    if !missing.is_empty() {
        bail!(
            "building recovery media needs Debian packages that are not installed: \
             apt-get install {}",
            missing.join(" ")
        );
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Downloads (once) the kernel package `linux-image-amd64` points at.
fn debian_kernel(cache: &Path, log: &dyn Fn(&str)) -> Result<Kernel> {
    let depends = run(Command::new("apt-cache").args([
        "depends",
        "--no-recommends",
        "--no-suggests",
        "linux-image-amd64",
    ]))
    .context("asking apt which kernel linux-image-amd64 is (is this Debian?)")?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| anyhow!("apt names no kernel for linux-image-amd64: run apt-get update"))?
        .trim()
        .to_string();
    let show = run(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
    let field = |name: &str| {
        show.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .ok_or_else(|| anyhow!("apt-cache show {package} has no {name}"))
    };
    let (filename, sha) = (field("Filename:")?, field("SHA256:")?);
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)
        .with_context(|| format!("creating the cache {}", debs.display()))?;
    let deb = debs.join(filename.rsplit('/').next().unwrap_or(&filename));
    if !deb.exists() || file_sha256(&deb)? != sha {
        log(&format!("downloading {package} with apt"));
        let dl = tempfile::tempdir_in(&debs)?;
        run(Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(dl.path()))
        .context("downloading the kernel (apt-get download)")?;
        let got = std::fs::read_dir(dl.path())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| anyhow!("apt-get download {package} left no .deb"))?;
        if file_sha256(&got)? != sha {
            bail!("the downloaded {package} does not match apt's SHA-256: run apt-get update");
        }
        std::fs::rename(&got, &deb)?;
    }
    extract_kernel(&deb, cache)
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Unpacks a kernel package once (keyed by its digest) and indexes its modules.
fn extract_kernel(deb: &Path, cache: &Path) -> Result<Kernel> {
    let key = &file_sha256(deb)?[..16];
    let dir = cache.join(format!("kernel-{key}"));
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(cache)?;
        let tmp = tempfile::tempdir_in(cache)?;
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(tmp.path()))
            .with_context(|| format!("unpacking {}", deb.display()))?;
        let (base, version) = modules_base(tmp.path())?;
        run(Command::new("depmod").arg("-b").arg(&base).arg(&version))
            .context("indexing the kernel's modules (depmod)")?;
        std::fs::write(tmp.path().join(".complete"), b"")?;
        std::fs::rename(tmp.keep(), &dir)?;
    }
    let (base, version) = modules_base(&dir)?;
    let vmlinuz = dir.join(format!("boot/vmlinuz-{version}"));
    if !vmlinuz.exists() {
        bail!("{} holds no boot/vmlinuz-{version}", deb.display());
    }
    let epoch = mtime(&vmlinuz)?;
    Ok(Kernel {
        vmlinuz,
        modules: base.join("lib/modules").join(&version),
        version,
        epoch,
    })
}

/// The root depmod works on (where lib/modules/VERSION is: "/" or "usr/") and VERSION.
fn modules_base(root: &Path) -> Result<(PathBuf, String)> {
    for base in [root.to_path_buf(), root.join("usr")] {
        if let Ok(entries) = std::fs::read_dir(base.join("lib/modules")) {
            if let Some(v) = entries.flatten().next() {
                return Ok((base, v.file_name().to_string_lossy().into_owned()));
            }
        }
    }
    bail!("the kernel package holds no lib/modules/VERSION directory")
}

fn mtime(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()))
}

/// A bzImage given directly: its version from the setup header, modules from this system.
fn own_kernel(vmlinuz: &Path) -> Result<Kernel> {
    let data = std::fs::read(vmlinuz)
        .with_context(|| format!("reading --kernel {}", vmlinuz.display()))?;
    let version = bzimage_version(&data).ok_or_else(|| {
        anyhow!(
            "--kernel {} is neither a .deb nor a bzImage kernel",
            vmlinuz.display()
        )
    })?;
    let modules = Path::new("/lib/modules").join(&version);
    if !modules.join("modules.dep").exists() {
        bail!(
            "--kernel {} is version {version}, but {} has no modules.dep: install its modules or pass its .deb",
            vmlinuz.display(),
            modules.display()
        );
    }
    Ok(Kernel {
        epoch: mtime(vmlinuz)?,
        vmlinuz: vmlinuz.to_path_buf(),
        modules,
        version,
    })
}

/// The version string of a bzImage (boot protocol ≥ 2.00: "HdrS" at 0x202, the offset of
/// the version string minus 0x200 at 0x20e).
pub fn bzimage_version(data: &[u8]) -> Option<String> {
    if data.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*data.get(0x20e)?, *data.get(0x20f)?]) as usize + 0x200;
    let s = data.get(ptr..ptr + 256)?;
    let end = s.iter().position(|&b| b == 0 || b == b' ')?;
    Some(String::from_utf8_lossy(&s[..end]).into_owned())
}

fn add_modules(initrd: &mut Archive, kernel: &Kernel) -> Result<(usize, Vec<String>)> {
    let dep = std::fs::read_to_string(kernel.modules.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", kernel.modules.display()))?;
    let db = ModuleDb::parse(&dep);
    let (order, missing) = db.load_order(WANTED);
    let base = format!("lib/modules/{}", kernel.version);
    for rel in &order {
        let data = std::fs::read(kernel.modules.join(rel))
            .with_context(|| format!("reading module {rel}"))?;
        initrd.file(&format!("{base}/{rel}"), 0o644, data);
    }
    initrd.file(
        &format!("{base}/modules.dep"),
        0o644,
        db.subset(&order).into_bytes(),
    );
    // One line per module: its path, then the names it needs (the init skips a module
    // whose dependency found no hardware).
    let mut load = String::new();
    for rel in &order {
        let deps = db.deps_of(&crate::modules::name_of(rel)).join(" ");
        load.push_str(&format!("/{base}/{rel} {deps}\n"));
    }
    initrd.file(INITRD_MODULES, 0o644, load.into_bytes());
    Ok((order.len(), missing))
}

fn add_userland(initrd: &mut Archive, opts: &BuildOptions) -> Result<()> {
    for d in ["dev", "proc", "sys", "run", "tmp", "mnt", "root"] {
        initrd.dir(d);
    }
    initrd.insert(
        "dev/console",
        Node::CharDev {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    let busybox = std::fs::read(&opts.busybox).with_context(|| {
        format!(
            "reading {} (install busybox-static)",
            opts.busybox.display()
        )
    })?;
    if elf_interpreter(&busybox).is_some() {
        bail!(
            "{} is dynamically linked: the image needs busybox-static",
            opts.busybox.display()
        );
    }
    initrd.file("bin/busybox", 0o755, busybox);
    let applets =
        run(Command::new(&opts.busybox).arg("--list-full")).context("listing busybox applets")?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if !initrd.contains(applet) {
            initrd.symlink(applet, "/bin/busybox");
        }
    }
    // bkimg is /init, with the shared libraries it was linked against at their paths.
    let bkimg = without_debug_info(&opts.bkimg)?;
    if let Some(interp) = elf_interpreter(&bkimg) {
        for lib in shared_libraries(&opts.bkimg)?.into_iter().chain([interp]) {
            let data = std::fs::read(&lib).with_context(|| format!("reading {lib}"))?;
            initrd.file(&lib, 0o755, data);
        }
    }
    initrd.file("init", 0o755, bkimg);
    initrd.symlink("bin/bkimg", "/init");
    initrd.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    );
    initrd.file("etc/group", 0o644, b"root:x:0:\n".to_vec());
    initrd.file(
        "etc/profile",
        0o644,
        b"export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport PS1='bkimg-rescue# '\n".to_vec(),
    );
    initrd.file(
        "usr/share/udhcpc/default.script",
        0o755,
        UDHCPC_SCRIPT.to_vec(),
    );
    initrd.file(
        "etc/hosts",
        0o644,
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
    );
    // For https:// S3 endpoints (and the S3 client refuses to start without any): this
    // system's certificate authorities.
    let cas = Path::new("/etc/ssl/certs/ca-certificates.crt");
    let data = std::fs::read(cas)
        .with_context(|| format!("reading {} (install ca-certificates)", cas.display()))?;
    initrd.file("etc/ssl/certs/ca-certificates.crt", 0o644, data);
    Ok(())
}

/// busybox udhcpc calls this with the lease in its environment.
const UDHCPC_SCRIPT: &[u8] = b"#!/bin/sh
case \"$1\" in
  deconfig) ip addr flush dev \"$interface\"; ip link set \"$interface\" up ;;
  bound|renew)
    ip addr flush dev \"$interface\"
    ip addr add \"$ip/${mask:-24}\" dev \"$interface\"
    for r in $router; do ip route add default via \"$r\" dev \"$interface\"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo \"nameserver $d\" >> /etc/resolv.conf; done ;;
esac
";

/// The binary without its debug sections when binutils' objcopy is there (a debug build
/// is ten times larger), else as it is.
fn without_debug_info(binary: &Path) -> Result<Vec<u8>> {
    if which("objcopy").is_some() {
        let tmp = tempfile::NamedTempFile::new()?;
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(tmp.path())
            .status()
            .is_ok_and(|s| s.success());
        if stripped {
            return Ok(std::fs::read(tmp.path())?);
        }
    }
    std::fs::read(binary).with_context(|| format!("reading the bkimg binary {}", binary.display()))
}

/// The PT_INTERP of an x86-64 ELF executable: None for a static one.
pub fn elf_interpreter(elf: &[u8]) -> Option<String> {
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(0x20)? as usize;
    let (phentsize, phnum) = (u16_at(0x36)? as usize, u16_at(0x38)? as usize);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32::from_le_bytes(elf.get(ph..ph + 4)?.try_into().ok()?) == 3 {
            let (off, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize);
            let s = elf.get(off..off + size)?;
            return Some(String::from_utf8_lossy(s.split(|&b| b == 0).next()?).into_owned());
        }
    }
    None
}

/// Absolute paths of the shared libraries `binary` loads (from ldd).
fn shared_libraries(binary: &Path) -> Result<Vec<String>> {
    let out = run(Command::new("ldd").arg(binary)).context("listing bkimg's libraries (ldd)")?;
    let mut libs = Vec::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_string());
        }
    }
    Ok(libs)
}

fn kernel_args(media_id: &str) -> String {
    // The last console is /dev/console, where a person answers: the screen. The init
    // writes its lines to the serial port too. quiet: drivers for absent hardware
    // (Hyper-V, Xen) complain; the init says what matters.
    format!("console=ttyS0,115200 console=tty0 quiet panic=0 bkimg.media={media_id}")
}

fn grub_cfg(media_id: &str) -> String {
    let args = kernel_args(media_id);
    format!(
        "set default=0
set timeout=5
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
menuentry 'bkimg rescue' {{
  linux /boot/vmlinuz {args}
  initrd /boot/initrd.zst
}}
menuentry 'bkimg rescue: restore unattended' {{
  linux /boot/vmlinuz {args} bkimg.auto=1
  initrd /boot/initrd.zst
}}
menuentry 'bkimg rescue: shell only' {{
  linux /boot/vmlinuz {args} bkimg.shell=1
  initrd /boot/initrd.zst
}}
"
    )
}

/// Network boot files: no media to look for (`bkimg.media=none`).
fn write_pxe(dir: &Path, vmlinuz: &Path, initrd: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(vmlinuz, dir.join("vmlinuz"))?;
    let mut f = std::fs::File::create(dir.join("initrd.zst"))?;
    f.write_all(initrd)?;
    f.sync_all()?;
    let args = kernel_args("none");
    std::fs::write(
        dir.join("bkimg.ipxe"),
        format!("#!ipxe\nkernel vmlinuz {args}\ninitrd initrd.zst\nboot\n"),
    )?;
    std::fs::write(
        dir.join("grub.cfg"),
        format!(
            "set timeout=5\nmenuentry 'bkimg rescue' {{\n  linux vmlinuz {args}\n  initrd initrd.zst\n}}\n"
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_version_from_the_setup_header() {
        let mut k = vec![0u8; 0x4000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        let at = 0x3000usize;
        k[0x20e..0x210].copy_from_slice(&((at - 0x200) as u16).to_le_bytes());
        let v = b"6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP";
        k[at..at + v.len()].copy_from_slice(v);
        assert_eq!(bzimage_version(&k).as_deref(), Some("6.1.0-57-amd64"));
        assert_eq!(bzimage_version(&[0u8; 16]), None);
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0), "1970010100000000");
        assert_eq!(iso_date(951_782_400), "2000022900000000");
        assert_eq!(iso_date(1_795_713_176), "2026112617125600");
    }

    #[test]
    fn the_running_test_binary_is_dynamically_linked() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let interp = elf_interpreter(&me).expect("test binaries are dynamic");
        assert!(interp.contains("ld-linux"), "{interp}");
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn grub_menu_boots_with_serial_and_the_media_id() {
        let cfg = grub_cfg("abc123");
        assert!(cfg.contains("console=ttyS0,115200"));
        assert_eq!(cfg.matches("bkimg.media=abc123").count(), 3);
        assert!(cfg.contains("bkimg.auto=1"));
    }
}
