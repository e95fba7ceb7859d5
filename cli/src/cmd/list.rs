//! `bkimg list`: the restore points of a repository.

use anyhow::Result;
use clap::Args;
use indicatif::HumanBytes;

use super::info::{authenticated, point_summary, protection_name};
use crate::config::{Config, RepoArgs};
use crate::{exit, open_repository, out, out_json, Common};

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(flatten)]
    pub standby: crate::standby::StandbyArgs,
    #[command(flatten)]
    pub unlock: crate::cmd::key::Unlock,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: ListArgs, config: &Config) -> Result<i32> {
    let ListArgs {
        repo,
        standby,
        unlock,
        common,
    } = args;
    let repo = open_repository(repo.path(), &standby, &unlock, 1, config)?;
    let (points, bad) = repo.points()?;
    for (id, e) in &bad {
        eprintln!(
            "bkimg: warning: restore point {id} is unreadable: {}",
            e.full_message()
        );
    }
    // A parent that is not listed was pruned (or is missing: verify says which).
    let ids: std::collections::HashSet<&str> =
        points.iter().map(|p| p.manifest.id.as_str()).collect();
    let parent_gone = |m: &bkimg_format::manifest::Manifest| {
        m.parent
            .as_ref()
            .is_some_and(|l| !ids.contains(l.id.as_str()))
    };
    if common.json {
        let arr: Vec<_> = points
            .iter()
            .map(|p| {
                let mut v = point_summary(p);
                v["parent_pruned"] = serde_json::Value::Bool(parent_gone(&p.manifest));
                v["protection"] = protection_name(repo.protection()).into();
                v["authenticated"] = authenticated(repo.protection(), &unlock).into();
                v
            })
            .collect();
        out_json(&serde_json::Value::Array(arr));
    } else {
        out(&format!(
            "{:<24} {:<24} {:<22} {:>10}  DISKS",
            "ID", "PARENT", "CREATED", "SIZE"
        ));
        for p in &points {
            let m = &p.manifest;
            out(&format!(
                "{:<24} {:<24} {:<22} {:>10}  {}{}",
                m.id,
                match &m.parent {
                    None => "-".to_string(),
                    Some(l) if parent_gone(m) => format!("{} (pruned)", l.id),
                    Some(l) => l.id.clone(),
                },
                m.created,
                HumanBytes(m.disks.iter().map(|d| d.size).sum()),
                m.disks
                    .iter()
                    .map(|d| d.source.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                if m.consistency.as_deref() == Some("inconsistent") {
                    "  (taken in use: may be inconsistent)"
                } else {
                    ""
                }
            ));
        }
    }
    Ok(if bad.is_empty() {
        exit::OK
    } else {
        exit::DAMAGED
    })
}
