//! Sizes with binary suffixes, as qemu-img writes them: `512`, `4k`, `1M`, `10G`, `2T`.

use crate::Error;

/// Parses a byte count with an optional binary suffix (`k`, `M`, `G`, `T`, `P`, `E`; any case;
/// an optional trailing `B` or `iB`). Fractions are allowed when they give whole bytes
/// (`1.5G`). Errors name the input and what is wrong with it.
pub fn parse_size(input: &str) -> Result<u64, Error> {
    let err = |reason: &str| Error::Size {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return Err(err("expected a number, like 4k, 1M or 10G"));
    }
    let suffix_norm = suffix
        .strip_suffix("iB")
        .or_else(|| suffix.strip_suffix("ib"))
        .or_else(|| {
            suffix
                .strip_suffix(['B', 'b'])
                .filter(|r| !r.is_empty() || suffix.len() == 1)
        })
        .unwrap_or(suffix);
    let shift = match suffix_norm {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => {
            return Err(err(&format!(
                "unknown suffix '{suffix}' (use k, M, G, T, P or E)"
            )))
        }
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(err("not a number"));
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| err("too large or not a number"))?
    };
    if int > u128::from(u64::MAX) {
        return Err(err("too large"));
    }
    // int < 2^64 and shift <= 60: no overflow in u128.
    let mut value = int << shift;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(err("too many decimals"));
        }
        let f: u128 = frac.parse().map_err(|_| err("not a number"))?;
        let denom = 10u128.pow(frac.len() as u32);
        let scaled = f << shift;
        if scaled % denom != 0 {
            return Err(err("the fraction does not give a whole number of bytes"));
        }
        value += scaled / denom;
    }
    u64::try_from(value).map_err(|_| err("too large"))
}

/// Formats a byte count for humans: `1 GiB`, `1.5 MiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if (v - v.round()).abs() < 0.005 {
        format!("{} {unit}", v.round() as u64)
    } else {
        format!("{v:.2} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4kB").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5k").unwrap(), 512);
        assert_eq!(parse_size("100B").unwrap(), 100);
    }

    #[test]
    fn bad_input_is_named() {
        for bad in [
            "12Q",
            "",
            "k",
            "1..5M",
            "abc",
            "1.0001k",
            "16E",
            "99999999999999999999",
            "-1",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
        assert!(parse_size("12Q")
            .unwrap_err()
            .to_string()
            .contains("unknown suffix 'Q'"));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(input in ".{0,24}") {
            let _ = parse_size(&input);
        }

        #[test]
        fn suffixes_scale(v in 0u64..1 << 20, i in 0usize..5) {
            let (suffix, shift) = [("", 0), ("k", 10), ("M", 20), ("G", 30), ("T", 40)][i];
            proptest::prop_assert_eq!(parse_size(&format!("{v}{suffix}")).unwrap(), v << shift);
        }
    }
}
