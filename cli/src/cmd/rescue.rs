//! `bkimg rescue`: recovery media that restore a bare machine (bkimg_rescue does the work).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::HumanBytes;

use crate::{exit, out_json, Common};

#[derive(Subcommand)]
pub enum RescueCommand {
    /// Write a bootable image (USB stick or CD; UEFI or BIOS) that restores a restore
    /// point onto a bare machine, asking or unattended.
    Build(BuildArgs),
}

#[derive(Args)]
pub struct BuildArgs {
    /// The image to write (must not exist); `dd` it to a stick or boot it as a CD.
    #[arg(long, short)]
    pub output: PathBuf,
    /// An export file (`bkimg export`) to carry on the media, for offline restores.
    #[arg(long, value_name = "FILE")]
    pub include_export: Vec<PathBuf>,
    /// A kernel package (.deb) or bzImage to boot [default: Debian's linux-image-amd64,
    /// downloaded with apt and cached].
    #[arg(long, value_name = "DEB_OR_VMLINUZ")]
    pub kernel: Option<PathBuf>,
    /// Also write the kernel, initramfs, an iPXE script and a GRUB config for network
    /// boot to DIR.
    #[arg(long, value_name = "DIR")]
    pub pxe_dir: Option<PathBuf>,
    /// Where downloaded kernels are kept [default: ~/.cache/bkimg/rescue].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Statically linked busybox to carry.
    #[arg(long, value_name = "FILE", default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

/// `config` is the config file named with `--config` (or BKIMG_CONFIG): the image carries
/// it, with its `[rescue]` table (docs/rescue.md). The default /etc/bkimg/bkimg.toml is not
/// carried unless named: it may hold this host's settings, not the site's.
pub fn run(command: RescueCommand, config: Option<PathBuf>) -> Result<i32> {
    match command {
        RescueCommand::Build(args) => build(args, config),
    }
}

fn build(args: BuildArgs, config: Option<PathBuf>) -> Result<i32> {
    let cache_dir = match args.cache_dir {
        Some(d) => d,
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .context("no cache directory: set --cache-dir")?
            .join("bkimg/rescue"),
    };
    let opts = bkimg_rescue::image::BuildOptions {
        output: args.output,
        config,
        exports: args.include_export,
        kernel: args.kernel,
        pxe_dir: args.pxe_dir,
        cache_dir,
        bkimg: std::env::current_exe().context("finding the running bkimg binary")?,
        busybox: args.busybox,
    };
    let quiet = args.common.quiet || args.common.json;
    let report = bkimg_rescue::image::build(&opts, &|msg| {
        if !quiet {
            eprintln!("bkimg: {msg}");
        }
    })?;
    if !report.secrets.is_empty() {
        eprintln!(
            "bkimg: warning: the image carries credentials from the config file ({}): whoever holds it can read the repository",
            report.secrets.join(", ")
        );
    }
    if !report.modules_missing.is_empty() && !quiet {
        eprintln!(
            "bkimg: drivers this kernel does not ship as modules (built in or absent): {}",
            report.modules_missing.join(", ")
        );
    }
    if args.common.json {
        out_json(&serde_json::to_value(&report)?);
    } else {
        eprintln!(
            "wrote {} ({}, kernel {}, {} drivers, {} export(s)) in {:.1} s",
            report.output.display(),
            HumanBytes(report.bytes),
            report.kernel,
            report.modules,
            report.exports.len(),
            report.seconds
        );
    }
    Ok(exit::OK)
}
