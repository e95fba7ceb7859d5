//! Times as manifests and journals carry them: RFC 3339 in UTC, read and written with the
//! `time` crate. One ordering of restore points for every listing and policy:
//! [`point_order`].

use std::cmp::Ordering;

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// An RFC 3339 time ("2026-11-21T12:00:05.5Z", offsets allowed), in UTC; `None` for text
/// that is not one, impossible dates (February 30th) included.
pub fn parse(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(|t| t.to_offset(UtcOffset::UTC))
}

/// Seconds since 1970 of an RFC 3339 time.
pub fn epoch_seconds(text: &str) -> Option<i64> {
    parse(text).map(OffsetDateTime::unix_timestamp)
}

/// The order of restore points (oldest first): by the instant they were captured, to the
/// nanosecond (several points can share a second), then by id so that ties and
/// unreadable times (first) fall the same way every time.
pub fn point_order(a_created: &str, a_id: &str, b_created: &str, b_id: &str) -> Ordering {
    (parse(a_created), a_id).cmp(&(parse(b_created), b_id))
}

/// A time as RFC 3339 UTC ("2026-11-21T12:00:05Z", with a fraction when it has one).
pub fn format(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .expect("a UTC time within years 0-9999 formats as RFC 3339")
}

/// Now as RFC 3339 UTC, to the second.
pub fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    format(now.replace_nanosecond(0).unwrap_or(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(epoch_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(epoch_seconds("2026-11-21T12:00:05.5Z"), Some(1_795_262_405));
        assert_eq!(
            epoch_seconds("2026-11-21T13:00:05+01:00"),
            epoch_seconds("2026-11-21T12:00:05Z")
        );
        assert_eq!(epoch_seconds("2026-11-21"), None);
        assert_eq!(epoch_seconds("2026-13-21T12:00:05Z"), None);
        assert_eq!(epoch_seconds("2026-02-30T12:00:05Z"), None, "no such day");
        assert_eq!(epoch_seconds("2026-11-21T24:00:05Z"), None);
    }

    #[test]
    fn points_order_by_instant_then_id() {
        let o = |a: &str, b: &str| point_order(a, "x", b, "x");
        assert_eq!(
            o("2026-11-21T12:00:05Z", "2026-11-21T12:00:05.5Z"),
            Ordering::Less
        );
        assert_eq!(
            o("2026-11-21T12:00:05.5Z", "2026-11-21T12:00:06Z"),
            Ordering::Less
        );
        // The same instant written two ways.
        assert_eq!(
            o("2026-11-21T13:00:05+01:00", "2026-11-21T12:00:05Z"),
            Ordering::Equal
        );
        assert_eq!(
            point_order("2026-11-21T12:00:05Z", "a", "2026-11-21T12:00:05Z", "b"),
            Ordering::Less
        );
        assert_eq!(o("garbage", "1970-01-01T00:00:00Z"), Ordering::Less);
    }

    #[test]
    fn formatting() {
        assert_eq!(format(OffsetDateTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = parse("2026-11-18T12:06:40+01:00").unwrap();
        assert_eq!(format(t), "2026-11-18T11:06:40Z");
        let now = now_rfc3339();
        assert!(now.ends_with('Z') && !now.contains('.'), "{now}");
        assert!(parse(&now).is_some());
    }
}
