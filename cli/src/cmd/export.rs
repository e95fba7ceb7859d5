//! `bkimg export`: one restore point and all it needs in a single file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bkimg_format::repo::{Point, Repository, StoredForm};
use bkimg_format::store::{ExportFile, LocalDir, StoreRead};
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
    unlock.refuse_unauthenticated("export")?;
    let location = repo.path();
    let repo = open_repository(location, &standby, &unlock, 1, config)?;
    let point = repo.resolve(&id)?;
    // A protected restore point is exported as stored (sealed), with what opens it.
    let stored = if repo.protection() == bkimg_format::keys::Mode::None {
        None
    } else {
        Some(stored_objects(location, config)?)
    };
    let form = stored.as_ref().map(|(raw, config, slots)| StoredForm {
        raw: raw.as_ref(),
        config,
        slots,
    });
    export(&repo, &point, form, &output, common.quiet || common.json)?;
    if common.json {
        out_json(&json!({ "id": point.manifest.id, "output": output }));
    } else {
        eprintln!("exported {} to {}", point.manifest.id, output.display());
    }
    Ok(exit::OK)
}

/// A protected repository's store as it holds its objects, its config and its key slots.
type Stored = (Box<dyn StoreRead>, Vec<u8>, Vec<(String, Vec<u8>)>);

fn stored_objects(location: &Path, config: &Config) -> Result<Stored> {
    match location.to_str() {
        Some(url) if url.starts_with("s3://") => {
            let store = bkimg_replicate::s3::S3Store::open(
                url,
                &crate::prune::s3_settings(None, &config.s3),
            )?;
            let bytes = store
                .read_config()
                .map_err(|f| f.into_anyhow("the repository config"))?
                .context("the bucket's repository config went away")?;
            let slots = store.key_slots()?;
            Ok((Box::new(store), bytes, slots))
        }
        _ if location.is_dir() => {
            let (store, _) = LocalDir::open_any(location)?;
            let path = location.join("config");
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let slots = store.key_slots()?;
            Ok((Box::new(store), bytes, slots))
        }
        _ => {
            let file = ExportFile::open(location)?;
            let (bytes, slots) = (file.config_bytes()?, file.key_slots()?);
            Ok((Box::new(file), bytes, slots))
        }
    }
}

fn export(
    repo: &Repository,
    point: &Point,
    stored: Option<StoredForm<'_>>,
    output: &Path,
    quiet: bool,
) -> Result<()> {
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
        repo.export(point, stored, &mut w, &mut |n| {
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
