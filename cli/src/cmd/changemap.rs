//! `bkimg changemap`: a change map file from explicit ranges.

use std::path::PathBuf;

use anyhow::{Context, Result};
use bkimg_format::changemap::ChangeMap;
use clap::Args;
use serde_json::json;

use crate::config::Config;
use crate::{exit, out_json, units, Common};

#[derive(Args)]
pub struct ChangemapArgs {
    /// File to write.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Size of the device (bytes, or e.g. 10G).
    #[arg(long, value_name = "SIZE", value_parser = units::size)]
    pub device_size: u64,
    /// Tracking block size.
    #[arg(long, value_name = "SIZE", value_parser = units::size_u32, default_value = "64K")]
    pub block_size: u32,
    /// Tracking generation, 32 hex digits.
    #[arg(long, default_value = "00000000000000000000000000000000")]
    pub generation: String,
    #[arg(long, default_value_t = 0)]
    pub from_sequence: u64,
    #[arg(long, default_value_t = 0)]
    pub to_sequence: u64,
    /// Changed byte ranges, "START+LENGTH" (rounded out to whole blocks).
    pub ranges: Vec<String>,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: ChangemapArgs, _config: &Config) -> Result<i32> {
    let ChangemapArgs {
        output,
        device_size,
        block_size,
        generation,
        from_sequence,
        to_sequence,
        ranges,
        common,
    } = args;
    let mut gen = [0u8; 16];
    bkimg_format::digest::decode_hex_into(&generation, &mut gen)
        .context("--generation must be 32 hex digits")?;
    let bs = u64::from(block_size);
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    for r in &ranges {
        let (s, l) = r
            .split_once('+')
            .and_then(|(s, l)| Some((s.parse::<u64>().ok()?, l.parse::<u64>().ok()?)))
            .with_context(|| format!("range {r:?} is not START+LENGTH in bytes"))?;
        if l == 0 {
            continue;
        }
        let end = s
            .checked_add(l)
            .with_context(|| format!("range {r:?} ends past 2^64 bytes"))?;
        blocks.push((s / bs, end.div_ceil(bs)));
    }
    blocks.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in blocks {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let map = ChangeMap {
        block_size,
        device_size,
        generation: gen,
        from_sequence,
        to_sequence,
        ranges: merged.into_iter().map(|(s, e)| (s, e - s)).collect(),
    };
    map.validate()?;
    std::fs::write(&output, map.encode())
        .with_context(|| format!("writing {}", output.display()))?;
    if common.json {
        out_json(&json!({
            "output": output,
            "generation": generation.to_ascii_lowercase(),
            "from_sequence": map.from_sequence,
            "to_sequence": map.to_sequence,
            "block_size": map.block_size,
            "device_size": map.device_size,
            "ranges": map.ranges.len(),
            "bytes_changed": map.ranges.iter().map(|(_, n)| n * bs).sum::<u64>(),
        }));
    }
    Ok(exit::OK)
}
