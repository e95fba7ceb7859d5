//! Recreating swap space: a version-1 swap header with the recorded UUID and label.

use anyhow::{bail, Context, Result};

pub const PAGE: u64 = 4096;

/// The first page of a swap area of `size` bytes.
pub fn header(size: u64, uuid: Option<&str>, label: Option<&str>) -> Result<Vec<u8>> {
    let pages = size / PAGE;
    if pages < 10 {
        bail!("a {size}-byte swap area is too small for a swap header");
    }
    let mut page = vec![0u8; PAGE as usize];
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    let last = u32::try_from(pages - 1).unwrap_or(u32::MAX);
    page[1028..1032].copy_from_slice(&last.to_le_bytes());
    if let Some(u) = uuid {
        let u = uuid::Uuid::parse_str(u).with_context(|| format!("bad swap UUID {u:?}"))?;
        page[1036..1052].copy_from_slice(u.as_bytes());
    }
    if let Some(l) = label {
        let b = l.as_bytes();
        page[1052..1052 + b.len().min(16)].copy_from_slice(&b[..b.len().min(16)]);
    }
    page[4086..4096].copy_from_slice(b"SWAPSPACE2");
    Ok(page)
}
