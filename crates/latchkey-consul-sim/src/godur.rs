//! Go's `time.ParseDuration`, because Consul parses `wait`, `TTL` and
//! `LockDelay` with it (so `"1m30s"`, `"1.5s"`, `"250ms"` and `"0"` are all
//! valid, and a bare number other than `0` is not).

/// Parses a Go duration string into nanoseconds (may be negative).
/// The error text is Go's: `time: invalid duration "x"`.
pub(crate) fn parse(s: &str) -> Result<i128, String> {
    let orig = s;
    let invalid = || format!("time: invalid duration {}", go_quote(orig));
    let mut s = s;
    let mut neg = false;
    if let Some(rest) = s.strip_prefix('-') {
        neg = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: i128 = 0;
    while !s.is_empty() {
        // The number: digits, optionally `.digits`.
        let int_len = s.bytes().take_while(|b| b.is_ascii_digit()).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = s
            .bytes()
            .take_while(|b| *b != b'.' && !b.is_ascii_digit())
            .count();
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("time: missing unit in duration {}", go_quote(orig))),
            _ => {
                return Err(format!(
                    "time: unknown unit {} in duration {}",
                    go_quote(unit),
                    go_quote(orig)
                ))
            }
        };
        let int: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut value = int.checked_mul(scale).ok_or_else(invalid)?;
        if !frac_part.is_empty() {
            let digits = &frac_part[..frac_part.len().min(30)];
            let num: i128 = digits.parse().map_err(|_| invalid())?;
            let den = 10i128.pow(digits.len() as u32);
            value += num * scale / den;
        }
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > i64::MAX as i128 {
            return Err(invalid());
        }
    }
    Ok(if neg { -total } else { total })
}

/// Go's `%q` for the plain strings we quote (enough for error messages).
pub(crate) fn go_quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// Go's `time.Duration.String()` for whole-second and sub-second values,
/// used in session JSON (`TTL` is echoed as given) and messages.
pub(crate) fn format_nanos(ns: u128) -> String {
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000_000_000 {
        if ns.is_multiple_of(1_000_000) {
            return format!("{}ms", ns / 1_000_000);
        }
        if ns.is_multiple_of(1_000) {
            return format!("{}\u{b5}s", ns / 1_000);
        }
        return format!("{ns}ns");
    }
    let total_s = ns / 1_000_000_000;
    let frac = ns % 1_000_000_000;
    let h = total_s / 3600;
    let m = (total_s % 3600) / 60;
    let s = total_s % 60;
    let mut secs = format!("{s}");
    if frac != 0 {
        let f = format!("{frac:09}");
        secs.push('.');
        secs.push_str(f.trim_end_matches('0'));
    }
    if h > 0 {
        format!("{h}h{m}m{secs}s")
    } else if m > 0 {
        format!("{m}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("15s"), Ok(15_000_000_000));
        assert_eq!(parse("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse("250ms"), Ok(250_000_000));
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("-1s"), Ok(-1_000_000_000));
        assert_eq!(parse(".5h"), Ok(1_800_000_000_000));
        assert!(parse("").is_err());
        assert!(parse("5").unwrap_err().contains("missing unit"));
        assert!(parse("5x").unwrap_err().contains("unknown unit"));
        assert!(parse("s").is_err());
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_nanos(10_000_000_000), "10s");
        assert_eq!(format_nanos(86_400_000_000_000), "24h0m0s");
        assert_eq!(format_nanos(90_000_000_000), "1m30s");
        assert_eq!(format_nanos(1_500_000_000), "1.5s");
        assert_eq!(format_nanos(250_000_000), "250ms");
    }
}
