//! The network of the rescue system, for repositories it reaches over it (S3): DHCP on
//! every interface with a link (busybox udhcpc), or the config's static address.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::NetworkConfig;

fn busybox(args: &[&str]) -> Result<String> {
    let out = Command::new("/bin/busybox")
        .args(args)
        .output()
        .with_context(|| format!("running busybox {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Interfaces other than loopback, sorted.
fn interfaces() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo")
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn has_link(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/carrier")).is_ok_and(|c| c.trim() == "1")
}

/// Brings the network up; returns what it did ("eth0 10.0.0.12/24 by DHCP").
pub fn bring_up(cfg: &NetworkConfig, wait: Duration) -> Result<String> {
    let _ = busybox(&["ip", "link", "set", "lo", "up"]);
    let all = interfaces();
    let candidates: Vec<String> = match &cfg.interface {
        Some(i) if all.contains(i) => vec![i.clone()],
        Some(i) => bail!(
            "network interface {i} does not exist (this machine has: {}); fix [rescue.network] interface",
            if all.is_empty() { "none".to_string() } else { all.join(", ") }
        ),
        None => all.clone(),
    };
    if candidates.is_empty() {
        bail!("this machine has no network interface the rescue system has a driver for");
    }
    for i in &candidates {
        let _ = busybox(&["ip", "link", "set", i, "up"]);
    }
    let deadline = Instant::now() + wait;
    let linked = loop {
        let up: Vec<String> = candidates.iter().filter(|i| has_link(i)).cloned().collect();
        if !up.is_empty() {
            break up;
        }
        if Instant::now() > deadline {
            bail!(
                "no network link on {} after {} s: check the cable or the switch port",
                candidates.join(", "),
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if let Some(address) = &cfg.address {
        let i = &linked[0];
        busybox(&["ip", "addr", "add", address, "dev", i])?;
        if let Some(gw) = &cfg.gateway {
            busybox(&["ip", "route", "add", "default", "via", gw, "dev", i])?;
        }
        write_resolv(&cfg.dns)?;
        return Ok(format!("{i} {address} (static)"));
    }
    let script = "/usr/share/udhcpc/default.script";
    let mut tried = Vec::new();
    for i in &linked {
        if busybox(&[
            "udhcpc", "-i", i, "-f", "-q", "-n", "-t", "5", "-T", "3", "-s", script,
        ])
        .is_ok()
        {
            if !cfg.dns.is_empty() {
                write_resolv(&cfg.dns)?;
            }
            let shown = busybox(&["ip", "-4", "-o", "addr", "show", "dev", i]).unwrap_or_default();
            let addr = shown
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .unwrap_or("?")
                .to_string();
            return Ok(format!("{i} {addr} (DHCP)"));
        }
        tried.push(i.as_str());
    }
    bail!(
        "no DHCP answer on {}: set a static address in [rescue.network] or bkimg.ip=ADDR/PREFIX",
        tried.join(", ")
    )
}

fn write_resolv(dns: &[String]) -> Result<()> {
    if dns.is_empty() {
        return Ok(());
    }
    let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    std::fs::write(Path::new("/etc/resolv.conf"), text).context("writing /etc/resolv.conf")
}
