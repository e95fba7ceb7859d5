//! S3 targets for `bkimg replicate` and the read commands (`list`, `info`, `verify`,
//! `restore`, `export` on `s3://BUCKET/PREFIX`).

use anyhow::{bail, Result};
use bkimg_format::repo::Repository;

use crate::replicate::ReplicateArgs;

pub fn replicate(_args: &ReplicateArgs) -> Result<i32> {
    bail!("replication to S3 is being built")
}

pub fn open(_url: &str, _endpoint: Option<&str>) -> Result<Repository> {
    bail!("reading from S3 is being built")
}
