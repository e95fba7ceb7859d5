//! Recovery media end to end: `bkimg rescue build` makes an image, qemu-system-x86_64
//! (TCG) boots it under UEFI (OVMF) and BIOS (SeaBIOS), as a USB stick and as a CD, and
//! its init restores the export it carries onto the VM's blank disk unattended.
//!
//! Every wait is for an event (a line on the serial console, the VM powering off) with
//! generous deadlines: boots under software emulation take a minute or more on a busy
//! machine.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bkimg_tests::*;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Boot, restore and power-off of one VM; TCG on a loaded 2-core machine is slow.
const VM_DEADLINE: Duration = Duration::from_secs(25 * 60);

struct Fixture {
    dir: Workdir,
    /// The disk the demo captured, as it was.
    source: PathBuf,
    export: PathBuf,
    /// Unattended, powers off when done.
    image: PathBuf,
    build: serde_json::Value,
}

/// Whether this machine can build and boot recovery media; fails in CI when it cannot.
fn available() -> bool {
    let missing: Vec<&str> = [
        "qemu-system-x86_64",
        "grub-mkrescue",
        "xorriso",
        "mformat",
        "sgdisk",
        "mkfs.ext4",
    ]
    .into_iter()
    .filter(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map_or(true, |o| !o.status.success())
    })
    .collect();
    let ovmf = Path::new(OVMF_CODE).exists() && Path::new("/bin/busybox").exists();
    if missing.is_empty() && ovmf {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the rescue tests: missing {missing:?} (ovmf and busybox-static present: {ovmf})"
    );
    eprintln!("skipped: missing {missing:?} or ovmf/busybox-static");
    false
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // One directory for the whole run, under cargo's target (a static is never
        // dropped, so a TempDir would be left behind): each run starts it afresh.
        let dir = Workdir(Path::new(env!("CARGO_TARGET_TMPDIR")).join("rescue"));
        let _ = std::fs::remove_dir_all(dir.path());
        std::fs::create_dir_all(dir.path()).unwrap();
        let demo = dir.path().join("demo");
        bkimg_ok(&["demo", "--dir", p(&demo), "--json"]);
        let export = dir.path().join("web1.bkimg");
        bkimg_ok(&[
            "export",
            "--repo",
            p(&demo.join("repo")),
            "-o",
            p(&export),
            "-q",
        ]);
        let config = dir.path().join("site.toml");
        std::fs::write(
            &config,
            "[rescue]\nunattended = true\nafter = \"poweroff\"\n",
        )
        .unwrap();
        let image = dir.path().join("rescue.img");
        let build = bkimg_ok(&[
            "rescue",
            "build",
            "--output",
            p(&image),
            "--config",
            p(&config),
            "--include-export",
            p(&export),
            "--json",
        ])
        .json();
        Fixture {
            source: demo.join("disk.img"),
            export,
            image,
            build,
            dir,
        }
    })
}

struct Workdir(PathBuf);

impl Workdir {
    fn path(&self) -> &Path {
        &self.0
    }
}

/// A VM whose serial console goes to a file; killed when dropped. An interactive one
/// also takes typed lines on its serial console.
struct Vm {
    child: Child,
    log: PathBuf,
    keyboard: Option<std::os::unix::net::UnixStream>,
}

#[derive(Clone, Copy)]
enum Firmware {
    Uefi,
    Bios,
}

#[derive(Clone, Copy)]
enum Boot {
    UsbStick,
    Cd,
    /// Attached, but not chosen by qemu's boot order: the firmware's own decides.
    UsbStickLeftIn,
    /// PXE from a directory of boot files (`--pxe-dir`) served by qemu's own TFTP on a
    /// network of the VM's alone (`restrict=on`: nothing outside is reachable).
    Pxe,
}

impl Vm {
    fn start(name: &str, firmware: Firmware, boot: Boot, media: &Path, disks: &[&Path]) -> Vm {
        Vm::start_in(
            fixture().dir.path(),
            name,
            firmware,
            Some((boot, media)),
            disks,
        )
    }

    /// A VM with its files in `dir`; `media` is the rescue image and how it is attached
    /// (none: boot from the disks). UEFI variables persist in `dir/NAME.vars` across VMs
    /// of the same name, as in one machine's NVRAM.
    fn start_in(
        dir: &Path,
        name: &str,
        firmware: Firmware,
        media: Option<(Boot, &Path)>,
        disks: &[&Path],
    ) -> Vm {
        Vm::start_net(dir, name, firmware, media, disks, None, &[])
    }

    /// As `start_in`, with a virtio NIC on the tap device `tap0` of the network namespace
    /// `netns` (qemu runs inside it).
    fn start_net(
        dir: &Path,
        name: &str,
        firmware: Firmware,
        media: Option<(Boot, &Path)>,
        disks: &[&Path],
        netns: Option<&str>,
        extra: &[&str],
    ) -> Vm {
        Vm::spawn(dir, name, firmware, media, disks, netns, extra, false)
    }

    /// As `start_in`, with a person at the serial console (`type_line`).
    fn start_interactive(
        dir: &Path,
        name: &str,
        firmware: Firmware,
        media: Option<(Boot, &Path)>,
        disks: &[&Path],
        netns: Option<&str>,
    ) -> Vm {
        Vm::spawn(dir, name, firmware, media, disks, netns, &[], true)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        dir: &Path,
        name: &str,
        firmware: Firmware,
        media: Option<(Boot, &Path)>,
        disks: &[&Path],
        netns: Option<&str>,
        extra: &[&str],
        interactive: bool,
    ) -> Vm {
        let log = dir.join(format!("{name}.serial"));
        let _ = std::fs::remove_file(&log);
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut args: Vec<String> = [
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if interactive {
            // The log gets everything the VM writes, whether or not anyone is connected.
            args.push("-chardev".into());
            args.push(format!(
                "socket,id=ser0,path={},server=on,wait=off,logfile={}",
                socket.display(),
                log.display()
            ));
            args.push("-serial".into());
            args.push("chardev:ser0".into());
        } else {
            args.push("-serial".into());
            args.push(format!("file:{}", log.display()));
        }
        if let Firmware::Uefi = firmware {
            let vars = dir.join(format!("{}.vars", name.split('.').next().unwrap()));
            if !vars.exists() {
                std::fs::copy(OVMF_VARS, &vars).unwrap();
            }
            args.extend([
                "-drive".into(),
                format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,file={}", vars.display()),
            ]);
        }
        match media {
            None => {}
            Some((Boot::UsbStick, media)) => args.extend([
                "-device".into(),
                "qemu-xhci,id=xhci".into(),
                "-drive".into(),
                format!(
                    "if=none,id=stick,format=raw,readonly=on,file={}",
                    media.display()
                ),
                "-device".into(),
                "usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=0".into(),
            ]),
            Some((Boot::UsbStickLeftIn, media)) => args.extend([
                "-device".into(),
                "qemu-xhci,id=xhci".into(),
                "-drive".into(),
                format!(
                    "if=none,id=stick,format=raw,readonly=on,file={}",
                    media.display()
                ),
                "-device".into(),
                "usb-storage,bus=xhci.0,drive=stick,removable=on".into(),
            ]),
            Some((Boot::Pxe, dir)) => args.extend([
                "-netdev".into(),
                format!(
                    "user,id=pxe,restrict=on,tftp={},bootfile=bkimg.ipxe",
                    dir.display()
                ),
                "-device".into(),
                "virtio-net-pci,netdev=pxe,bootindex=0".into(),
            ]),
            Some((Boot::Cd, media)) => args.extend([
                "-drive".into(),
                format!(
                    "if=none,id=cd,format=raw,readonly=on,media=cdrom,file={}",
                    media.display()
                ),
                "-device".into(),
                "ide-cd,drive=cd,bus=ide.0,bootindex=0".into(),
            ]),
        }
        for (i, d) in disks.iter().enumerate() {
            args.push("-drive".into());
            args.push(format!("if=none,id=d{i},format=raw,file={}", d.display()));
            args.push("-device".into());
            // NVMe and virtio, as servers and clouds have them; the first disk is the
            // firmware's first choice when no media is attached.
            let boot = if media.is_none() && i == 0 {
                ",bootindex=0"
            } else {
                ""
            };
            args.push(if i % 2 == 0 {
                format!("nvme,drive=d{i},serial=TARGET{i}{boot}")
            } else {
                format!("virtio-blk-pci,drive=d{i},serial=TARGET{i}{boot}")
            });
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut cmd = match netns {
            Some(ns) => {
                args.extend([
                    "-netdev".into(),
                    "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
                    "-device".into(),
                    // No PXE option ROM: the rescue boots from its stick.
                    "virtio-net-pci,netdev=n0,romfile=".into(),
                ]);
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-system-x86_64");
        let mut vm = Vm {
            child,
            log,
            keyboard: None,
        };
        if interactive {
            let start = Instant::now();
            let stream = loop {
                if let Ok(s) = std::os::unix::net::UnixStream::connect(&socket) {
                    break s;
                }
                if let Some(status) = vm.child.try_wait().unwrap() {
                    panic!("qemu ended ({status}) before its serial socket appeared");
                }
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "qemu's serial socket {} did not appear",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            // What the VM writes is read from the log; drain the socket so qemu never
            // waits on it.
            let mut drain = stream.try_clone().unwrap();
            std::thread::spawn(move || std::io::copy(&mut drain, &mut std::io::sink()));
            vm.keyboard = Some(stream);
        }
        vm
    }

    /// Types a line on the serial console, as a person would (Enter sends CR).
    fn type_line(&mut self, text: &str) {
        use std::io::Write;
        let k = self.keyboard.as_mut().expect("an interactive VM");
        k.write_all(format!("{text}\r").as_bytes()).unwrap();
    }

    fn console(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the VM powers itself off; the console if it does, a panic if not.
    fn wait_poweroff(&mut self) -> String {
        let start = Instant::now();
        while start.elapsed() < VM_DEADLINE {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                assert!(
                    status.success(),
                    "qemu failed ({status}): {err}\n{}",
                    self.console()
                );
                return self.console();
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        panic!(
            "the VM did not power off within {VM_DEADLINE:?}; its console:\n{}",
            self.console()
        );
    }

    /// Waits for `text` on the console.
    fn wait_for(&mut self, text: &str) -> String {
        let start = Instant::now();
        while start.elapsed() < VM_DEADLINE {
            let c = self.console();
            if c.contains(text) {
                return c;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("qemu ended ({status}) before {text:?} appeared:\n{c}");
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        panic!(
            "{text:?} did not appear within {VM_DEADLINE:?}:\n{}",
            self.console()
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dir`, emptied (a previous run's files gone) and made.
fn fresh_dir(dir: PathBuf) -> PathBuf {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn blank(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// SHA-256 of the first `len` bytes of a file.
fn sha_prefix(path: &Path, len: u64) -> String {
    sha_range(path, 0, len)
}

/// SHA-256 of bytes `from..to` of a file.
fn sha_range(path: &Path, from: u64, to: u64) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Seek;
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(std::io::SeekFrom::Start(from)).unwrap();
    std::io::copy(&mut f.take(to - from), &mut h).unwrap();
    hex::encode(h.finalize())
}

fn all_zero(path: &Path) -> bool {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return true;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return false;
        }
    }
}

/// Boots the rescue image with one blank disk `extra` bytes larger than the source disk.
fn restores_unattended(name: &str, firmware: Firmware, boot: Boot, extra: u64) {
    if !available() {
        return;
    }
    let f = fixture();
    let size = std::fs::metadata(&f.source).unwrap().len();
    let target = f.dir.path().join(format!("{name}-target.img"));
    blank(&target, size + extra);
    let mut vm = Vm::start(name, firmware, boot, &f.image, &[&target]);
    let console = vm.wait_poweroff();
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert!(console.contains("bkimg-rescue: powering off"), "{console}");
    assert!(!console.contains("RESTORE FAILED"), "{console}");
    if extra == 0 {
        // Every byte of the source disk is back.
        assert_eq!(
            sha_prefix(&target, size),
            sha_prefix(&f.source, size),
            "the restored disk differs from the captured one; console:\n{console}"
        );
    } else {
        // On a larger disk the GPT headers and the protective MBR describe the new size
        // and the backup table moves to its end: everything between is the same bytes,
        // and the table is valid with the same partitions.
        let (from, to) = (1024, size - 33 * 512);
        assert_eq!(
            sha_range(&target, from, to),
            sha_range(&f.source, from, to),
            "the restored disk differs from the captured one; console:\n{console}"
        );
        assert!(sh("sgdisk", &["-v", p(&target)]).contains("No problems found"));
        let parts = |img: &Path| {
            sh("sgdisk", &["-p", p(img)])
                .lines()
                .skip_while(|l| !l.starts_with("Number"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(parts(&target), parts(&f.source));
    }
}

// The system tests below boot UEFI from a stick and BIOS from a CD; these two cover the
// other pairs.
#[test]
fn uefi_cd_restores_unattended() {
    // A replacement disk larger than the original, as they usually are.
    restores_unattended("uefi-cd", Firmware::Uefi, Boot::Cd, 64 << 20);
}

#[test]
fn bios_usb_stick_restores_unattended() {
    restores_unattended("bios-usb", Firmware::Bios, Boot::UsbStick, 0);
}

/// A person at the serial console (no keyboard on the screen): two disks could take the
/// restore point, so the rescue asks; a wrong answer is asked again; the chosen disk gets
/// the restore, the other is untouched.
#[test]
fn a_person_picks_the_point_and_the_disk_on_the_serial_console() {
    if !available() {
        return;
    }
    let f = fixture();
    let dir = fresh_dir(f.dir.path().join("menu"));
    let config = dir.join("site.toml");
    std::fs::write(&config, "[rescue]\nafter = \"poweroff\"\n").unwrap();
    let image = dir.join("rescue.img");
    bkimg_ok(&[
        "--config",
        p(&config),
        "rescue",
        "build",
        "-o",
        p(&image),
        "--include-export",
        p(&f.export),
        "-q",
    ]);
    let size = std::fs::metadata(&f.source).unwrap().len();
    let (nvme, virtio) = (dir.join("nvme.img"), dir.join("virtio.img"));
    // Both of the source's size: either could take it.
    blank(&nvme, size);
    blank(&virtio, size);
    let mut vm = Vm::start_interactive(
        &dir,
        "menu",
        Firmware::Uefi,
        Some((Boot::UsbStick, &image)),
        &[&nvme, &virtio],
        None,
    );
    vm.wait_for("restore which point?");
    vm.type_line("");
    let console = vm.wait_for("restore disk0 onto which disk? [1-2]");
    assert!(
        console.contains("no automatic choice: 2 disks could receive disk0"),
        "{console}"
    );
    let number = console
        .lines()
        .find_map(|l| {
            l.split_once("] /dev/vda:")
                .and_then(|(n, _)| n.rsplit('[').next())
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("/dev/vda is not offered:\n{console}"));
    vm.type_line("7");
    vm.wait_for("\"7\" is not one of the numbers listed");
    vm.type_line(&number);
    let console = vm.wait_for("type 'yes' to overwrite");
    assert!(console.contains(" -> /dev/vda"), "{console}");
    vm.type_line("yes");
    let console = vm.wait_poweroff();
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert_eq!(
        sha_prefix(&virtio, size),
        sha_prefix(&f.source, size),
        "the chosen disk does not hold the restore point; console:\n{console}"
    );
    assert!(all_zero(&nvme), "the disk not chosen was written to");
}

/// Bad input on the machine: a target too small, then a stick that carries no repository
/// and names none. Each: the reason on the console, a shell, no reboot, nothing written.
#[test]
fn too_small_a_disk_or_no_repository_stops_with_a_message() {
    if !available() {
        return;
    }
    let f = fixture();
    let dir = fresh_dir(f.dir.path().join("bad-input"));
    let size = std::fs::metadata(&f.source).unwrap().len();
    let small = dir.join("small.img");
    blank(&small, size - (1 << 20));
    let mut vm = Vm::start_in(
        &dir,
        "small",
        Firmware::Bios,
        Some((Boot::Cd, &f.image)),
        &[&small],
    );
    let console = vm.wait_for("bkimg-rescue: starting a shell");
    drop(vm);
    assert!(
        console.contains("RESTORE FAILED: no disk can receive disk0")
            && console.contains("too small"),
        "{console}"
    );
    assert!(!console.contains("powering off"), "{console}");
    assert!(all_zero(&small), "the small disk was written to");

    let image = dir.join("empty.img");
    let config = dir.join("site.toml");
    std::fs::write(&config, "[rescue]\nunattended = true\n").unwrap();
    bkimg_ok(&[
        "--config",
        p(&config),
        "rescue",
        "build",
        "-o",
        p(&image),
        "-q",
    ]);
    let target = dir.join("target.img");
    blank(&target, size);
    let mut vm = Vm::start_in(
        &dir,
        "empty",
        Firmware::Bios,
        Some((Boot::Cd, &image)),
        &[&target],
    );
    let console = vm.wait_for("bkimg-rescue: starting a shell");
    drop(vm);
    assert!(
        console.contains("RESTORE FAILED: the media carries no export"),
        "{console}"
    );
    assert!(!console.contains("rebooting"), "{console}");
    assert!(all_zero(&target), "the target was written to");
}

/// Two disks could take the source disk and a third is too small: the rescue refuses,
/// names all three, writes nothing and does not power off or reboot.
#[test]
fn ambiguous_disks_are_refused_and_nothing_is_written() {
    if !available() {
        return;
    }
    let f = fixture();
    let size = std::fs::metadata(&f.source).unwrap().len();
    let d: Vec<PathBuf> = (0..3)
        .map(|i| f.dir.path().join(format!("ambiguous-{i}.img")))
        .collect();
    blank(&d[0], size + (32 << 20));
    blank(&d[1], size / 2);
    blank(&d[2], size + (32 << 20));
    let mut vm = Vm::start(
        "ambiguous",
        Firmware::Uefi,
        Boot::UsbStick,
        &f.image,
        &[&d[0], &d[1], &d[2]],
    );
    let console = vm.wait_for("bkimg-rescue: starting a shell");
    assert!(
        console.contains("RESTORE FAILED: 2 disks could receive disk0"),
        "{console}"
    );
    assert!(console.contains("nothing was written"), "{console}");
    assert!(
        !console.contains("powering off") && !console.contains("rebooting"),
        "{console}"
    );
    drop(vm);
    for disk in &d {
        assert!(all_zero(disk), "{} was written to", disk.display());
    }
}

/// A damaged export: the restore stops with the reason on the console, opens a shell and
/// neither reboots nor powers off.
#[test]
fn a_damaged_repository_stops_with_a_message_and_no_reboot() {
    if !available() {
        return;
    }
    let f = fixture();
    let dir = f.dir.path().join("damaged");
    std::fs::create_dir_all(&dir).unwrap();
    let export = dir.join("web1.bkimg");
    let mut bytes = std::fs::read(&f.export).unwrap();
    // Chunks fill the middle of an export: flip bits in a few of them.
    let n = bytes.len();
    for at in [n / 3, n / 2, 2 * n / 3] {
        bytes[at] ^= 0x5a;
    }
    std::fs::write(&export, bytes).unwrap();
    let config = f.dir.path().join("site.toml");
    let image = dir.join("rescue.img");
    bkimg_ok(&[
        "--config",
        p(&config),
        "rescue",
        "build",
        "-o",
        p(&image),
        "--include-export",
        p(&export),
        "-q",
    ]);
    let target = dir.join("target.img");
    blank(&target, std::fs::metadata(&f.source).unwrap().len());
    let mut vm = Vm::start_in(
        &dir,
        "damaged",
        Firmware::Bios,
        Some((Boot::Cd, &image)),
        &[&target],
    );
    let console = vm.wait_for("bkimg-rescue: starting a shell");
    assert!(console.contains("RESTORE FAILED"), "{console}");
    assert!(
        console.contains("damaged") || console.contains("corrupt") || console.contains("digest"),
        "the console does not say the repository is damaged:\n{console}"
    );
    assert!(
        !console.contains("powering off") && !console.contains("rebooting"),
        "{console}"
    );
}

/// The same inputs give the same image, byte for byte.
#[test]
fn builds_are_reproducible() {
    if !available() {
        return;
    }
    let f = fixture();
    let again = f.dir.path().join("again.img");
    let config = f.dir.path().join("site.toml");
    let second = bkimg_ok(&[
        "rescue",
        "build",
        "--output",
        p(&again),
        "--config",
        p(&config),
        "--include-export",
        p(&f.export),
        "--json",
    ])
    .json();
    assert_eq!(second["sha256"], f.build["sha256"], "{second}\n{}", f.build);
    assert!(
        u(&f.build["bytes"]) < 150 << 20,
        "image too large: {}",
        f.build
    );
}

/// Bad input at build time: a clear error, no image left behind.
#[test]
fn a_bad_config_or_export_is_refused_at_build() {
    if !available() {
        return;
    }
    let f = fixture();
    let bad = f.dir.path().join("bad.toml");
    std::fs::write(&bad, "[rescue]\nunatended = true\n").unwrap();
    let out = f.dir.path().join("bad.img");
    let r = bkimg(&["rescue", "build", "-o", p(&out), "--config", p(&bad)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("unatended"), "{}", r.stderr);
    let r = bkimg(&[
        "rescue",
        "build",
        "-o",
        p(&out),
        "--include-export",
        p(&f.source),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("export"), "{}", r.stderr);
    assert!(!out.exists());
}

// ---- a real system: restored by the rescue, then booted ----------------------------------

const ROOT_UUID: &str = "5b1f0d3c-7a4e-4c2b-9a51-3e2f6c1d8b7a";
const SWAP_UUID: &str = "0c9d3a41-2f6b-4e8a-b1c7-6d5e4f3a2b19";
/// The EFI system partition's volume id, as mkfs.vfat -i takes it and fstab names it.
const ESP_ID: (&str, &str) = ("B1C00001", "B1C0-0001");
const MARKER: &str = "BKIMG-RESTORED-SYSTEM-UP";
/// The EFI system partition's unique GUID, which its boot entry names.
const ESP_PART_GUID: &str = "6a1e3b52-9c4d-4f70-8e21-b3c5d7e9f1a3";
/// Where the disk's loader is: a directory no loader search knows, so that only the boot
/// entry the capture recorded finds it.
const LOADER: &str = "/EFI/vmtest/grubx64.efi";
const MIB: u64 = 1 << 20;

/// A small bootable Debian: a GPT disk with an EFI system partition (GRUB where Debian puts
/// it, \EFI\debian\grubx64.efi, and no removable-media loader: the firmware boots it only
/// through a boot entry; the kernel and an initramfs that mounts / by UUID), swap, and an ext4
/// root (debootstrap minbase with systemd; fstab by UUID) whose unit prints MARKER with
/// what is mounted where on the serial console and powers off.
fn make_boot_disk(dir: &Path) -> PathBuf {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tarball = sh(p(&repo_root.join("packaging/debian-root")), &[])
        .trim()
        .to_string();
    let root = dir.join("bootdisk-root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    sh("tar", &["-C", p(&root), "-I", "zstd", "-xf", &tarball]);
    let _ = std::fs::remove_dir_all(root.join("var/cache/bkimg-test-dkms"));
    std::fs::write(
        root.join("etc/fstab"),
        format!(
            "UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\nUUID={SWAP_UUID} none swap sw 0 0\n\
             UUID={} /boot/efi vfat umask=0077 0 2\n",
            ESP_ID.1
        ),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("boot/efi")).unwrap();
    std::fs::write(root.join("etc/hostname"), "restored\n").unwrap();
    // What is mounted where, and (under UEFI) the entry the firmware booted and its
    // BootOrder, as efivarfs shows them (hex, without the attribute bytes).
    let script = root.join("usr/local/bin/bkimg-marker");
    std::fs::create_dir_all(script.parent().unwrap()).unwrap();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nv=/sys/firmware/efi/efivars\ng=8be4df61-93ca-11d2-aa0d-00e098032b8c\n\
             hexof() {{ od -An -tx1 -j4 \"$v/$1-$g\" 2>/dev/null | tr -d ' \\n'; }}\n\
             echo \"{MARKER} root=$(findmnt -no SOURCE /) swap=$(swapon --noheadings --show=NAME) \
             efi=$(findmnt -no SOURCE /boot/efi) bootcurrent=$(hexof BootCurrent) \
             bootorder=$(hexof BootOrder)\" > /dev/ttyS0\nsystemctl poweroff\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let unit = root.join("etc/systemd/system/bkimg-marker.service");
    std::fs::write(
        &unit,
        "[Unit]\nDescription=bkimg test: the restored system is up\n\
         After=local-fs.target swap.target\n\n[Service]\nType=oneshot\n\
         ExecStart=/usr/local/bin/bkimg-marker\n\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/bkimg-marker.service",
        wants.join("bkimg-marker.service"),
    )
    .unwrap();

    // The kernel the rescue image boots (the fixture's build downloaded it).
    let (vmlinuz, modules) = rescue_kernel();
    let initrd = dir.join("bootdisk-initrd.img");
    std::fs::write(&initrd, boot_initramfs(&modules)).unwrap();

    // EFI system partition: GRUB whose built-in config boots the kernel.
    let cfg = dir.join("bootdisk-grub.cfg");
    std::fs::write(
        &cfg,
        format!(
            "search --no-floppy --fs-uuid --set=root {}\n\
             linux /vmlinuz root=UUID={ROOT_UUID} ro console=ttyS0,115200\n\
             initrd /initrd.img\nboot\n",
            ESP_ID.1
        ),
    )
    .unwrap();
    let efi = dir.join("bootdisk-bootx64.efi");
    sh(
        "grub-mkimage",
        &[
            "-O",
            "x86_64-efi",
            "-p",
            "/EFI/BOOT",
            "-c",
            p(&cfg),
            "-o",
            p(&efi),
            "part_gpt",
            "fat",
            "search",
            "search_fs_uuid",
            "linux",
            "boot",
            "echo",
        ],
    );
    let esp = dir.join("bootdisk-esp.img");
    let _ = std::fs::remove_file(&esp);
    sh(
        "mkfs.vfat",
        &["-i", ESP_ID.0, "-n", "EFI", "-C", p(&esp), "65536"],
    );
    sh("mmd", &["-i", p(&esp), "::/EFI", "::/EFI/vmtest"]);
    sh("mcopy", &["-i", p(&esp), p(&efi), &format!("::{LOADER}")]);
    sh("mcopy", &["-i", p(&esp), p(&vmlinuz), "::/vmlinuz"]);
    sh("mcopy", &["-i", p(&esp), p(&initrd), "::/initrd.img"]);

    let swap = dir.join("bootdisk-swap.img");
    blank(&swap, 64 * MIB);
    sh("mkswap", &["-U", SWAP_UUID, p(&swap)]);
    let rootfs = dir.join("bootdisk-root.img");
    let _ = std::fs::remove_file(&rootfs);
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-U",
            ROOT_UUID,
            "-L",
            "root",
            "-d",
            p(&root),
            p(&rootfs),
            "700M",
        ],
    );
    std::fs::remove_dir_all(&root).unwrap();

    let disk = dir.join("bootdisk.img");
    blank(&disk, (1 + 64 + 64 + 700 + 1 + 1) * MIB);
    sh(
        "sgdisk",
        &[
            "-n1:2048:+64M",
            "-t1:ef00",
            &format!("-u1:{ESP_PART_GUID}"),
            "-n2:0:+64M",
            "-t2:8200",
            "-n3:0:+700M",
            "-t3:8300",
            "-n4:0:+1M",
            "-t4:ef02",
            p(&disk),
        ],
    );
    for (img, at) in [(&esp, MIB), (&swap, 65 * MIB), (&rootfs, 129 * MIB)] {
        use std::io::{Seek, SeekFrom};
        let mut out = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        out.seek(SeekFrom::Start(at)).unwrap();
        std::io::copy(&mut std::fs::File::open(img).unwrap(), &mut out).unwrap();
        std::fs::remove_file(img).unwrap();
    }
    install_bios_grub(dir, &disk, &cfg);
    disk
}

/// BIOS boot code as grub-bios-setup lays it out (it will not work on an image file): the
/// core image (GRUB with the same built-in config as the EFI loader) in the BIOS boot
/// partition (4), its first sector's block list pointing at the rest, and GRUB's boot
/// sector in the MBR pointing at the core, the protective partition table kept.
fn install_bios_grub(dir: &Path, disk: &Path, cfg: &Path) {
    use std::os::unix::fs::FileExt;
    let core_path = dir.join("bios-core.img");
    sh(
        "grub-mkimage",
        &[
            "-O",
            "i386-pc",
            "-p",
            "/EFI/debian",
            "-c",
            p(cfg),
            "-o",
            p(&core_path),
            "biosdisk",
            "part_gpt",
            "fat",
            "search",
            "search_fs_uuid",
            "linux",
            "boot",
            "echo",
        ],
    );
    let mut core = std::fs::read(&core_path).unwrap();
    core.resize(core.len().next_multiple_of(512), 0);
    let info = sh("sgdisk", &["-i", "4", p(disk)]);
    let start: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("partition 4's first sector");
    assert!(
        core.len() <= MIB as usize,
        "GRUB's core image does not fit 1 MiB"
    );
    // diskboot's block list (the last 12 bytes of the core's first sector): the sectors
    // after it start at start + 1 (grub-mkimage filled in their count and segment).
    core[0x1f4..0x1fc].copy_from_slice(&(start + 1).to_le_bytes());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    f.write_all_at(&core, start * 512).unwrap();
    let mut mbr = [0u8; 512];
    f.read_exact_at(&mut mbr, 0).unwrap();
    let mut boot = std::fs::read("/usr/lib/grub/i386-pc/boot.img").unwrap();
    // Keep the disk's signature and partition table; the core's sector at 0x5c.
    boot[0x1b8..0x200].copy_from_slice(&mbr[0x1b8..0x200]);
    boot[0x5c..0x64].copy_from_slice(&start.to_le_bytes());
    f.write_all_at(&boot, 0).unwrap();
}

/// efivarfs of the machine the test disk came from: Boot0001 "vmtest" boots LOADER from
/// its EFI system partition and is first in BootOrder, Boot0000 is a network entry.
fn source_efivars(dir: &Path) {
    use bkimg_format::firmware::{partition_file_path, LoadOption, PartitionFile};
    const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let put = |name: &str, data: &[u8]| {
        let mut raw = vec![7, 0, 0, 0];
        raw.extend(data);
        std::fs::write(dir.join(format!("{name}-{GLOBAL}")), raw).unwrap();
    };
    let entry = LoadOption {
        attributes: 1,
        description: "vmtest".into(),
        device_path: partition_file_path(&PartitionFile {
            partition: 1,
            start_lba: 2048,
            size_lba: 64 * MIB / 512,
            guid: ESP_PART_GUID.into(),
            path: LOADER.replace('/', "\\"),
        })
        .unwrap(),
        optional_data: Vec::new(),
    };
    put("Boot0001", &entry.encode());
    // A MAC address node: not a disk, not recorded.
    put(
        "Boot0000",
        &[
            1, 0, 0, 0, 12, 0, b'n', 0, 0, 0, 3, 11, 8, 0, 1, 2, 3, 4, 0x7f, 0xff, 4, 0,
        ],
    );
    put("BootOrder", &[1, 0, 0, 0]);
    put("BootCurrent", &[1, 0]);
}

/// The captured Debian system: its disk, an export of it, and a rescue image carrying the
/// export (unattended, reboots when done), made once for the tests that restore it.
struct System {
    dir: PathBuf,
    disk: PathBuf,
    image: PathBuf,
}

fn system() -> &'static System {
    static S: OnceLock<System> = OnceLock::new();
    S.get_or_init(|| {
        let dir = fixture().dir.path().join("system");
        std::fs::create_dir_all(&dir).unwrap();
        let disk = make_boot_disk(&dir);
        let repo = dir.join("repo");
        // Captured as the machine it came from would be: its firmware has an entry for
        // the loader, first in BootOrder and the one it booted through.
        let efivars = dir.join("efivars");
        source_efivars(&efivars);
        let out = Command::new(bkimg_path())
            .env("BKIMG_TEST_EFIVARS", &efivars)
            .args(["capture", "--repo", p(&repo), p(&disk), "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = list_json(&repo);
        assert_eq!(list.len(), 1, "{}", String::from_utf8_lossy(&out.stdout));
        let info = bkimg_ok(&["info", "--repo", p(&repo), "latest", "--json"]).json();
        assert_eq!(
            info["manifest"]["firmware"]["uefi_boot_entries"][0]["path"],
            LOADER.replace('/', "\\"),
            "the capture did not record the boot entry: {info}"
        );
        let export = dir.join("server.bkimg");
        bkimg_ok(&["export", "--repo", p(&repo), "-o", p(&export), "-q"]);
        let config = dir.join("site.toml");
        std::fs::write(&config, "[rescue]\nunattended = true\nafter = \"reboot\"\n").unwrap();
        let image = dir.join("rescue.img");
        bkimg_ok(&[
            "--config",
            p(&config),
            "rescue",
            "build",
            "-o",
            p(&image),
            "--include-export",
            p(&export),
            "-q",
        ]);
        System { dir, disk, image }
    })
}

/// The restored system's marker line: /, swap and the EFI system partition on the
/// restored disk's partitions (`prefix`: "/dev/nvme0n1p", "/dev/vda").
fn assert_system_up(console: &str, prefix: &str) {
    let line = console
        .lines()
        .find(|l| l.contains(MARKER))
        .unwrap_or_else(|| panic!("the restored system did not come up:\n{console}"));
    assert!(line.contains(&format!("root={prefix}3")), "{line}");
    assert!(line.contains(&format!("swap={prefix}2")), "{line}");
    assert!(line.contains(&format!("efi={prefix}1")), "{line}");
}

/// Under UEFI, the restored system reads efivarfs: the entry it booted through is the
/// first of BootOrder (what `efibootmgr` would show first).
fn assert_booted_first_entry(console: &str) {
    let line = console
        .lines()
        .find(|l| l.contains(MARKER))
        .unwrap_or_else(|| panic!("the restored system did not come up:\n{console}"));
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_string()
    };
    let (current, order) = (field("bootcurrent"), field("bootorder"));
    assert!(
        current.len() == 4 && order.starts_with(&current),
        "BootCurrent {current:?} is not first in BootOrder {order:?}: {line}"
    );
}

/// Under BIOS, from the rescue as a CD: the restored disk's own boot code (MBR and BIOS
/// boot partition, restored with it) boots the restored Debian once the CD is gone.
#[test]
fn bios_restored_system_boots() {
    if !available() || !require_root() {
        return;
    }
    let s = system();
    let size = std::fs::metadata(&s.disk).unwrap().len();
    let target = s.dir.join("bios-target.img");
    blank(&target, size);
    let disks: [&Path; 2] = [&s.dir.join("bios-spare.img"), &target];
    // A virtio target behind an NVMe disk too small to take it.
    blank(disks[0], 64 * MIB);
    let mut vm = Vm::start_in(
        &s.dir,
        "bios",
        Firmware::Bios,
        Some((Boot::Cd, &s.image)),
        &disks,
    );
    let console = vm.wait_poweroff();
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert!(console.contains("bkimg-rescue: rebooting"), "{console}");
    drop(vm);
    // The CD taken out; only the restored disk to boot from.
    let mut vm = Vm::start_in(&s.dir, "bios.2", Firmware::Bios, None, &[&target]);
    let console = vm.wait_poweroff();
    assert_system_up(&console, "/dev/nvme0n1p");
}

/// (vmlinuz, its modules directory) of the kernel in the rescue build cache.
fn rescue_kernel() -> (PathBuf, PathBuf) {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
        .join("bkimg/rescue");
    let version = fixture().build["kernel"].as_str().unwrap().to_string();
    for e in std::fs::read_dir(&cache).unwrap().flatten() {
        let vmlinuz = e.path().join(format!("boot/vmlinuz-{version}"));
        let modules = e.path().join(format!("lib/modules/{version}"));
        if e.path().join(".complete").exists() && vmlinuz.exists() {
            return (vmlinuz, modules);
        }
    }
    panic!("kernel {version} not in {}", cache.display());
}

/// An initramfs (busybox) that loads the disk and filesystem drivers, mounts the root
/// filesystem named by root=UUID= and hands over to its systemd.
fn boot_initramfs(modules: &Path) -> Vec<u8> {
    use bkimg_rescue::cpio::{Archive, Node};
    use bkimg_rescue::modules::ModuleDb;
    let db = ModuleDb::parse(&std::fs::read_to_string(modules.join("modules.dep")).unwrap());
    let (order, missing) = db.load_order(&[
        "crc32c_intel",
        "crc32c_generic",
        "nvme",
        "virtio_pci",
        "virtio_blk",
        "ext4",
        "vfat",
        "nls_cp437",
        "nls_ascii",
        // The root filesystem carries no modules of this kernel: systemd mounts efivarfs
        // only if it is loaded already.
        "efivarfs",
    ]);
    assert!(missing.is_empty(), "{missing:?}");
    let mut a = Archive::new();
    a.file("bin/busybox", 0o755, std::fs::read("/bin/busybox").unwrap());
    for tool in [
        "sh",
        "mount",
        "insmod",
        "findfs",
        "switch_root",
        "sleep",
        "sed",
        "cat",
    ] {
        a.symlink(&format!("bin/{tool}"), "busybox");
    }
    for d in ["dev", "proc", "sys", "newroot"] {
        a.dir(d);
    }
    a.insert(
        "dev/console",
        Node::CharDev {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    let mut list = String::new();
    for rel in &order {
        a.file(
            &format!("modules/{rel}"),
            0o644,
            std::fs::read(modules.join(rel)).unwrap(),
        );
        list.push_str(&format!("/modules/{rel}\n"));
    }
    a.file("modules.list", 0o644, list.into_bytes());
    a.file(
        "init",
        0o755,
        b"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do insmod $m 2>/dev/null; done
uuid=$(sed -n 's/.*root=UUID=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
i=0
until dev=$(findfs UUID=$uuid) || [ $i -ge 120 ]; do sleep 1; i=$((i+1)); done
mount -o ro $dev /newroot && exec switch_root /newroot /sbin/init
echo \"boot disk: no root filesystem UUID=$uuid\"
exec sh
"
        .to_vec(),
    );
    let mut raw = Vec::new();
    a.write(&mut raw, 0).unwrap();
    zstd::bulk::compress(&raw, 3).unwrap()
}

/// The whole promise: a dead machine boots the stick, the rescue restores the captured
/// system onto its blank NVMe disk unattended, gives the restored loader a UEFI boot entry
/// first in BootOrder and reboots; the machine (same UEFI variables, the stick still in)
/// boots the restored Debian through that entry (its disk has no removable-media loader),
/// which mounts /, swap and the EFI system partition from the restored partitions by UUID.
#[test]
fn uefi_restored_system_boots() {
    if !available() || !require_root() {
        return;
    }
    let s = system();
    let (dir, disk, image) = (&s.dir, &s.disk, &s.image);
    let size = std::fs::metadata(disk).unwrap().len();
    let target = dir.join("target.img");
    blank(&target, size + 256 * MIB);
    // Reboot ends qemu (-no-reboot); the next VM of the same name keeps its NVRAM.
    let mut vm = Vm::start_in(
        dir,
        "server",
        Firmware::Uefi,
        Some((Boot::UsbStick, image)),
        &[&target],
    );
    let console = vm.wait_poweroff();
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert!(console.contains("bkimg-rescue: rebooting"), "{console}");
    assert!(
        console.contains("bkimg-rescue: UEFI boot entry Boot")
            && console.contains(
                "\"vmtest\" (recorded by the capture): \\EFI\\vmtest\\grubx64.efi on /dev/nvme0n1p1, first in BootOrder"
            ),
        "{console}"
    );
    drop(vm);
    let mut vm = Vm::start_in(
        dir,
        "server.2",
        Firmware::Uefi,
        Some((Boot::UsbStickLeftIn, image)),
        &[&target],
    );
    let console = vm.wait_poweroff();
    assert!(
        console.contains("\"vmtest\" from HD(1,GPT,"),
        "the firmware did not boot through the recreated entry:\n{console}"
    );
    assert_system_up(&console, "/dev/nvme0n1p");
    assert_booted_first_entry(&console);
}

// ---- a repository in S3, reached over the rescue system's network ------------------------

/// A network namespace holding a tap device for a VM, an S3 server and a DHCP server on
/// 10.77.0.1: the VM reaches nothing else. Removed (with its processes) on drop.
struct Site {
    ns: String,
    children: Vec<Child>,
}

const SITE_IP: &str = "10.77.0.1";
const S3_PORT: &str = "9000";
const AK: &str = "bkimgrescuekey";
const SK: &str = "bkimg-rescue-secret-0123456789";

impl Site {
    fn start(dir: &Path) -> Site {
        // One per site: the tests of this process run at the same time.
        static SITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("bkrescue{}-{n}", std::process::id());
        sh("ip", &["netns", "add", &ns]);
        let mut site = Site {
            ns,
            children: Vec::new(),
        };
        site.run(&["ip", "link", "set", "lo", "up"]);
        site.run(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        site.run(&["ip", "addr", "add", &format!("{SITE_IP}/24"), "dev", "tap0"]);
        site.run(&["ip", "link", "set", "tap0", "up"]);
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join("backups")).unwrap();
        let fs = s3s_fs();
        site.spawn(
            &[
                p(&fs),
                "--host",
                SITE_IP,
                "--port",
                S3_PORT,
                "--access-key",
                AK,
                "--secret-key",
                SK,
                p(&root),
            ],
            &dir.join("s3s-fs.log"),
        );
        let leases = dir.join("udhcpd.leases");
        std::fs::write(&leases, b"").unwrap();
        let conf = dir.join("udhcpd.conf");
        std::fs::write(
            &conf,
            format!(
                "interface tap0\nstart 10.77.0.50\nend 10.77.0.60\nlease_file {}\n\
                 option subnet 255.255.255.0\noption router {SITE_IP}\n",
                leases.display()
            ),
        )
        .unwrap();
        site.spawn(
            &["busybox", "udhcpd", "-f", p(&conf)],
            &dir.join("udhcpd.log"),
        );
        site
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&mut self, args: &[&str], log: &Path) {
        let log = std::fs::File::create(log).unwrap();
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// bkimg inside the namespace, with the server's credentials and endpoint.
    fn try_bkimg(&self, args: &[&str]) -> Result<String, String> {
        let endpoint = format!("http://{SITE_IP}:{S3_PORT}");
        let bkimg = bkimg_path();
        let mut all = vec![
            "env",
            "AWS_ACCESS_KEY_ID=bkimgrescuekey",
            "AWS_SECRET_ACCESS_KEY=bkimg-rescue-secret-0123456789",
            "AWS_REGION=us-east-1",
            "AWS_EC2_METADATA_DISABLED=true",
            "AWS_CONFIG_FILE=/nonexistent/bkimg-test",
            "AWS_SHARED_CREDENTIALS_FILE=/nonexistent/bkimg-test",
        ];
        let ep = format!("AWS_ENDPOINT_URL={endpoint}");
        all.push(&ep);
        all.push(p(&bkimg));
        all.extend(args);
        let out = self.command(&all).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// What docs/rescue.md tells a site to do with a stick written from the image: a small
/// partition after the image, vfat labelled BKIMG-CONF, holding bkimg-rescue.toml. Here on
/// the image file (the host scans no loop partitions: offsets instead). Run again, it
/// replaces the file.
fn settings_partition(stick: &Path, settings: &str) -> u64 {
    let info = sh_status("sgdisk", &["-i", "4", p(stick)]).1;
    let first = |info: &str| -> Option<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix("First sector: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    let start = match first(&info) {
        Some(start) => start,
        None => {
            let len = std::fs::metadata(stick).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(stick)
                .unwrap()
                .set_len(len + 16 * MIB)
                .unwrap();
            sh("sgdisk", &["-e", p(stick)]);
            sh(
                "sgdisk",
                &[
                    "-n",
                    "0:0:0",
                    "-t",
                    "0:0700",
                    "-c",
                    "0:BKIMG-CONF",
                    p(stick),
                ],
            );
            let start = first(&sh("sgdisk", &["-i", "4", p(stick)])).expect("partition 4");
            let kib = (std::fs::metadata(stick).unwrap().len() - start * 512 - 33 * 512) / 1024;
            sh(
                "mkfs.vfat",
                &[
                    "-n",
                    "BKIMG-CONF",
                    "--offset",
                    &start.to_string(),
                    p(stick),
                    &kib.to_string(),
                ],
            );
            start
        }
    };
    let file = stick.with_extension("toml");
    std::fs::write(&file, settings).unwrap();
    sh(
        "mcopy",
        &[
            "-o",
            "-i",
            &format!("{}@@{}", p(stick), start * 512),
            p(&file),
            "::/bkimg-rescue.toml",
        ],
    );
    start
}

/// The data centre is gone, the bucket survived: a stick that carries neither an export
/// nor a credential boots (UEFI), gets an address by DHCP, takes the S3 credentials from
/// a small partition the site added to the stick (BKIMG-CONF), restores the captured
/// Debian from the bucket and reboots into it through the boot entry the capture
/// recorded. First, with no credentials anywhere, a person types them at the serial
/// console (the secret unechoed) and gets the secret wrong: a clear message, a shell,
/// nothing written. Only the namespace's addresses exist for the VM.
#[test]
fn restores_from_s3_over_dhcp_and_boots() {
    if !available() || !require_root() {
        return;
    }
    let s = system();
    let dir = fresh_dir(s.dir.join("s3"));
    let site = Site::start(&dir);
    // The server may take a moment to listen: retry the upload until it does.
    let deadline = Instant::now() + Duration::from_secs(120);
    let repo = s.dir.join("repo");
    let upload = [
        "replicate",
        "--repo",
        p(&repo),
        "--to",
        "s3://backups/site",
        "-q",
    ];
    while let Err(e) = site.try_bkimg(&upload) {
        assert!(
            Instant::now() < deadline,
            "could not upload to the S3 server in the namespace: {e}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        format!(
            "repository = \"s3://backups/site\"\n[s3]\nendpoint = \"http://{SITE_IP}:{S3_PORT}\"\n\
             region = \"us-east-1\"\n[rescue]\nunattended = true\nafter = \"reboot\"\n"
        ),
    )
    .unwrap();
    let image = dir.join("rescue.img");
    let build = bkimg(&["--config", p(&config), "rescue", "build", "-o", p(&image)]);
    assert_eq!(build.code, 0, "{}", build.stderr);
    assert!(
        !build.stderr.contains("carries credentials"),
        "{}",
        build.stderr
    );
    let target = dir.join("target.img");
    blank(&target, std::fs::metadata(&s.disk).unwrap().len());

    // First a person at the console, no credentials anywhere: asked for, the secret
    // typed without echo, and wrong.
    settings_partition(&image, "[rescue]\nunattended = false\n");
    let mut vm = Vm::start_interactive(
        &dir,
        "s3",
        Firmware::Uefi,
        Some((Boot::UsbStick, &image)),
        &[&target],
        Some(&site.ns),
    );
    vm.wait_for("S3 access key id:");
    vm.type_line(AK);
    vm.wait_for("S3 secret access key (not shown):");
    vm.type_line("not-the-secret");
    let console = vm.wait_for("bkimg-rescue: starting a shell");
    drop(vm);
    assert!(
        console
            .contains("bkimg-rescue: site settings from /dev/sda4 (BKIMG-CONF): rescue.unattended"),
        "{console}"
    );
    assert!(
        console.contains("RESTORE FAILED") && console.contains("check the credentials"),
        "{console}"
    );
    assert!(
        !console.contains("not-the-secret"),
        "the secret was echoed: {console}"
    );
    assert!(!console.contains("rebooting"), "{console}");
    assert!(all_zero(&target), "the target was written to");

    settings_partition(
        &image,
        &format!("[rescue]\naws-access-key-id = \"{AK}\"\naws-secret-access-key = \"{SK}\"\n"),
    );
    let mut vm = Vm::start_net(
        &dir,
        "s3",
        Firmware::Uefi,
        Some((Boot::UsbStick, &image)),
        &[&target],
        Some(&site.ns),
        &[],
    );
    let console = vm.wait_poweroff();
    assert!(
        console.contains("bkimg-rescue: network: eth0 10.77.0.") && console.contains("(DHCP)"),
        "{console}"
    );
    assert!(
        console.contains("bkimg-rescue: repository: s3://backups/site"),
        "{console}"
    );
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert!(console.contains("bkimg-rescue: rebooting"), "{console}");
    assert!(console.contains("(recorded by the capture)"), "{console}");
    drop(vm);
    // Same NVRAM, the stick still in: the firmware's BootOrder decides.
    let mut vm = Vm::start_in(
        &dir,
        "s3.2",
        Firmware::Uefi,
        Some((Boot::UsbStickLeftIn, &image)),
        &[&target],
    );
    let console = vm.wait_poweroff();
    assert!(
        console.contains("\"vmtest\" from HD(1,GPT,"),
        "the firmware did not boot through the recreated entry:\n{console}"
    );
    assert_system_up(&console, "/dev/nvme0n1p");
    assert_booted_first_entry(&console);
}

/// A standby host as the repository, reached at a static address: it serves a reader key
/// the stick carries (`--allow-reader`), the stick pins the standby's certificate. The
/// repository shipped there is encrypted (the standby holds it without the key). A wrong
/// pin (from a BKIMG-CONF partition) is refused with nothing written; the right one, with
/// the repository's key file as bkimg.key on that partition, restores.
#[test]
fn restores_from_a_standby_host() {
    if !available() || !require_root() {
        return;
    }
    let f = fixture();
    let dir = fresh_dir(f.dir.path().join("standby"));
    let mut site = Site::start(&dir);
    let (server, server_fp) = standby_keygen(&dir, "standby-key");
    let (shipper, shipper_fp) = standby_keygen(&dir, "shipper-key");
    let (reader, reader_fp) = standby_keygen(&dir, "rescue-key");
    let listen = format!("{SITE_IP}:7070");
    let bin = bkimg_path();
    site.spawn(
        &[
            p(&bin),
            "standby",
            "serve",
            "--listen",
            &listen,
            "--repo",
            p(&dir.join("standby-repo")),
            "--key",
            p(&server),
            "--allow",
            &shipper_fp,
            "--allow-reader",
            &reader_fp,
        ],
        &dir.join("standby.log"),
    );
    let url = format!("bkimg://{listen}");
    let repo = dir.join("encrypted-repo");
    let (pw, repo_key) = encrypted_capture(&dir, &repo, &f.source);
    let ship = [
        "replicate",
        "--repo",
        p(&repo),
        "--to",
        &url,
        "--key",
        p(&shipper),
        "--server-fingerprint",
        &server_fp,
        "--password-file",
        p(&pw),
        "-q",
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Err(e) = site.try_bkimg(&ship) {
        assert!(
            Instant::now() < deadline,
            "could not ship to the standby in the namespace: {e}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let pem = |name: &str| std::fs::read_to_string(reader.join(name)).unwrap();
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        format!(
            "repository = \"{url}\"\n[rescue]\nunattended = true\nafter = \"poweroff\"\n\
             [rescue.network]\naddress = \"10.77.0.70/24\"\n[rescue.standby]\nserver-fingerprint = \"{server_fp}\"\n\
             key-pem = \"\"\"\n{}\"\"\"\ncert-pem = \"\"\"\n{}\"\"\"\n",
            pem("standby.key"),
            pem("standby.crt")
        ),
    )
    .unwrap();
    let image = dir.join("rescue.img");
    let build = bkimg(&["--config", p(&config), "rescue", "build", "-o", p(&image)]);
    assert_eq!(build.code, 0, "{}", build.stderr);
    assert!(
        build.stderr.contains("carries credentials") && build.stderr.contains("key-pem"),
        "the build did not say it carries a key:\n{}",
        build.stderr
    );
    let size = std::fs::metadata(&f.source).unwrap().len();
    let target = dir.join("target.img");
    blank(&target, size);

    settings_partition(
        &image,
        &format!("[rescue.standby]\nserver-fingerprint = \"{shipper_fp}\"\n"),
    );
    let mut vm = Vm::start_net(
        &dir,
        "standby",
        Firmware::Uefi,
        Some((Boot::UsbStick, &image)),
        &[&target],
        Some(&site.ns),
        &[],
    );
    let console = vm.wait_for("bkimg-rescue: starting a shell");
    drop(vm);
    assert!(console.contains("RESTORE FAILED"), "{console}");
    assert!(
        console.contains("fingerprint") || console.contains("denied"),
        "the console does not say the standby's identity is wrong:\n{console}"
    );
    assert!(all_zero(&target), "the target was written to");

    key_on_stick(&image, &repo_key);
    let mut vm = Vm::start_net(
        &dir,
        "standby",
        Firmware::Uefi,
        Some((Boot::UsbStick, &image)),
        &[&target],
        Some(&site.ns),
        &[],
    );
    let console = vm.wait_poweroff();
    assert!(
        console.contains(&format!("bkimg-rescue: repository: {url}")),
        "{console}"
    );
    // A static address from the config (this site's DHCP server is not asked).
    assert!(
        console.contains("bkimg-rescue: network: eth0 10.77.0.70/24 (static)"),
        "{console}"
    );
    assert!(
        console.contains("the repository is encrypted: unlocked with its key file"),
        "{console}"
    );
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert_eq!(
        sha_prefix(&target, size),
        sha_prefix(&f.source, size),
        "the disk restored from the standby differs; console:\n{console}"
    );
}

/// One stick for a site: it carries the exports of two machines, and a map from DMI system
/// UUID to host name. The machine whose firmware says it is web2 gets web2's newest point;
/// with no map the rescue refuses to guess.
#[test]
fn a_fleet_stick_restores_the_machine_it_boots_on() {
    if !available() || !require_root() {
        return;
    }
    let f = fixture();
    let dir = fresh_dir(f.dir.path().join("fleet"));
    // web2: the demo disk with new GPT GUIDs, captured under its own host name.
    let web2 = dir.join("web2.img");
    std::fs::copy(&f.source, &web2).unwrap();
    sh("sgdisk", &["-G", p(&web2)]);
    let repo = dir.join("repo");
    sh(
        "unshare",
        &[
            "--uts",
            "sh",
            "-c",
            &format!(
                "hostname web2 && {} capture --repo {} -q {}",
                p(&bkimg_path()),
                p(&repo),
                p(&web2)
            ),
        ],
    );
    let id = list_json(&repo)[0]["id"].as_str().unwrap().to_string();
    let web2_export = dir.join("web2.bkimg");
    bkimg_ok(&["export", "--repo", p(&repo), "-o", p(&web2_export), "-q"]);
    let expected = dir.join("expected.img");
    bkimg_ok(&[
        "restore",
        "--repo",
        p(&repo),
        &id,
        "--target",
        p(&expected),
        "-q",
    ]);

    const UUID: &str = "5d7b0c2e-1f3a-4b6c-8d9e-0a1b2c3d4e5f";
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        format!(
            "[rescue]\nunattended = true\nafter = \"poweroff\"\n[rescue.hosts]\n\
             \"{}\" = \"web2\"\n\"52:54:00:00:00:99\" = \"db1\"\n",
            UUID.to_uppercase()
        ),
    )
    .unwrap();
    let image = dir.join("rescue.img");
    bkimg_ok(&[
        "--config",
        p(&config),
        "rescue",
        "build",
        "-o",
        p(&image),
        "--include-export",
        p(&f.export),
        "--include-export",
        p(&web2_export),
        "-q",
    ]);
    let size = std::fs::metadata(&web2).unwrap().len();
    let target = dir.join("target.img");
    blank(&target, size);
    let smbios = format!("type=1,uuid={UUID}");
    let mut vm = Vm::start_net(
        &dir,
        "web2",
        Firmware::Bios,
        Some((Boot::Cd, &image)),
        &[&target],
        None,
        &["-smbios", &smbios],
    );
    let console = vm.wait_poweroff();
    assert!(
        console.contains(&format!(
            "this machine is host web2 (DMI system UUID {UUID})"
        )),
        "{console}"
    );
    assert!(console.contains("exports/web2.bkimg"), "{console}");
    assert!(
        console.contains(&format!("restore point {id} of web2")),
        "{console}"
    );
    assert_eq!(
        sha_prefix(&target, size),
        sha_prefix(&expected, size),
        "the machine did not get web2's disk; console:\n{console}"
    );

    // The same stick on a machine it has no name for: refused, nothing written.
    let unknown = dir.join("unknown.img");
    blank(&unknown, size);
    let mut vm = Vm::start_net(
        &dir,
        "unknown",
        Firmware::Bios,
        Some((Boot::Cd, &image)),
        &[&unknown],
        None,
        &[
            "-smbios",
            "type=1,uuid=11111111-2222-3333-4444-555555555555",
        ],
    );
    let console = vm.wait_for("bkimg-rescue: starting a shell");
    assert!(
        console.contains("RESTORE FAILED: the media carries 2 exports"),
        "{console}"
    );
    drop(vm);
    assert!(
        all_zero(&unknown),
        "a machine the stick has no name for was written to"
    );
}

/// Network boot: the files of `--pxe-dir` served over TFTP boot the rescue (SeaBIOS, iPXE)
/// with no media at all; the repository is an export on a local disk found by its
/// filesystem label; that disk, holding data, is never a target.
#[test]
fn pxe_boot_restores_from_a_disk_found_by_label() {
    if !available() || !require_root() {
        return;
    }
    let f = fixture();
    let dir = f.dir.path().join("pxe");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("repo-fs")).unwrap();
    std::fs::copy(&f.export, dir.join("repo-fs/web1.bkimg")).unwrap();
    let repo_disk = dir.join("repo-disk.img");
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "BKREPO",
            "-d",
            p(&dir.join("repo-fs")),
            p(&repo_disk),
            "64M",
        ],
    );
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        "[rescue]\nunattended = true\nafter = \"poweroff\"\nrepository = \"LABEL=BKREPO:/web1.bkimg\"\n",
    )
    .unwrap();
    let boot = dir.join("boot");
    bkimg_ok(&[
        "--config",
        p(&config),
        "rescue",
        "build",
        "-o",
        p(&dir.join("rescue.img")),
        "--pxe-dir",
        p(&boot),
        "-q",
    ]);
    for file in ["vmlinuz", "initrd.zst", "bkimg.ipxe", "grub.cfg"] {
        assert!(boot.join(file).is_file(), "--pxe-dir has no {file}");
    }
    let size = std::fs::metadata(&f.source).unwrap().len();
    let target = dir.join("target.img");
    blank(&target, size);
    let mut vm = Vm::start_in(
        &dir,
        "pxe",
        Firmware::Bios,
        Some((Boot::Pxe, &boot)),
        &[&repo_disk, &target],
    );
    let console = vm.wait_poweroff();
    assert!(!console.contains("rescue media:"), "{console}");
    assert!(
        console.contains("bkimg-rescue: repository: /run/repository/web1.bkimg"),
        "{console}"
    );
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert!(
        console
            .lines()
            .any(|l| l.contains("disk /dev/nvme0n1:") && l.contains("holds the repository")),
        "{console}"
    );
    assert_eq!(
        sha_prefix(&target, size),
        sha_prefix(&f.source, size),
        "the disk restored after a network boot differs; console:\n{console}"
    );
}

/// An encrypted repository on a second disk of the machine (`LABEL=BKBACKUP:/repo`):
/// unattended and with no key anywhere, the rescue refuses with what to do and writes
/// nothing; with the repository's key file on the stick's BKIMG-CONF partition
/// (`bkimg.key`) it unlocks the repository and restores the disk byte for byte.
#[test]
fn an_encrypted_repository_restores_with_the_key_file_from_the_stick() {
    if !available() || !require_root() {
        return;
    }
    let f = fixture();
    let dir = fresh_dir(f.dir.path().join("encrypted"));
    let root = dir.join("backup-root");
    let repo = root.join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let (_, key) = encrypted_capture(&dir, &repo, &f.source);
    let backup = dir.join("backup.img");
    blank(&backup, 256 << 20);
    sh(
        "mkfs.ext4",
        &["-q", "-F", "-L", "BKBACKUP", "-d", p(&root), p(&backup)],
    );
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        "[rescue]\nunattended = true\nafter = \"poweroff\"\nrepository = \"LABEL=BKBACKUP:/repo\"\n",
    )
    .unwrap();
    let image = dir.join("rescue.img");
    bkimg_ok(&[
        "--config",
        p(&config),
        "rescue",
        "build",
        "-o",
        p(&image),
        "-q",
    ]);
    let size = std::fs::metadata(&f.source).unwrap().len();
    let target = dir.join("target.img");
    blank(&target, size);

    let mut vm = Vm::start_in(
        &dir,
        "enc-nokey",
        Firmware::Uefi,
        Some((Boot::UsbStick, &image)),
        &[&target, &backup],
    );
    let console = vm.wait_for("bkimg-rescue: starting a shell");
    drop(vm);
    assert!(
        console.contains("RESTORE FAILED: the repository is encrypted and no key file was given"),
        "{console}"
    );
    assert!(all_zero(&target), "the target was written to");

    key_on_stick(&image, &key);
    let mut vm = Vm::start_in(
        &dir,
        "enc-key",
        Firmware::Uefi,
        Some((Boot::UsbStick, &image)),
        &[&target, &backup],
    );
    let console = vm.wait_poweroff();
    drop(vm);
    assert!(
        console.contains("bkimg-rescue: key file bkimg.key on"),
        "{console}"
    );
    assert!(
        console.contains("the repository is encrypted: unlocked with its key file"),
        "{console}"
    );
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert_eq!(
        sha_prefix(&target, size),
        sha_prefix(&f.source, size),
        "the restored disk differs from the captured one; console:\n{console}"
    );
}

/// An export of an encrypted restore point on the stick (`--include-export`, spec/format.md
/// §10.3): it carries the point sealed, so the rescue unlocks it with the key file on the
/// stick's BKIMG-CONF partition (`bkimg.key`), and restores the disk byte for byte.
#[test]
fn an_encrypted_export_on_the_stick_restores_with_its_key_file() {
    if !available() || !require_root() {
        return;
    }
    let f = fixture();
    let dir = fresh_dir(f.dir.path().join("encrypted-export"));
    let repo = dir.join("repo");
    let (pw, key) = encrypted_capture(&dir, &repo, &f.source);
    let export = dir.join("sealed.bkimg");
    bkimg_ok(&[
        "export",
        "--repo",
        p(&repo),
        "--password-file",
        p(&pw),
        "-o",
        p(&export),
        "-q",
    ]);
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        "[rescue]\nunattended = true\nafter = \"poweroff\"\n",
    )
    .unwrap();
    let image = dir.join("rescue.img");
    bkimg_ok(&[
        "--config",
        p(&config),
        "rescue",
        "build",
        "-o",
        p(&image),
        "--include-export",
        p(&export),
        "-q",
    ]);
    key_on_stick(&image, &key);
    let size = std::fs::metadata(&f.source).unwrap().len();
    let target = dir.join("target.img");
    blank(&target, size);
    let mut vm = Vm::start_in(
        &dir,
        "enc-export",
        Firmware::Uefi,
        Some((Boot::UsbStick, &image)),
        &[&target],
    );
    let console = vm.wait_poweroff();
    drop(vm);
    assert!(
        console.contains("the repository is encrypted: unlocked with its key file"),
        "{console}"
    );
    assert!(console.contains("bkimg-rescue: restored "), "{console}");
    assert_eq!(
        sha_prefix(&target, size),
        sha_prefix(&f.source, size),
        "the restored disk differs from the captured one; console:\n{console}"
    );
}

/// `source` captured into a new encrypted repository `repo`; returns its password file
/// and key file (both in `dir`).
fn encrypted_capture(dir: &Path, repo: &Path, source: &Path) -> (PathBuf, PathBuf) {
    let (pw, key) = (dir.join("pw"), dir.join("repo.key"));
    std::fs::write(&pw, "rescue passphrase\n").unwrap();
    bkimg_ok(&[
        "key",
        "init",
        "--repo",
        p(repo),
        "--password-file",
        p(&pw),
        "--key-file-out",
        p(&key),
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
    ]);
    bkimg_ok(&[
        "capture",
        "--repo",
        p(repo),
        "--password-file",
        p(&pw),
        "-q",
        p(source),
    ]);
    (pw, key)
}

/// The repository's key file as `bkimg.key` on the stick's BKIMG-CONF partition (with
/// unattended settings).
fn key_on_stick(image: &Path, key: &Path) {
    let start = settings_partition(image, "[rescue]\nunattended = true\n");
    sh(
        "mcopy",
        &[
            "-o",
            "-i",
            &format!("{}@@{}", p(image), start * 512),
            p(key),
            "::/bkimg.key",
        ],
    );
}
