//! A hex dump in the format of `xxd`.

use std::io::Write;

/// Writes `data` as `xxd` does (16 bytes a line, two-byte groups, ASCII column), numbering
/// lines from `base`.
pub fn hexdump(out: &mut impl Write, base: u64, data: &[u8]) -> std::io::Result<()> {
    for (i, line) in data.chunks(16).enumerate() {
        let mut hex = String::with_capacity(40);
        for (j, b) in line.iter().enumerate() {
            if j > 0 && j % 2 == 0 {
                hex.push(' ');
            }
            hex.push_str(&format!("{b:02x}"));
        }
        let ascii: String = line
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        writeln!(out, "{:08x}: {hex:<39}  {ascii}", base + (i as u64) * 16)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_xxd() {
        let mut out = Vec::new();
        super::hexdump(&mut out, 0x10, b"Hello, vstor!\x00\x01\xffAB").unwrap();
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "00000010: 4865 6c6c 6f2c 2076 7374 6f72 2100 01ff  Hello, vstor!...\n\
             00000020: 4142                                     AB\n"
        );
    }
}
