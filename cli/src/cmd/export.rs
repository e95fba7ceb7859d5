//! `bkimg export`: one restore point and all it needs in a single file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bkimg_format::repo::{Point, Repository};
use clap::Args;
use serde_json::json;

use crate::config::{Config, RepoArgs};
use crate::progress::Bar;
use crate::{exit, open_repository, out_json, Common};

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(default_value = "latest")]
    pub id: String,
    /// The file to write (must not exist).
    #[arg(long, short)]
    pub output: PathBuf,
    #[command(flatten)]
    pub standby: crate::standby::StandbyArgs,
    #[command(flatten)]
    pub unlock: crate::cmd::key::Unlock,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: ExportArgs, config: &Config) -> Result<i32> {
    let ExportArgs {
        repo,
        id,
        output,
        standby,
        unlock,
        common,
    } = args;
    let repo = open_repository(repo.path(), &standby, &unlock, 1, config)?;
    if repo.protection() != bkimg_format::keys::Mode::None {
        // An export file has no place for a key yet: it would carry the disk in plaintext.
        return Err(bkimg_format::FormatError::unavailable(
            format!("repository {}", repo.location()),
            "encryption: an export file cannot carry an encrypted or signed restore point \
             yet (it would be written unprotected); replicate it to S3 instead, which keeps \
             it sealed",
        )
        .into());
    }
    let point = repo.resolve(&id)?;
    export(&repo, &point, &output, common.quiet || common.json)?;
    if common.json {
        out_json(&json!({ "id": point.manifest.id, "output": output }));
    } else {
        eprintln!("exported {} to {}", point.manifest.id, output.display());
    }
    Ok(exit::OK)
}

fn export(repo: &Repository, point: &Point, output: &Path, quiet: bool) -> Result<()> {
    if output.exists() {
        bail!(
            "{} already exists: choose another --output",
            output.display()
        );
    }
    // Written under a hidden name beside the output and renamed when complete, so a
    // killed export never leaves a file that looks finished.
    let name = output
        .file_name()
        .context("--output must name a file")?
        .to_string_lossy();
    let tmp = output.with_file_name(format!(".{name}.bkimg-partial"));
    crate::interrupt::remove_on_signal(&tmp);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let bar = Bar::new(quiet);
    bkimg_format::progress::Progress::begin(&bar, "export", 0);
    let result = (|| -> Result<()> {
        // Tests stop an export here, its partial file made, to signal it.
        bkimg_format::testhook::pause("export-writing");
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        repo.export(point, &mut w, &mut |n| {
            bkimg_format::progress::Progress::advance(&bar, n)
        })?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        Ok(())
    })();
    bar.finish();
    crate::interrupt::finish_partial(&tmp, || match result {
        Ok(()) => Ok(std::fs::rename(&tmp, output)?),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    })
}
