//! `bkimg info`: one restore point in detail (and the summary `list --json` shares).

use anyhow::Result;
use bkimg_format::manifest::{Content, Manifest, PartitionTable};
use bkimg_format::repo::Point;
use clap::Args;
use indicatif::HumanBytes;
use serde_json::json;

use crate::config::{Config, RepoArgs};
use crate::{exit, open_repository, out, out_json, Common};
use bkimg_format::keys::Mode;

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(default_value = "latest")]
    pub id: String,
    #[command(flatten)]
    pub standby: crate::standby::StandbyArgs,
    #[command(flatten)]
    pub unlock: crate::cmd::key::Unlock,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: InfoArgs, config: &Config) -> Result<i32> {
    let InfoArgs {
        repo,
        id,
        standby,
        unlock,
        common,
    } = args;
    let repo = open_repository(repo.path(), &standby, &unlock, 1, config)?;
    let point = repo.resolve(&id)?;
    if common.json {
        let mut v = point_summary(&point);
        v["protection"] = protection_name(repo.protection()).into();
        v["authenticated"] = authenticated(repo.protection(), &unlock).into();
        v["manifest"] = serde_json::to_value(&point.manifest)?;
        out_json(&v);
    } else {
        print_info(&point.manifest, &point);
        out(&format!(
            "  protection {}",
            match repo.protection() {
                Mode::None => "none (plaintext, unauthenticated)",
                Mode::Encrypted => "encrypted and authenticated",
                Mode::Signed if unlock.unauthenticated =>
                    "signed, read WITHOUT its key (plaintext, NOT authenticated)",
                Mode::Signed => "signed (plaintext, authenticated)",
            }
        ));
    }
    Ok(exit::OK)
}

/// Whether what was read was checked against the repository's key.
pub fn authenticated(mode: Mode, unlock: &crate::cmd::key::Unlock) -> bool {
    mode != Mode::None && !unlock.unauthenticated
}

/// The JSON name of a repository's protection (spec/format.md §18.1).
pub fn protection_name(mode: Mode) -> &'static str {
    match mode {
        Mode::None => "none",
        Mode::Encrypted => "encrypted",
        Mode::Signed => "signed",
    }
}

pub fn point_summary(p: &Point) -> serde_json::Value {
    let m = &p.manifest;
    json!({
        "id": m.id,
        "parent": m.parent.as_ref().map(|p| &p.id),
        "created": m.created,
        "host": m.host,
        "tool": m.tool,
        "consistency": m.consistency,
        "manifest_sha256": p.manifest_sha256.to_hex(),
        "size": m.disks.iter().map(|d| d.size).sum::<u64>(),
        "stored_new": m.disks.iter().flat_map(|d| &d.volumes).map(|v| match v.content {
            Content::Data { bytes_stored_new, .. } => bytes_stored_new,
            Content::Swap { .. } => 0,
        }).sum::<u64>(),
        "disks": m.disks.iter().map(|d| json!({
            "name": d.name, "source": d.source, "size": d.size,
            "table": match &d.table {
                PartitionTable::None => "none",
                PartitionTable::Gpt(_) => "gpt",
                PartitionTable::Msdos(_) => "msdos",
            },
        })).collect::<Vec<_>>(),
    })
}

fn print_info(m: &Manifest, p: &Point) {
    out(&format!("restore point {}", m.id));
    out(&format!(
        "  created   {} on {} by {}",
        m.created, m.host, m.tool
    ));
    out(&format!(
        "  parent    {}",
        m.parent
            .as_ref()
            .map_or("none (full)".to_string(), |p| p.id.clone())
    ));
    out(&format!("  manifest  sha256 {}", p.manifest_sha256));
    out(&format!(
        "  taken     {}",
        match m.consistency.as_deref() {
            Some("frozen-snapshot") => "from one snapshot of every disk, filesystems frozen",
            Some("snapshot") => "from one snapshot of every disk",
            Some("offline") => "offline: no disk was mounted or in use",
            Some("inconsistent") => "while in use (--allow-inconsistent): may be inconsistent",
            Some(_) => "(a consistency this bkimg does not know)",
            None => "(consistency not recorded: written by an older bkimg)",
        }
    ));
    out(&format!(
        "  chunks    {} KiB, zstd level {}",
        m.chunk_size / 1024,
        m.compression.level
    ));
    for d in &m.disks {
        let table = match &d.table {
            PartitionTable::None => "no partition table".to_string(),
            PartitionTable::Gpt(g) => format!("GPT, disk GUID {}", g.disk_guid),
            PartitionTable::Msdos(t) => format!("msdos, signature {:08x}", t.disk_signature),
        };
        out(&format!(
            "  {} {} ({}, {} B sectors): {table}",
            d.name,
            d.source,
            HumanBytes(d.size),
            d.logical_sector_size
        ));
        for v in &d.volumes {
            let fs = v.filesystem.as_ref().map_or(String::new(), |f| {
                format!(
                    " {} {}{}",
                    f.fs_type,
                    f.uuid.as_deref().unwrap_or(""),
                    f.label
                        .as_ref()
                        .map_or(String::new(), |l| format!(" \"{l}\""))
                )
            });
            let content = match &v.content {
                Content::Data {
                    mode,
                    bytes_data,
                    bytes_stored_new,
                    ..
                } => format!(
                    "{mode}, {} data, {} stored new",
                    HumanBytes(*bytes_data),
                    HumanBytes(*bytes_stored_new)
                ),
                Content::Swap { .. } => "swap (recreated on restore)".into(),
            };
            out(&format!(
                "    {:<6} at {:>12}  {:>10}{fs}  [{content}]",
                v.name,
                v.offset,
                HumanBytes(v.size)
            ));
        }
    }
    for e in m.firmware.iter().flat_map(|f| &f.uefi_boot_entries) {
        out(&format!(
            "  UEFI boot entry Boot{:04X} \"{}\": {} p{} {}{}{}",
            e.number,
            e.description,
            e.disk,
            e.partition,
            e.path,
            if e.active { "" } else { " (inactive)" },
            if e.booted { " (booted)" } else { "" }
        ));
    }
}
