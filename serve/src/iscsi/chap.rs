//! CHAP (RFC 1994, as iSCSI uses it: RFC 7143 §12.1.3) with MD5, one-way or mutual.
//!
//! **Credentials file** (`--iscsi-chap FILE`): one entry a line, `#` starts a comment:
//! ```text
//! # initiators answer the target's challenge with one of these names and its secret
//! initiator NAME SECRET
//! # mutual CHAP: the target answers an initiator's challenge with this name and secret
//! target NAME SECRET
//! ```
//! Secrets are at least 12 bytes (96 bits, RFC 7143 §12.1.3); a secret given as `0x...` is
//! hexadecimal bytes. With a file, every login (discovery sessions too) must use CHAP.

use md5::{Digest, Md5};
use std::path::Path;

/// CHAP credentials.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChapConfig {
    /// Names and secrets initiators may authenticate with.
    pub initiators: Vec<(String, Vec<u8>)>,
    /// The target's name and secret for mutual CHAP.
    pub target: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for ChapConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapConfig")
            .field(
                "initiators",
                &self.initiators.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("target", &self.target.as_ref().map(|(n, _)| n))
            .finish()
    }
}

/// The shortest secret accepted.
pub const MIN_SECRET: usize = 12;

impl ChapConfig {
    /// Parses a credentials file's text (see the module documentation).
    pub fn parse(text: &str) -> Result<ChapConfig, String> {
        let mut c = ChapConfig::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let [kind, name, secret] = f[..] else {
                return Err(format!(
                    "line {}: expected 'initiator NAME SECRET' or 'target NAME SECRET'",
                    i + 1
                ));
            };
            let secret = match secret.strip_prefix("0x") {
                Some(h) => decode_hex(h).ok_or_else(|| format!("line {}: bad hex", i + 1))?,
                None => secret.as_bytes().to_vec(),
            };
            if secret.len() < MIN_SECRET {
                return Err(format!(
                    "line {}: the secret is shorter than {MIN_SECRET} bytes",
                    i + 1
                ));
            }
            match kind {
                "initiator" => c.initiators.push((name.to_string(), secret)),
                "target" if c.target.is_none() => c.target = Some((name.to_string(), secret)),
                "target" => return Err(format!("line {}: a second target entry", i + 1)),
                _ => return Err(format!("line {}: unknown entry '{kind}'", i + 1)),
            }
        }
        if c.initiators.is_empty() {
            return Err("no 'initiator NAME SECRET' entry".into());
        }
        if let Some((_, ts)) = &c.target {
            if c.initiators.iter().any(|(_, s)| s == ts) {
                return Err("the target secret must differ from every initiator secret".into());
            }
        }
        Ok(c)
    }

    /// Reads a credentials file.
    pub fn load(path: &Path) -> Result<ChapConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The secret of initiator name `name`.
    pub fn secret_of(&self, name: &str) -> Option<&[u8]> {
        self.initiators
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_slice())
    }
}

/// The CHAP response: MD5 over the identifier, the secret and the challenge.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

fn decode_hex(h: &str) -> Option<Vec<u8>> {
    if h.is_empty() || h.len() % 2 != 0 {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=');
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Decodes a binary value (RFC 7143 §6.1: `0x` hexadecimal or `0b` base64).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        decode_hex(h)
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        decode_base64(b)
    } else {
        None
    }
}

/// Encodes bytes as `0x` hexadecimal.
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + b.len() * 2);
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Random bytes for challenges and identifiers.
pub fn random(n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc1321_vectors() {
        // MD5("abc") = 900150983cd24fb0d6963f7d28e17f72: id 'a', secret 'b', challenge 'c'.
        assert_eq!(
            encode_hex(&response(b'a', b"b", b"c")),
            "0x900150983cd24fb0d6963f7d28e17f72"
        );
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0bAAEC"), Some(vec![0, 1, 2]));
        assert_eq!(decode_binary("0x0"), None);
        assert_eq!(decode_binary("12"), None);
    }

    #[test]
    fn credentials_file() {
        let c = ChapConfig::parse(
            "# comment\ninitiator iqn.a secretsecret12\ntarget tgt 0x00112233445566778899aabb\n",
        )
        .unwrap();
        assert_eq!(c.secret_of("iqn.a"), Some(&b"secretsecret12"[..]));
        assert_eq!(c.target.as_ref().unwrap().1.len(), 12);
        assert!(ChapConfig::parse("initiator a short\n").is_err());
        assert!(ChapConfig::parse("target t secretsecret12\n").is_err());
        assert!(
            ChapConfig::parse("initiator a secretsecret12\ntarget t secretsecret12\n").is_err()
        );
    }
}
