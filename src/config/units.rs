//! Durations ("500ms", "10s", "1m30s") and sizes ("4KiB") as written in resource files.
//!
//! Durations are parsed here rather than with a crate because the grammar is tiny and the
//! output of [`format_duration`] must read back through [`parse_duration`] unchanged.

use std::time::Duration;

const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// Parses one or more `<integer><unit>` groups (units h, m, s, ms), e.g. "10s", "1m30s".
/// Only whole milliseconds can be written; the timers this configures need no finer grain.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total_ms: u64 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let (_, ms_per_unit) = UNITS.iter().find(|(name, _)| *name == unit)?;
        total_ms = total_ms.checked_add(number.checked_mul(*ms_per_unit)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

/// The shortest form in the largest unit that divides the duration exactly: "10s", "500ms", "2m";
/// zero is "0s".
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    for (unit, ms_per_unit) in UNITS {
        let per = u128::from(ms_per_unit);
        if ms != 0 && ms % per == 0 {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Parses "4KiB", "1M", "65536" into bytes; K/M/G are binary multiples here, like DRBD's units.
pub fn parse_size(text: &str) -> Option<u64> {
    parse_size::Config::new().with_binary().parse_size(text).ok()
}

/// "4KiB", "1MiB", or a plain byte count when no binary unit divides it.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in
            ["", "10", "s", "5 parsecs", "10 s", " 10s", "1.5s", "-1s", "10sec", "99999999999999999999h"]
        {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn duration_round_trip() {
        for (d, text) in
            [(10_000, "10s"), (500, "500ms"), (120_000, "2m"), (90_000, "90s"), (7_200_000, "2h")]
        {
            let d = Duration::from_millis(d);
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Some(d));
        }
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(parse_duration("0ms"), Some(Duration::ZERO));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(format_size(4096), "4KiB");
        assert_eq!(format_size(1 << 20), "1MiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(1 << 40), "1TiB");
        assert_eq!(parse_size("1TiB"), Some(1 << 40));
        assert_eq!(parse_size("250KiB"), Some(250 << 10));
    }
}
