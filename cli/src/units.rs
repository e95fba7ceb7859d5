//! Sizes and durations as people type them on the command line and in the config file.
//!
//! Durations are humantime's (`250ms`, `5m`, `1h 30m`, `7d`, `4w`); a bare number is
//! seconds, as bkimg always took it. Sizes are bytesize's (`4096`, `512MiB`, `1.5G`) with
//! one difference kept from earlier bkimg: `K`, `M`, `G`, `T` (and `KB`, `MB`...) are
//! powers of 1024, as `KiB`, `MiB`..., so that `--store-size 1G` still means what it did.

use std::time::Duration;

/// Longer than any interval or age that makes sense; bounding here keeps every later
/// `Instant + Duration` and seconds-to-i64 conversion far from overflowing.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Larger than any file or device can be (offsets are signed 64-bit): bounding here keeps
/// later rounding and sector arithmetic from overflowing.
const MAX_SIZE: u64 = i64::MAX as u64;

/// A duration of at least one nanosecond.
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = duration_or_zero(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: the duration must be longer than zero"));
    }
    Ok(d)
}

/// A duration; `0` (or `0s`) allowed.
pub fn duration_or_zero(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>().map(Duration::from_secs).map_err(|_| {
            format!("{s:?} is too long a duration: give at most 100 years (e.g. 36500d)")
        })?
    } else {
        humantime::parse_duration(t).map_err(|e| {
            format!("{s:?} is not a duration ({e}): give e.g. 250ms, 30s, 5m, 1h 30m, 7d or 4w")
        })?
    };
    if d > MAX_DURATION {
        return Err(format!(
            "{s:?} is too long a duration: give at most 100 years (e.g. 36500d)"
        ));
    }
    Ok(d)
}

/// A size in bytes, at least one byte.
pub fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let unit = unit.trim_start();
    // bkimg's units were binary before bytesize parsed them: K is KiB, KB is KiB too.
    let binary = match unit.to_ascii_uppercase().as_str() {
        "K" | "KB" => "KiB",
        "M" | "MB" => "MiB",
        "G" | "GB" => "GiB",
        "T" | "TB" => "TiB",
        "P" | "PB" => "PiB",
        "E" | "EB" => "EiB",
        _ => unit,
    };
    let bad = || format!("{s:?} is not a size: give bytes, or e.g. 64K, 512MiB, 1G or 1.5TiB");
    if number.is_empty() {
        return Err(bad());
    }
    let bytes = format!("{number}{binary}")
        .parse::<bytesize::ByteSize>()
        .map_err(|_| bad())?
        .as_u64();
    // bytesize saturates what does not fit in 64 bits: anything at the bound is too big.
    if bytes > MAX_SIZE {
        return Err(format!(
            "{s:?} is too large: no file or disk is larger than 8 EiB"
        ));
    }
    if bytes == 0 {
        return Err(format!("{s:?}: the size must be at least one byte"));
    }
    Ok(bytes)
}

/// A size that must fit in 32 bits (block sizes).
pub fn size_u32(s: &str) -> Result<u32, String> {
    let n = size(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?} is too large here: give at most 4G"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("4096").unwrap(), 4096);
        assert_eq!(size("512M").unwrap(), 512 << 20);
        assert_eq!(size("512MiB").unwrap(), 512 << 20);
        assert_eq!(size("2G").unwrap(), 2 << 30);
        assert_eq!(size("2g").unwrap(), 2 << 30);
        assert_eq!(size("1GiB").unwrap(), 1 << 30);
        assert_eq!(size("1 GiB").unwrap(), 1 << 30);
        assert_eq!(size("64KB").unwrap(), 64 << 10);
        assert_eq!(size("1T").unwrap(), 1 << 40);
        assert_eq!(size("10B").unwrap(), 10);
        assert_eq!(size("1.5G").unwrap(), 3 << 29);
        assert!(size("8EiB").unwrap_err().contains("too large"));
        for bad in [
            "",
            "G",
            "0",
            "0M",
            "1X",
            "-1G",
            "1..5G",
            "99999999999T",
            "18446744073709551615",
            "20E",
        ] {
            assert!(size(bad).is_err(), "{bad:?}");
        }
        assert!(size("99999999999T").unwrap_err().contains("too large"));
        assert_eq!(size_u32("64K").unwrap(), 65536);
        assert!(size_u32("4G").is_err());
    }

    #[test]
    fn durations() {
        let secs = Duration::from_secs;
        assert_eq!(duration("30").unwrap(), secs(30));
        assert_eq!(duration("5s").unwrap(), secs(5));
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("2m").unwrap(), secs(120));
        assert_eq!(duration("1h").unwrap(), secs(3600));
        assert_eq!(duration("1h 30m").unwrap(), secs(5400));
        assert_eq!(duration("1h30m").unwrap(), secs(5400));
        assert_eq!(duration("36h").unwrap(), secs(36 * 3600));
        assert_eq!(duration("7d").unwrap(), secs(7 * 86_400));
        assert_eq!(duration("4w").unwrap(), secs(28 * 86_400));
        assert_eq!(duration_or_zero("0").unwrap(), Duration::ZERO);
        assert_eq!(duration_or_zero("0s").unwrap(), Duration::ZERO);
        for bad in [
            "",
            "0",
            "0s",
            "5x",
            "-5s",
            "h",
            "101y",
            "99999999999999999999",
            "99999999999999999999d",
        ] {
            assert!(duration(bad).is_err(), "{bad:?}");
        }
        assert!(duration("101y").unwrap_err().contains("too long"));
    }
}
