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

/// A VM whose serial console goes to a file; killed when dropped.
struct Vm {
    child: Child,
    log: PathBuf,
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
}

impl Vm {
    fn start(name: &str, firmware: Firmware, boot: Boot, media: &Path, disks: &[&Path]) -> Vm {
        let f = fixture();
        let log = f.dir.path().join(format!("{name}.serial"));
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
        args.push("-serial".into());
        args.push(format!("file:{}", log.display()));
        if let Firmware::Uefi = firmware {
            let vars = f.dir.path().join(format!("{name}.vars"));
            std::fs::copy(OVMF_VARS, &vars).unwrap();
            args.extend([
                "-drive".into(),
                format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,file={}", vars.display()),
            ]);
        }
        match boot {
            Boot::UsbStick => args.extend([
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
            Boot::Cd => args.extend([
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
            // NVMe and virtio, as servers and clouds have them.
            args.push(if i % 2 == 0 {
                format!("nvme,drive=d{i},serial=TARGET{i}")
            } else {
                format!("virtio-blk-pci,drive=d{i},serial=TARGET{i}")
            });
        }
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-system-x86_64");
        Vm { child, log }
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

#[test]
fn uefi_usb_stick_restores_unattended() {
    // A replacement disk larger than the original, as they usually are.
    restores_unattended("uefi-usb", Firmware::Uefi, Boot::UsbStick, 64 << 20);
}

#[test]
fn bios_cd_restores_unattended() {
    restores_unattended("bios-cd", Firmware::Bios, Boot::Cd, 0);
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
