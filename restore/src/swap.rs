//! Recreating swap space: a version-1 swap header with the recorded UUID and label.

use anyhow::{bail, Context, Result};

/// The first page of a swap area of `size` bytes with pages of `page_size` bytes (the
/// page size of the machine that made it: 4 KiB on x86, up to 64 KiB elsewhere).
pub fn header(
    size: u64,
    page_size: u32,
    uuid: Option<&str>,
    label: Option<&str>,
) -> Result<Vec<u8>> {
    if !(4096..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        bail!("swap page size {page_size} is not supported");
    }
    let pages = size / u64::from(page_size);
    if pages < 10 {
        bail!("a {size}-byte swap area is too small for a swap header");
    }
    let ps = page_size as usize;
    let mut page = vec![0u8; ps];
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    let last = u32::try_from(pages - 1).unwrap_or(u32::MAX);
    page[1028..1032].copy_from_slice(&last.to_le_bytes());
    if let Some(u) = uuid {
        let u = uuid::Uuid::parse_str(u).with_context(|| format!("bad swap UUID {u:?}"))?;
        page[1036..1052].copy_from_slice(u.as_bytes());
    }
    if let Some(l) = label {
        // At most 16 bytes, cut at a character boundary.
        let mut end = l.len().min(16);
        while !l.is_char_boundary(end) {
            end -= 1;
        }
        page[1052..1052 + end].copy_from_slice(&l.as_bytes()[..end]);
    }
    page[ps - 10..].copy_from_slice(b"SWAPSPACE2");
    Ok(page)
}
