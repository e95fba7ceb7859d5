//! The rescue system's init (PID 1): brings up the machine without udev or systemd, finds
//! the media and the repository, maps disks, restores, and reboots, powers off or opens
//! a shell. A failure never reboots: it says what is wrong and opens a shell.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bkimg_format::keys::Secret;
use bkimg_format::progress::Progress;
use bkimg_format::protect::Protection;
use bkimg_format::repo::{Point, Repository};
use bkimg_format::store::local::RepoConfig;
use bkimg_format::store::{LocalDir, Protected};
use bkimg_restore::RestoreRequest;

use crate::config::{After, RescueConfig, SiteConfig};
use crate::disks::{self, SourceDisk};
use crate::image::{EXPORTS_DIR, INITRD_CONFIG, INITRD_MEDIA_ID, INITRD_MODULES, MEDIA_ID};

const MEDIA_MOUNT: &str = "/run/media";
const REPO_MOUNT: &str = "/run/repository";
const ESP_MOUNT: &str = "/run/esp";
const EFIVARS: &str = "/sys/firmware/efi/efivars";

/// Every line goes to each active console (serial and screen), prefixed for grepping; a
/// question is answered on whichever of them a person types first.
pub struct Console {
    outs: Mutex<Vec<std::fs::File>>,
    /// Device names of the active consoles ("ttyS0", "tty0"), for reading answers.
    names: Vec<String>,
}

impl Console {
    pub fn open() -> Console {
        let mut outs = Vec::new();
        let mut names = Vec::new();
        let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
        for name in active.split_whitespace() {
            if let Ok(f) = OpenOptions::new().write(true).open(format!("/dev/{name}")) {
                outs.push(f);
                names.push(name.to_string());
            }
        }
        if outs.is_empty() {
            if let Ok(f) = OpenOptions::new().write(true).open("/dev/console") {
                outs.push(f);
                names.push("console".to_string());
            }
        }
        Console {
            outs: Mutex::new(outs),
            names,
        }
    }

    pub fn line(&self, text: &str) {
        let mut outs = self.outs.lock().unwrap_or_else(|e| e.into_inner());
        for o in outs.iter_mut() {
            let _ = writeln!(o, "bkimg-rescue: {text}\r");
        }
        if outs.is_empty() {
            eprintln!("bkimg-rescue: {text}");
        }
    }

    /// Asks on every console and returns the first line typed on any of them, trimmed.
    fn ask(&self, question: &str) -> Result<String> {
        self.ask_with(question, false)
    }

    /// As `ask`, with the consoles' echo off (a secret).
    fn ask_secret(&self, question: &str) -> Result<String> {
        let answer = self.ask_with(question, true);
        self.line("");
        answer
    }

    fn ask_with(&self, question: &str, secret: bool) -> Result<String> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        use std::io::Read;
        use std::os::fd::AsFd;
        self.line(question);
        let ttys: Vec<std::fs::File> = self
            .names
            .iter()
            .filter_map(|n| std::fs::File::open(format!("/dev/{n}")).ok())
            .collect();
        if ttys.is_empty() {
            bail!("no console to ask on: set unattended = true (or bkimg.auto=1)");
        }
        let mut saved = Vec::new();
        if secret {
            for t in &ttys {
                if let Ok(old) = tcgetattr(t.as_fd()) {
                    let mut quiet = old.clone();
                    quiet.local_flags.remove(LocalFlags::ECHO);
                    let _ = tcsetattr(t.as_fd(), SetArg::TCSANOW, &quiet);
                    saved.push((t, old));
                }
            }
        }
        let answer = (|| loop {
            let mut fds: Vec<PollFd> = ttys
                .iter()
                .map(|t| PollFd::new(t.as_fd(), PollFlags::POLLIN))
                .collect();
            poll(&mut fds, PollTimeout::NONE).context("waiting for an answer")?;
            let ready = fds.iter().position(|f| {
                f.revents()
                    .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP))
            });
            let Some(i) = ready else {
                continue;
            };
            // In canonical mode one read returns one typed line.
            let mut buf = [0u8; 1024];
            let n = (&ttys[i]).read(&mut buf).context("reading the answer")?;
            let text = String::from_utf8_lossy(&buf[..n]);
            return Ok::<String, anyhow::Error>(text.trim().to_string());
        })();
        for (t, old) in saved {
            let _ = tcsetattr(t.as_fd(), SetArg::TCSANOW, &old);
        }
        answer
    }
}

/// Runs as PID 1; never returns.
pub fn main() -> ! {
    let _ = mount_basics();
    let console = Console::open();
    console.line(&format!(
        "bkimg {} recovery system",
        env!("CARGO_PKG_VERSION")
    ));
    if let Err(e) = load_modules(&console) {
        console.line(&format!("loading drivers failed: {e:#}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    loop {
        let result = if cmdline.split_whitespace().any(|w| w == "bkimg.shell=1") {
            Ok(After::Shell)
        } else {
            // A panic must not end PID 1 (the kernel would halt with no word on the
            // console): it is a failed attempt like any other.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session(&console, &cmdline)))
                .unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("unknown");
                    Err(anyhow!(
                        "internal error (a bkimg bug, please report it): {what}"
                    ))
                })
        };
        match result {
            Ok(After::Reboot) => finish(&console, nix::sys::reboot::RebootMode::RB_AUTOBOOT),
            Ok(After::Poweroff) => finish(&console, nix::sys::reboot::RebootMode::RB_POWER_OFF),
            Ok(After::Shell) => shell(&console, "type 'reboot' or 'poweroff' when done"),
            Err(e) => {
                console.line(&format!("RESTORE FAILED: {e:#}"));
                shell(
                    &console,
                    "nothing rebooted: fix the cause, then 'exit' to try again (or 'reboot')",
                );
            }
        }
    }
}

fn mount_basics() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let none: Option<&str> = None;
    for (src, dir, fs) in [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        let _ = std::fs::create_dir_all(dir);
        let _ = mount(Some(src), dir, Some(fs), MsFlags::empty(), none);
    }
    // Filesystems the kernel is asked for later load through busybox's modprobe.
    let _ = std::fs::write("/proc/sys/kernel/modprobe", "/sbin/modprobe\n");
    Ok(())
}

fn load_modules(console: &Console) -> Result<()> {
    use nix::errno::Errno;
    use nix::kmod::{finit_module, ModuleInitFlags};
    let list = std::fs::read_to_string(format!("/{INITRD_MODULES}"))?;
    let (mut loaded, mut failed) = (0, Vec::new());
    // Drivers whose hardware is absent, and the modules built on them (Hyper-V's vmbus
    // refuses to load outside Hyper-V, then its disk and network drivers cannot).
    let mut absent = std::collections::BTreeSet::new();
    for line in list.lines() {
        let mut words = line.split_whitespace();
        let Some(path) = words.next() else {
            continue;
        };
        let name = crate::modules::name_of(path);
        if words.any(|dep| absent.contains(dep)) {
            absent.insert(name);
            continue;
        }
        let result = std::fs::File::open(path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
            .and_then(|f| finit_module(&f, c"", ModuleInitFlags::empty()));
        match result {
            Ok(()) | Err(Errno::EEXIST) => loaded += 1,
            Err(Errno::ENODEV) => {
                absent.insert(name);
            }
            Err(e) => failed.push(format!("{name} ({e})")),
        }
    }
    console.line(&format!("{loaded} drivers loaded"));
    if !failed.is_empty() {
        console.line(&format!("drivers that did not load: {}", failed.join(", ")));
    }
    // Efivarfs carries the boot entries; only there when booted by UEFI.
    if Path::new("/sys/firmware/efi").exists() {
        let _ = std::fs::create_dir_all("/sys/firmware/efi/efivars");
        let _ = nix::mount::mount(
            Some("efivarfs"),
            "/sys/firmware/efi/efivars",
            Some("efivarfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    Ok(())
}

/// One attempt: config, media, repository, point, disk map, restore.
fn session(console: &Console, cmdline: &str) -> Result<After> {
    let built_in = std::fs::read_to_string(format!("/{INITRD_CONFIG}")).unwrap_or_default();
    // Checked before anything waits for media: a broken image says so at once.
    let built_in_site = SiteConfig::parse(&built_in)
        .map_err(|e| anyhow!("the built-in config file is invalid: {e}"))?;
    let wait = Duration::from_secs(60);
    // Booted from the network: no media to wait for.
    let media = if cmdline.split_whitespace().any(|w| w == "bkimg.media=none") {
        None
    } else {
        find_media(console, wait)?
    };
    let site_partition = site_partition(console, media.as_ref())?;
    let site = match &site_partition {
        Some(p) => SiteConfig::parse_layers(&[&built_in, &p.text]).map_err(|e| {
            anyhow!(
                "{SITE_FILE} on {} ({SITE_LABEL}) is invalid: {e}",
                p.dev.display()
            )
        })?,
        None => built_in_site,
    };
    let mut config = site.rescue.clone();
    config
        .apply_cmdline(cmdline)
        .map_err(|e| anyhow!("kernel command line: {e}"))?;
    let host = identify(&config);
    if let Some((name, how)) = &host {
        console.line(&format!("this machine is host {name} ({how})"));
    }
    let host = host.map(|(name, _)| name);
    let site_key = site_partition.as_ref().and_then(|p| p.key.as_deref());
    let repo_path = repository_path(
        &config,
        site.repository.as_deref(),
        media.as_ref(),
        host.as_deref(),
        site_key,
    )?;
    console.line(&format!("repository: {}", repo_path.display()));
    let url = repo_path.to_str().unwrap_or_default();
    let remote = url.starts_with("s3://") || url.starts_with("bkimg://");
    let repo = if url.starts_with("s3://") {
        open_s3(console, &config, &site, url, site_key)?
    } else if url.starts_with("bkimg://") {
        open_standby(console, &config, url, site_key)?
    } else if repo_path.is_dir() {
        let (store, repo_config) = LocalDir::open_any(&repo_path)
            .with_context(|| format!("opening the repository {}", repo_path.display()))?;
        let protection = unlock(
            console,
            &config,
            &repo_config,
            &store.key_slots()?,
            site_key,
        )?;
        Repository::new(Box::new(Protected::new(store, protection)))
    } else {
        open_export(console, &config, &repo_path, site_key)
            .with_context(|| format!("opening the repository {}", repo_path.display()))?
    };
    let point = choose_point(console, &repo, &config, host.as_deref())?;
    let sources: Vec<SourceDisk> = point
        .manifest
        .disks
        .iter()
        .map(|d| SourceDisk {
            name: d.name.clone(),
            size: d.size,
            sector: d.logical_sector_size,
        })
        .collect();
    let mut candidates = disks::discover(
        Path::new("/sys/block"),
        Path::new("/dev"),
        media.as_ref().map(|m| m.disk.as_str()),
    );
    // A repository on a local disk (LABEL=, UUID=, or a path under some mount): that
    // disk is read from, never written.
    if let Some(disk) = disk_holding(&repo_path) {
        for c in candidates.iter_mut().filter(|c| c.name == disk) {
            c.holds_repository = true;
        }
    }
    // The disk carrying the site's settings belongs to the rescue media.
    if let Some(p) = &site_partition {
        for c in candidates.iter_mut().filter(|c| c.name == p.disk) {
            c.is_media = true;
        }
    }
    for c in &candidates {
        console.line(&format!(
            "disk {}: {}{}{}",
            c.dev.display(),
            disks::describe(c),
            if c.is_media {
                ", rescue media"
            } else if c.holds_repository {
                ", holds the repository"
            } else {
                ""
            },
            c.holds
                .as_deref()
                .map(|h| format!(", holds {h}"))
                .unwrap_or_default()
        ));
    }
    let automatic = disks::map_disks(
        &sources,
        &candidates,
        &config.disks,
        config.overwrite,
        &resolve_link,
    );
    let targets = if config.unattended {
        automatic?
    } else {
        choose_targets(console, &sources, &candidates, automatic)?
    };
    for (disk, target) in &targets {
        let size = sources
            .iter()
            .find(|s| &s.name == disk)
            .map_or(0, |s| s.size);
        console.line(&format!(
            "plan: {disk} ({}) of {} -> {}",
            disks::size(size),
            point.manifest.id,
            target.display()
        ));
    }
    if !config.unattended {
        let answer =
            console.ask("type 'yes' to overwrite the disks above, anything else to stop:")?;
        if answer != "yes" {
            bail!("not confirmed: nothing was written");
        }
    }
    let req = RestoreRequest {
        targets,
        volume: None,
        // Many requests in flight hide the network's latency (as bkimg restore does).
        workers: config.threads.unwrap_or(if url.starts_with("s3://") {
            32
        } else if remote {
            16
        } else {
            8
        }),
    };
    let progress = ConsoleProgress::new(console);
    if let Some(up) = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
    {
        console.line(&format!("restore starts {up:.1} s after the kernel did"));
    }
    let started = Instant::now();
    let report = bkimg_restore::restore(&repo, &point, &req, &progress).with_context(|| {
        format!(
            "restoring {} ({} may be partly written: restore again from an undamaged copy)",
            point.manifest.id,
            req.targets
                .iter()
                .map(|(_, t)| t.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    let efi = std::fs::read_dir(EFIVARS).is_ok_and(|mut d| d.next().is_some());
    if config.boot_entry.unwrap_or(true) && efi {
        if let Err(e) = boot_entry(console, &point, &req.targets) {
            console.line(&format!(
                "warning: no UEFI boot entry was made: {e:#} (the firmware may still find the \
                 restored disk by its removable-media path)"
            ));
        }
    }
    console.line(&format!(
        "restored {} ({} written, {} chunks verified) in {secs:.1} s, {:.1} MiB/s",
        point.manifest.id,
        disks::size(report.bytes_written),
        report.chunks_verified,
        report.bytes_written as f64 / secs.max(0.001) / (1 << 20) as f64
    ));
    Ok(config.after)
}

/// The disk menu: for each source disk, the disks that can take it, numbered, the
/// automatic choice (when there is one) taken with Enter.
fn choose_targets(
    console: &Console,
    sources: &[SourceDisk],
    candidates: &[disks::Candidate],
    automatic: Result<Vec<(String, PathBuf)>, disks::MapError>,
) -> Result<Vec<(String, PathBuf)>> {
    let proposed = match automatic {
        Ok(plan) => plan,
        Err(e) => {
            console.line(&format!("no automatic choice: {e}"));
            Vec::new()
        }
    };
    let mut chosen: Vec<(String, PathBuf)> = Vec::new();
    for source in sources {
        let taken: Vec<&str> = chosen
            .iter()
            .filter_map(|(_, t)| candidates.iter().find(|c| &c.dev == t))
            .map(|c| c.name.as_str())
            .collect();
        let options = disks::eligible(source, candidates, &taken);
        if options.is_empty() {
            bail!(
                "no disk of this machine can take {} ({}, {}-byte sectors): attach one at \
                 least that large; nothing was written",
                source.name,
                disks::size(source.size),
                source.sector
            );
        }
        console.line(&format!(
            "disks that can take {} ({}):",
            source.name,
            disks::size(source.size)
        ));
        for (i, c) in options.iter().enumerate() {
            console.line(&format!(
                "  [{}] {}: {}{}",
                i + 1,
                c.dev.display(),
                disks::describe(c),
                c.holds
                    .as_deref()
                    .map(|h| format!(", holds {h}: it will be overwritten"))
                    .unwrap_or_default()
            ));
        }
        let default = proposed
            .iter()
            .find(|(d, _)| d == &source.name)
            .and_then(|(_, t)| options.iter().position(|c| &c.dev == t));
        let question = match default {
            Some(i) => format!(
                "restore {} onto which disk? [1-{}, Enter for {}]",
                source.name,
                options.len(),
                options[i].dev.display()
            ),
            None => format!(
                "restore {} onto which disk? [1-{}]",
                source.name,
                options.len()
            ),
        };
        let pick = loop {
            let answer = console.ask(&question)?;
            if answer.is_empty() {
                if let Some(i) = default {
                    break i;
                }
            }
            match answer.parse::<usize>() {
                Ok(n) if (1..=options.len()).contains(&n) => break n - 1,
                _ => console.line(&format!("{answer:?} is not one of the numbers listed")),
            }
        };
        chosen.push((source.name.clone(), options[pick].dev.clone()));
    }
    Ok(chosen)
}

/// A repository in a bucket: the network first, then credentials from the config or the
/// kernel command line, the endpoint and region from the config file's [s3].
fn open_s3(
    console: &Console,
    config: &RescueConfig,
    site: &SiteConfig,
    url: &str,
    site_key: Option<&[u8]>,
) -> Result<Repository> {
    let how = crate::net::bring_up(&config.network, Duration::from_secs(60))?;
    console.line(&format!("network: {how}"));
    // PID 1 has started no thread yet: setting the environment is safe here. The SDK
    // reads it; nothing asks an EC2 metadata service that is not there.
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    if let Some(k) = &config.aws_access_key_id {
        std::env::set_var("AWS_ACCESS_KEY_ID", k);
    }
    if let Some(k) = &config.aws_secret_access_key {
        std::env::set_var("AWS_SECRET_ACCESS_KEY", k);
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() && !config.unattended {
        console.line(&format!("{url} needs S3 credentials"));
        let id = console.ask("S3 access key id:")?;
        let secret = console.ask_secret("S3 secret access key (not shown):")?;
        if !id.is_empty() {
            std::env::set_var("AWS_ACCESS_KEY_ID", id);
            std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
        }
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        bail!(
            "no S3 credentials: set aws-access-key-id and aws-secret-access-key in [rescue] \
             or bkimg.s3-access-key= and bkimg.s3-secret-key= on the kernel command line"
        );
    }
    let settings = bkimg_replicate::s3::S3Settings {
        endpoint: None,
        fallback_endpoint: site.s3.endpoint.clone(),
        fallback_region: site.s3.region.clone(),
    };
    let store = bkimg_replicate::s3::S3Store::open(url, &settings)?;
    let repo_config = store
        .config(true)
        .with_context(|| format!("reaching the repository {url}"))?;
    let slots = if repo_config.encryption.is_some() {
        store.key_slots()?
    } else {
        Vec::new()
    };
    let protection = unlock(console, config, &repo_config, &slots, site_key)?;
    Ok(Repository::new(Box::new(Protected::new(store, protection))))
}

/// An export file; a protected one (spec/format.md §10.3) unlocked as a repository is.
fn open_export(
    console: &Console,
    config: &RescueConfig,
    path: &Path,
    site_key: Option<&[u8]>,
) -> Result<Repository> {
    if !bkimg_format::store::ExportFile::looks_like_export(path) {
        return Ok(Repository::open(path)?);
    }
    let export = bkimg_format::store::ExportFile::open(path)?;
    if !export.is_protected() {
        return Ok(Repository::new(Box::new(export)));
    }
    let repo_config = export.repo_config()?;
    let protection = unlock(
        console,
        config,
        &repo_config,
        &export.key_slots()?,
        site_key,
    )?;
    Ok(Repository::new(Box::new(Protected::new(
        export, protection,
    ))))
}

/// The protection of an encrypted or signed repository, unlocked with its key file
/// (`key-file`, else `bkimg.key` on the BKIMG-CONF partition), else with a passphrase a
/// person types at the console (not echoed). Nothing to unlock with, unattended: refused.
fn unlock(
    console: &Console,
    config: &RescueConfig,
    repo_config: &RepoConfig,
    slots: &[(String, Vec<u8>)],
    site_key: Option<&[u8]>,
) -> Result<Arc<Protection>> {
    let Some(enc) = &repo_config.encryption else {
        return Ok(Arc::new(Protection::none()));
    };
    let mode = match enc.mode {
        bkimg_format::keys::Mode::Signed => "signed",
        _ => "encrypted",
    };
    if let Some(bytes) = rescue_key(config, site_key)? {
        let key = bkimg_format::keys::parse_key_file(&bytes)
            .context("the key file is not a bkimg key file (32 bytes, or 64 hex digits)")?;
        let p = Protection::unlock(repo_config, slots, Secret::KeyFile(&key))?;
        console.line(&format!(
            "the repository is {mode}: unlocked with its key file"
        ));
        return Ok(Arc::new(p));
    }
    if config.unattended {
        bail!(
            "the repository is {mode} and no key file was given: set key-file in [rescue] \
             (LABEL=NAME:/path on a second stick, or a path on the media), put it on the \
             BKIMG-CONF partition as bkimg.key, or boot with bkimg.auto=0 to type the \
             passphrase"
        );
    }
    let passphrase = console.ask_secret(&format!(
        "the repository is {mode}: passphrase (not shown):"
    ))?;
    let p = Protection::unlock(
        repo_config,
        slots,
        Secret::Passphrase(passphrase.as_bytes()),
    )
    .map_err(|e| match e {
        bkimg_format::FormatError::Denied(m) => {
            anyhow!("{m}: check the passphrase and try again (exit)")
        }
        other => other.into(),
    })?;
    console.line("unlocked");
    Ok(Arc::new(p))
}

/// Mounts read-only, at `dir`, the filesystem "LABEL=NAME:/path" or "UUID=...:/path"
/// names, and returns where the path is in it. `setting` names the setting in messages.
fn mount_labelled(setting: &str, spec: &str, dir: &str) -> Result<PathBuf> {
    let (fs_spec, path) = spec
        .split_once(':')
        .ok_or_else(|| anyhow!("{setting} {spec:?}: write LABEL=NAME:/path/in/it"))?;
    let dev =
        findfs(fs_spec).ok_or_else(|| anyhow!("no filesystem with {fs_spec} on this machine"))?;
    let fs = fs_type(&dev).ok_or_else(|| {
        anyhow!(
            "{} ({fs_spec}) holds no filesystem the rescue reads",
            dev.display()
        )
    })?;
    mount_ro(&dev, dir, fs)
        .with_context(|| format!("mounting {} ({fs_spec}) read-only", dev.display()))?;
    Ok(Path::new(dir).join(path.trim_start_matches('/')))
}

/// The bytes of a key file: "LABEL=NAME:/path" or "UUID=...:/path" on another disk
/// (mounted read-only for the read), else a path on the media, else as given.
/// The key file the rescue was given: `key-file`, else `bkimg.key` on BKIMG-CONF.
fn rescue_key(config: &RescueConfig, site_key: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
    Ok(match &config.key_file {
        Some(spec) => Some(read_key_file(spec)?),
        None => site_key.map(<[u8]>::to_vec),
    })
}

fn read_key_file(spec: &str) -> Result<Vec<u8>> {
    if spec.starts_with("LABEL=") || spec.starts_with("UUID=") {
        let path = mount_labelled("key-file", spec, KEY_MOUNT)?;
        let bytes = std::fs::read(&path);
        let _ = nix::mount::umount(KEY_MOUNT);
        return bytes.with_context(|| format!("reading the key file {spec}"));
    }
    let on_media = Path::new(MEDIA_MOUNT).join(spec.trim_start_matches('/'));
    let path = if on_media.exists() {
        on_media
    } else {
        PathBuf::from(spec)
    };
    std::fs::read(&path).with_context(|| format!("reading the key file {}", path.display()))
}

/// Settings kept apart from the image (credentials, the site's repository): a small
/// filesystem labelled BKIMG-CONF, on a second partition of the stick or another stick,
/// holding bkimg-rescue.toml. Layered over the built-in config file.
struct SitePartition {
    dev: PathBuf,
    /// Whole disk (kernel name): never a restore target.
    disk: String,
    text: String,
    /// `bkimg.key` on it: the key file of an encrypted repository.
    key: Option<Vec<u8>>,
}

const SITE_LABEL: &str = "BKIMG-CONF";
const SITE_FILE: &str = "bkimg-rescue.toml";
const SITE_MOUNT: &str = "/run/site-config";
const SITE_KEY: &str = "bkimg.key";
const KEY_MOUNT: &str = "/run/key-file";

fn site_partition(console: &Console, media: Option<&Media>) -> Result<Option<SitePartition>> {
    let Some(dev) = findfs(&format!("LABEL={SITE_LABEL}")) else {
        return Ok(None);
    };
    let fs = fs_type(&dev).ok_or_else(|| {
        anyhow!(
            "{} ({SITE_LABEL}) holds no filesystem the rescue reads: make it vfat or ext4",
            dev.display()
        )
    })?;
    let disk = whole_disk(&dev);
    // A partition of the stick cannot be mounted while the whole stick is (the kernel
    // holds the disk for the media's filesystem): the media steps aside meanwhile.
    let shared = media.filter(|m| m.disk == disk);
    if shared.is_some() {
        nix::mount::umount(MEDIA_MOUNT).context("unmounting the media to read BKIMG-CONF")?;
    }
    let mounted = mount_ro(&dev, SITE_MOUNT, fs)
        .with_context(|| format!("mounting {} ({SITE_LABEL}) read-only", dev.display()));
    let mut key = None;
    let text = mounted.map(|()| {
        let text = std::fs::read_to_string(Path::new(SITE_MOUNT).join(SITE_FILE));
        key = std::fs::read(Path::new(SITE_MOUNT).join(SITE_KEY)).ok();
        let _ = nix::mount::umount(SITE_MOUNT);
        text
    });
    if let Some(m) = shared {
        mount_ro(Path::new(&m.dev), MEDIA_MOUNT, m.fs)
            .with_context(|| format!("mounting the media {} again", m.dev))?;
    }
    let text = text?.with_context(|| {
        format!(
            "{} is labelled {SITE_LABEL} but has no readable /{SITE_FILE}",
            dev.display()
        )
    })?;
    console.line(&format!(
        "site settings from {} ({SITE_LABEL}): {}",
        dev.display(),
        crate::config::settings_in(&text).join(", ")
    ));
    if key.is_some() {
        console.line(&format!("key file {SITE_KEY} on {}", dev.display()));
    }
    Ok(Some(SitePartition {
        dev,
        disk,
        text,
        key,
    }))
}

/// A standby host's repository, read over the standby protocol with this stick's reader
/// key (`[rescue.standby]`), the standby's certificate pinned.
fn open_standby(
    console: &Console,
    config: &RescueConfig,
    url: &str,
    site_key: Option<&[u8]>,
) -> Result<Repository> {
    let access = &config.standby;
    let (Some(fp), Some(key), Some(cert)) = (
        access.server_fingerprint.as_deref(),
        access.key_pem.as_deref(),
        access.cert_pem.as_deref(),
    ) else {
        bail!(
            "{url} is a standby host: set server-fingerprint, key-pem and cert-pem in \
             [rescue.standby] (a key the standby allows with --allow-reader; docs/rescue.md)"
        );
    };
    let how = crate::net::bring_up(&config.network, Duration::from_secs(60))?;
    console.line(&format!("network: {how}"));
    let store = bkimg_replicate::standby::reader::StandbyStore::open_pem(url, key, cert, fp)
        .with_context(|| format!("reaching the standby {url}"))?;
    // A protected repository (protocol version 3) is unlocked as a local one is.
    let Some((config_bytes, slots)) = store.repo_protection()? else {
        return Ok(Repository::new(Box::new(store)));
    };
    let repo_config = bkimg_format::store::local::parse_config(
        &config_bytes,
        &format!("the repository on {url}"),
        &format!("the repository config on {url}"),
        true,
    )?;
    let protection = unlock(console, config, &repo_config, &slots, site_key)?;
    Ok(Repository::new(Box::new(Protected::new(store, protection))))
}

/// The whole disk (kernel name) whose filesystem holds `path`, from /proc/mounts.
fn disk_holding(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let (dev, _) = mounts
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?, w.next()?))
        })
        .filter(|(dev, dir)| dev.starts_with("/dev/") && path.starts_with(dir))
        .max_by_key(|(_, dir)| dir.len())?;
    Some(whole_disk(Path::new(dev)))
}

/// The kernel name of the whole disk a device (a partition or a disk) is on.
fn whole_disk(dev: &Path) -> String {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    block_devices()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map_or(name, |(_, whole)| whole)
}

/// Gives the restored system's loader a UEFI boot entry, first in BootOrder: the entries
/// the restore point recorded for the restored disks (spec/format.md §7.6), else one for
/// the loader found on the first restored EFI system partition.
fn boot_entry(console: &Console, point: &Point, targets: &[(String, PathBuf)]) -> Result<()> {
    use bkimg_format::manifest::{GptPartition, PartitionTable};
    let partition = |disk: &str, pick: &dyn Fn(&GptPartition) -> bool| {
        let target = targets.iter().find(|(d, _)| d == disk)?.1.clone();
        let d = point.manifest.disks.iter().find(|d| d.name == disk)?;
        let PartitionTable::Gpt(t) = &d.table else {
            return None;
        };
        Some((target, t.partitions.iter().find(|p| pick(p))?.clone()))
    };
    let vars = crate::efi::BootVars::new(Path::new(EFIVARS));
    let recorded = point
        .manifest
        .firmware
        .as_ref()
        .map(|f| f.uefi_boot_entries.as_slice())
        .unwrap_or_default();
    let mut made = 0;
    // Last first, so that the recorded first ends first in BootOrder.
    for e in recorded.iter().rev() {
        let Some((target, p)) = partition(&e.disk, &|p| {
            p.number == e.partition && p.unique_guid.eq_ignore_ascii_case(&e.partition_guid)
        }) else {
            if targets.iter().any(|(d, _)| d == &e.disk) {
                console.line(&format!(
                    "warning: boot entry {:?} of the restore point names partition {} \
                     ({}) of {}, which it does not have: skipped",
                    e.description, e.partition, e.partition_guid, e.disk
                ));
            }
            continue;
        };
        let dev = partition_device(&target, p.number, Duration::from_secs(30))?;
        let loader = e.path.trim_start_matches('\\').replace('\\', "/");
        if !with_esp(&dev, |esp| esp.join(&loader).is_file())? {
            console.line(&format!(
                "warning: boot entry {:?}: {} is not on the restored {}: skipped",
                e.description,
                e.path,
                dev.display()
            ));
            continue;
        }
        let option = crate::efi::recorded_option(e, &p)?;
        let (number, before) = vars.add_first(&option)?;
        made += 1;
        console.line(&format!(
            "UEFI boot entry Boot{number:04X} \"{}\" (recorded by the capture): {} on {}, \
             first in BootOrder (was {})",
            e.description,
            e.path,
            dev.display(),
            order_text(&before)
        ));
    }
    if made > 0 {
        return Ok(());
    }
    let Some((target, esp)) = targets.iter().find_map(|(disk, _)| {
        partition(disk, &|p| {
            p.type_guid.eq_ignore_ascii_case(crate::efi::ESP_TYPE)
        })
    }) else {
        console.line("no UEFI boot entry: the restored disks have no EFI system partition");
        return Ok(());
    };
    let dev = partition_device(&target, esp.number, Duration::from_secs(30))?;
    let loader = with_esp(&dev, crate::efi::find_loader)?.ok_or_else(|| {
        anyhow!(
            "{} holds none of the known loaders ({} ...)",
            dev.display(),
            crate::efi::LOADERS[..3].join(", ")
        )
    })?;
    let description = format!("{} (restored by bkimg)", point.manifest.host);
    let option = crate::efi::load_option(&description, &esp, loader)?;
    let (number, before) = vars.add_first(&option)?;
    console.line(&format!(
        "UEFI boot entry Boot{number:04X} \"{description}\": \\{} on {}, first in BootOrder (was {})",
        loader.replace('/', "\\"),
        dev.display(),
        order_text(&before)
    ));
    Ok(())
}

fn order_text(order: &[u16]) -> String {
    order
        .iter()
        .map(|n| format!("{n:04X}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `f` on the restored EFI system partition `dev`, mounted read-only.
fn with_esp<T>(dev: &Path, f: impl FnOnce(&Path) -> T) -> Result<T> {
    mount_ro(dev, ESP_MOUNT, "vfat").with_context(|| {
        format!(
            "mounting the restored EFI system partition {}",
            dev.display()
        )
    })?;
    let out = f(Path::new(ESP_MOUNT));
    let _ = nix::mount::umount(ESP_MOUNT);
    Ok(out)
}

/// The device of partition `number` of the disk `disk` (/dev/nvme0n1 → /dev/nvme0n1p1),
/// waiting for the kernel to create it after the restore wrote the table.
fn partition_device(disk: &Path, number: u32, wait: Duration) -> Result<PathBuf> {
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(entries) = std::fs::read_dir(format!("/sys/block/{name}")) {
            for e in entries.flatten() {
                let n = std::fs::read_to_string(e.path().join("partition")).unwrap_or_default();
                if n.trim() == number.to_string() {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!("partition {number} of {} did not appear", disk.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct Media {
    /// Kernel name of the whole disk holding it ("sda", "sr0").
    disk: String,
    /// The device mounted at MEDIA_MOUNT, and its filesystem.
    dev: String,
    fs: &'static str,
}

/// Mounts the media this initramfs was built with (it carries the same media id), waiting
/// up to `wait` for slow USB disks. None when the image was booted without its media
/// (PXE).
fn find_media(console: &Console, wait: Duration) -> Result<Option<Media>> {
    let Ok(id) = std::fs::read_to_string(format!("/{INITRD_MEDIA_ID}")) else {
        return Ok(None);
    };
    let id = id.trim().to_string();
    std::fs::create_dir_all(MEDIA_MOUNT)?;
    let deadline = Instant::now() + wait;
    // Each device is tried once per size it shows (a CD drive shows 0 until its disc spins
    // up), and only with the filesystem its superblock names: failed mounts fill the
    // console with kernel messages.
    let mut tried = std::collections::BTreeSet::new();
    loop {
        for (name, whole) in block_devices() {
            let dev = format!("/dev/{name}");
            let size = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
                .unwrap_or_default();
            if !tried.insert((name.clone(), size)) {
                continue;
            }
            let Some(fs) = fs_type(Path::new(&dev)) else {
                continue;
            };
            if mount_ro(Path::new(&dev), MEDIA_MOUNT, fs).is_err() {
                continue;
            }
            let found = std::fs::read_to_string(Path::new(MEDIA_MOUNT).join(MEDIA_ID))
                .is_ok_and(|s| s.trim() == id);
            if found {
                console.line(&format!("rescue media: {dev}"));
                return Ok(Some(Media {
                    disk: whole,
                    dev: dev.clone(),
                    fs,
                }));
            }
            let _ = nix::mount::umount(MEDIA_MOUNT);
        }
        if Instant::now() > deadline {
            console.line("the rescue media was not found (booted from the network?)");
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Mounts the filesystem `fs` on `dev` read-only at `dir` (made if missing).
fn mount_ro(dev: &Path, dir: &str, fs: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    nix::mount::mount(
        Some(dev),
        dir,
        Some(fs),
        nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )?;
    Ok(())
}

/// The device holding the filesystem that `spec` ("LABEL=NAME", "UUID=...") names, by
/// busybox's findfs.
fn findfs(spec: &str) -> Option<PathBuf> {
    std::process::Command::new("/bin/busybox")
        .args(["findfs", spec])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

/// The filesystem a device's superblock names, among those media and repositories use.
fn fs_type(dev: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev).ok()?;
    let mut head = vec![0u8; 64 << 10];
    let n = f.read_at(&mut head, 0).ok()?;
    disks::filesystem(&head[..n])
}

/// (kernel name, whole disk name) of every block device, partitions included.
fn block_devices() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        let whole = if e.path().join("partition").exists() {
            std::fs::canonicalize(e.path())
                .ok()
                .and_then(|p| {
                    p.parent()
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| name.clone())
        } else {
            name.clone()
        };
        out.push((name, whole));
    }
    out.sort();
    out
}

fn resolve_link(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    Some(real.file_name()?.to_string_lossy().into_owned())
}

/// The repository to restore from: `[rescue] repository`, else the one export on the
/// media, else the config file's `repository`. A path is looked up on the media first;
/// "LABEL=NAME:/path" and "UUID=...:/path" name a path on another filesystem, mounted
/// read-only.
fn repository_path(
    config: &RescueConfig,
    site_repository: Option<&str>,
    media: Option<&Media>,
    host: Option<&str>,
    site_key: Option<&[u8]>,
) -> Result<PathBuf> {
    let exports = Path::new(MEDIA_MOUNT).join(EXPORTS_DIR);
    let has_exports =
        media.is_some() && std::fs::read_dir(&exports).is_ok_and(|mut d| d.next().is_some());
    let configured =
        config
            .repository
            .as_deref()
            .or(if has_exports { None } else { site_repository });
    if let Some(r) = configured {
        if r.starts_with("s3://") || r.starts_with("bkimg://") {
            return Ok(PathBuf::from(r));
        }
        if r.starts_with("LABEL=") || r.starts_with("UUID=") {
            return mount_labelled("repository", r, REPO_MOUNT);
        }
        let on_media = Path::new(MEDIA_MOUNT).join(r.trim_start_matches('/'));
        return Ok(if media.is_some() && on_media.exists() {
            on_media
        } else {
            PathBuf::from(r)
        });
    }
    if media.is_none() {
        bail!(
            "the rescue media was not found and no repository is configured: \
             set repository in the config file's [rescue] table or bkimg.repo= on the \
             kernel command line"
        );
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&exports)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    found.sort();
    if let (Some(host), true) = (host, found.len() > 1) {
        return export_of_host(&found, host, rescue_key(config, site_key)?.as_deref());
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "the media carries no export (build it with --include-export FILE) and no \
             repository is configured (repository = ... or bkimg.repo=)"
        ),
        many => bail!(
            "the media carries {} exports ({}): choose one with repository = \"/{EXPORTS_DIR}/NAME\" \
             or bkimg.repo=/{EXPORTS_DIR}/NAME",
            many.len(),
            many.iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// This machine's host name in the repository: `host` of the config or command line, else
/// the first of its identities (DMI system UUID, DMI serial, MAC addresses) that the
/// `[rescue.hosts]` map names. With how it was found.
fn identify(config: &RescueConfig) -> Option<(String, String)> {
    if let Some(h) = &config.host {
        return Some((h.clone(), "configured".into()));
    }
    if config.hosts.is_empty() {
        return None;
    }
    let map: std::collections::BTreeMap<String, &String> = config
        .hosts
        .iter()
        .map(|(k, v)| (k.trim().to_lowercase(), v))
        .collect();
    machine_ids()
        .into_iter()
        .find_map(|(kind, id)| map.get(&id).map(|h| ((*h).clone(), format!("{kind} {id}"))))
}

/// What identifies this machine, lowercase: DMI system UUID and serial numbers, then the
/// MAC address of every network interface.
fn machine_ids() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (file, kind) in [
        ("product_uuid", "DMI system UUID"),
        ("product_serial", "DMI serial"),
        ("board_serial", "DMI board serial"),
    ] {
        if let Ok(v) = std::fs::read_to_string(format!("/sys/class/dmi/id/{file}")) {
            let v = v.trim().to_lowercase();
            if !v.is_empty() {
                out.push((kind.to_string(), v));
            }
        }
    }
    let mut nics: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    nics.sort();
    for n in nics.into_iter().filter(|n| n != "lo") {
        if let Ok(mac) = std::fs::read_to_string(format!("/sys/class/net/{n}/address")) {
            out.push((format!("MAC of {n}"), mac.trim().to_lowercase()));
        }
    }
    out
}

/// Of several exports on the media, the one holding the newest point of `host`.
/// Of several exports, the one holding the newest restore point of `host`. A protected
/// export (spec/format.md §10.3), whose points and their host names are sealed, is read
/// through `key` (the rescue's key file) when that opens it; one that it cannot open is
/// skipped, and named when no export fits.
pub fn export_of_host(exports: &[PathBuf], host: &str, key: Option<&[u8]>) -> Result<PathBuf> {
    let mut best: Option<(Point, PathBuf)> = None;
    let mut seen = std::collections::BTreeSet::new();
    let mut locked = Vec::new();
    let key = key.and_then(|k| bkimg_format::keys::parse_key_file(k).ok());
    for e in exports {
        let repo = match bkimg_format::store::ExportFile::open(e) {
            Ok(export) if export.is_protected() => {
                let opened = key.as_ref().and_then(|key| {
                    let config = export.repo_config().ok()?;
                    let slots = export.key_slots().ok()?;
                    Protection::unlock(&config, &slots, Secret::KeyFile(key)).ok()
                });
                match opened {
                    Some(p) => Repository::new(Box::new(Protected::new(export, Arc::new(p)))),
                    None => {
                        locked.push(e.file_name().unwrap_or_default().to_string_lossy());
                        continue;
                    }
                }
            }
            Ok(export) => Repository::new(Box::new(export)),
            Err(_) => continue,
        };
        let Ok((points, _)) = repo.points() else {
            continue;
        };
        for p in points {
            seen.insert(p.manifest.host.clone());
            if p.manifest.host != host {
                continue;
            }
            let newer = best.as_ref().is_none_or(|(b, _)| {
                bkimg_format::time::point_order(
                    &b.manifest.created,
                    &b.manifest.id,
                    &p.manifest.created,
                    &p.manifest.id,
                )
                .is_lt()
            });
            if newer {
                best = Some((p, e.clone()));
            }
        }
    }
    best.map(|(_, e)| e).ok_or_else(|| {
        let sealed = match locked.len() {
            0 => String::new(),
            _ => format!(
                "; {} cannot be read without their key: {} (give key-file, or bkimg.key on \
                 BKIMG-CONF, or name the export with repository = \"/{EXPORTS_DIR}/NAME\")",
                locked.len(),
                locked.join(", ")
            ),
        };
        anyhow!(
            "no export on the media holds a point of host {host} (they hold: {}){sealed}",
            seen.into_iter().collect::<Vec<_>>().join(", ")
        )
    })
}

fn choose_point(
    console: &Console,
    repo: &Repository,
    config: &RescueConfig,
    host: Option<&str>,
) -> Result<Point> {
    let spec = config.point.as_deref().unwrap_or("latest");
    if spec == "latest" && (config.unattended || host.is_some()) {
        let (points, _) = repo.points()?;
        let hosts: std::collections::BTreeSet<&str> =
            points.iter().map(|p| p.manifest.host.as_str()).collect();
        let chosen = match host {
            Some(h) => points
                .iter()
                .rev()
                .find(|p| p.manifest.host == h)
                .ok_or_else(|| {
                    anyhow!(
                        "the repository holds no point of host {h} (it holds: {})",
                        hosts.iter().copied().collect::<Vec<_>>().join(", ")
                    )
                })?,
            // Another machine's newest point is never restored by accident.
            None if hosts.len() > 1 => bail!(
                "the repository holds points of {} hosts ({}): say which machine this is \
                 with host = \"NAME\" or a [rescue.hosts] map (DMI UUID, serial or MAC → \
                 name), or bkimg.host=NAME",
                hosts.len(),
                hosts.iter().copied().collect::<Vec<_>>().join(", ")
            ),
            None => points
                .last()
                .ok_or_else(|| anyhow!("the repository holds no restore point"))?,
        };
        let p = repo.resolve(&chosen.manifest.id)?;
        console.line(&format!(
            "restore point {} of {}, taken {}",
            p.manifest.id, p.manifest.host, p.manifest.created
        ));
        return Ok(p);
    }
    if config.unattended || config.point.is_some() {
        let spec = config.point.as_deref().unwrap_or("latest");
        let p = repo
            .resolve(spec)
            .with_context(|| format!("finding restore point {spec}"))?;
        console.line(&format!(
            "restore point {} of {}, taken {}",
            p.manifest.id, p.manifest.host, p.manifest.created
        ));
        return Ok(p);
    }
    let (points, damaged) = repo.points()?;
    for (id, e) in &damaged {
        console.line(&format!("  (restore point {id} is damaged: {e})"));
    }
    let ids: Vec<String> = points.iter().map(|p| p.manifest.id.clone()).collect();
    if ids.is_empty() {
        bail!("the repository holds no restore point");
    }
    for (i, p) in points.iter().enumerate() {
        let m = &p.manifest;
        console.line(&format!("  [{}] {} {} {}", i + 1, m.id, m.host, m.created));
    }
    let pick = loop {
        let answer = console.ask(&format!(
            "restore which point? [1-{}, Enter for the newest]",
            ids.len()
        ))?;
        if answer.is_empty() {
            break ids.len();
        }
        match answer.parse::<usize>() {
            Ok(n) if (1..=ids.len()).contains(&n) => break n,
            _ => console.line(&format!("{answer:?} is not one of the numbers listed")),
        }
    };
    Ok(repo.resolve(&ids[pick - 1])?)
}

fn shell(console: &Console, hint: &str) {
    console.line(&format!("starting a shell: {hint}"));
    let status = std::process::Command::new("/bin/busybox")
        .args(["cttyhack", "/bin/sh", "-l"])
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("HOME", "/root")
        .status();
    if status.is_err() {
        // No shell to run: wait rather than let PID 1 exit (a kernel panic).
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn finish(console: &Console, mode: nix::sys::reboot::RebootMode) -> ! {
    nix::unistd::sync();
    let _ = nix::mount::umount(MEDIA_MOUNT);
    console.line(match mode {
        nix::sys::reboot::RebootMode::RB_POWER_OFF => "powering off",
        _ => "rebooting",
    });
    let _ = nix::sys::reboot::reboot(mode);
    // reboot(2) only returns on failure.
    loop {
        shell(console, "reboot failed");
    }
}

/// Restore progress as console lines: every 10 s and at the end of a phase.
struct ConsoleProgress<'a> {
    console: &'a Console,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    printed: Instant,
}

impl<'a> ConsoleProgress<'a> {
    fn new(console: &'a Console) -> ConsoleProgress<'a> {
        let now = Instant::now();
        ConsoleProgress {
            console,
            state: Mutex::new(ProgressState {
                what: String::new(),
                total: 0,
                done: 0,
                started: now,
                printed: now,
            }),
        }
    }
}

impl Progress for ConsoleProgress<'_> {
    fn begin(&self, what: &str, total: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = ProgressState {
            what: what.to_string(),
            total,
            done: 0,
            started: Instant::now(),
            printed: Instant::now(),
        };
        self.console
            .line(&format!("{what}: {}", disks::size(total)));
    }

    fn advance(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done += bytes;
        let complete = s.total > 0 && s.done >= s.total;
        if s.printed.elapsed() < Duration::from_secs(10) && !complete {
            return;
        }
        s.printed = Instant::now();
        let secs = s.started.elapsed().as_secs_f64().max(0.001);
        let rate = s.done as f64 / secs;
        let eta = if rate > 0.0 {
            (s.total.saturating_sub(s.done)) as f64 / rate
        } else {
            0.0
        };
        self.console.line(&format!(
            "{}: {} of {} ({:.0}%), {:.1} MiB/s, {:.0} s to go",
            s.what,
            disks::size(s.done),
            disks::size(s.total),
            100.0 * s.done as f64 / s.total.max(1) as f64,
            rate / (1 << 20) as f64,
            eta
        ));
    }

    fn note(&self, text: &str) {
        self.console.line(text);
    }
}
