//! Text keys (RFC 7143 §6): `key=value` pairs separated by NUL bytes, and the negotiation of
//! the operational keys this target supports.

/// The longest key name (RFC 7143 §6.1).
pub const MAX_KEY: usize = 63;
/// The longest value this target takes (CHAP responses are the longest: 1024 bytes in hex).
pub const MAX_VALUE: usize = 8192;

/// Parses a data segment of `key=value` pairs. A trailing NUL is optional; an empty segment
/// has no pairs. Errors name what is wrong (the caller answers with a protocol error).
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let body = data.strip_suffix(&[0]).unwrap_or(data);
    if body.is_empty() {
        return Ok(out);
    }
    for item in body.split(|b| *b == 0) {
        let s = std::str::from_utf8(item).map_err(|_| "a key or value is not UTF-8".to_string())?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("'{}' has no '='", s.escape_debug()))?;
        if k.is_empty()
            || k.len() > MAX_KEY
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b))
        {
            return Err(format!("invalid key '{}'", k.escape_debug()));
        }
        if v.len() > MAX_VALUE {
            return Err(format!("the value of {k} is too long"));
        }
        if out.iter().any(|(o, _)| o == k) {
            return Err(format!("key {k} given twice"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes pairs as a data segment.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The operational parameters of a connection and its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// CRC32C header digests.
    pub header_digest: bool,
    /// CRC32C data digests.
    pub data_digest: bool,
    /// The most data in one PDU this target sends (the initiator's declaration).
    pub send_max: u32,
    /// The most data in one PDU this target takes (its own declaration, once declared).
    pub recv_max: u32,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// ImmediateData.
    pub immediate_data: bool,
    /// InitialR2T.
    pub initial_r2t: bool,
}

impl Default for Params {
    /// The defaults of RFC 7143 §13.
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            send_max: 8192,
            recv_max: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
        }
    }
}

/// What this target offers or accepts at most.
pub const OUR_RECV_MAX: u32 = 262_144;
/// The largest burst this target accepts.
pub const OUR_MAX_BURST: u32 = 16_776_192;

fn number(v: &str, lo: u32, hi: u32) -> Option<u32> {
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u64>()
        .ok()
        .filter(|n| (u64::from(lo)..=u64::from(hi)).contains(n))
        .map(|n| n as u32)
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// The outcome of negotiating one key.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answer with this value.
    Value(String),
    /// No answer (a declaration the target only takes note of).
    None,
}

/// Negotiates one operational key offered by the initiator at login; `Err` means the key
/// cannot be handled during login (the caller fails the login with an initiator error).
/// Unknown keys are answered `NotUnderstood`, out-of-range values `Reject` (RFC 7143 §6.2).
pub fn negotiate(p: &mut Params, key: &str, v: &str, discovery: bool) -> Answer {
    let reject = || Answer::Value("Reject".into());
    let irrelevant = || Answer::Value("Irrelevant".into());
    match key {
        "HeaderDigest" | "DataDigest" => {
            // A list in order of preference: the first this target supports.
            let pick = v.split(',').find(|x| *x == "CRC32C" || *x == "None");
            match pick {
                Some(x) => {
                    let on = x == "CRC32C";
                    if key == "HeaderDigest" {
                        p.header_digest = on;
                    } else {
                        p.data_digest = on;
                    }
                    Answer::Value(x.to_string())
                }
                None => reject(),
            }
        }
        "MaxRecvDataSegmentLength" => match number(v, 512, 16_777_215) {
            Some(n) => {
                p.send_max = n;
                Answer::None
            }
            None => reject(),
        },
        "MaxConnections" => match number(v, 1, 65_535) {
            Some(_) => Answer::Value("1".into()),
            None => reject(),
        },
        "MaxBurstLength" if discovery => irrelevant(),
        "MaxBurstLength" => match number(v, 512, 16_777_215) {
            Some(n) => {
                p.max_burst = n.min(OUR_MAX_BURST);
                p.first_burst = p.first_burst.min(p.max_burst);
                Answer::Value(p.max_burst.to_string())
            }
            None => reject(),
        },
        "FirstBurstLength" if discovery => irrelevant(),
        "FirstBurstLength" => match number(v, 512, 16_777_215) {
            Some(n) => {
                p.first_burst = n.min(p.max_burst);
                Answer::Value(p.first_burst.to_string())
            }
            None => reject(),
        },
        "ImmediateData" if discovery => irrelevant(),
        "ImmediateData" => match yes_no(v) {
            // AND: this target takes immediate data.
            Some(b) => {
                p.immediate_data = b;
                Answer::Value(yn(b))
            }
            None => reject(),
        },
        "InitialR2T" if discovery => irrelevant(),
        "InitialR2T" => match yes_no(v) {
            // OR: this target takes unsolicited data when the initiator wants to send it.
            Some(b) => {
                p.initial_r2t = b;
                Answer::Value(yn(b))
            }
            None => reject(),
        },
        "MaxOutstandingR2T" if discovery => irrelevant(),
        "MaxOutstandingR2T" => match number(v, 1, 65_535) {
            Some(_) => Answer::Value("1".into()),
            None => reject(),
        },
        "DataPDUInOrder" | "DataSequenceInOrder" => match yes_no(v) {
            // OR: this target asks for both in order.
            Some(_) => Answer::Value("Yes".into()),
            None => reject(),
        },
        "ErrorRecoveryLevel" => match number(v, 0, 2) {
            Some(_) => Answer::Value("0".into()),
            None => reject(),
        },
        "DefaultTime2Wait" => match number(v, 0, 3600) {
            Some(n) => Answer::Value(n.max(2).to_string()),
            None => reject(),
        },
        "DefaultTime2Retain" => match number(v, 0, 3600) {
            // At error recovery level 0 nothing is retained.
            Some(_) => Answer::Value("0".into()),
            None => reject(),
        },
        "IFMarker" | "OFMarker" => match yes_no(v) {
            Some(_) => Answer::Value("No".into()),
            None => reject(),
        },
        "IFMarkInt" | "OFMarkInt" => irrelevant(),
        "iSCSIProtocolLevel" => match number(v, 0, 31) {
            Some(n) => Answer::Value(n.min(1).to_string()),
            None => reject(),
        },
        // Declarations the target only notes.
        "InitiatorAlias" | "InitiatorName" | "TargetName" | "SessionType" => Answer::None,
        "TaskReporting" => Answer::Value("RFC3720".into()),
        _ => Answer::Value("NotUnderstood".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_encode() {
        let v = parse(b"A=1\0B=x=y\0").unwrap();
        assert_eq!(v[1], ("B".to_string(), "x=y".to_string()));
        assert_eq!(encode(&v), b"A=1\0B=x=y\0");
        assert!(parse(b"A=1\0A=2\0").is_err());
        assert!(parse(b"noequals\0").is_err());
        assert!(parse(b"=v\0").is_err());
        assert!(parse(b"").unwrap().is_empty());
    }

    #[test]
    fn negotiation_picks_the_rfc_results() {
        let mut p = Params::default();
        assert_eq!(
            negotiate(&mut p, "HeaderDigest", "CRC32C,None", false),
            Answer::Value("CRC32C".into())
        );
        assert!(p.header_digest);
        assert_eq!(
            negotiate(&mut p, "MaxBurstLength", "1048576", false),
            Answer::Value("1048576".into())
        );
        assert_eq!(
            negotiate(&mut p, "FirstBurstLength", "4194304", false),
            Answer::Value("1048576".into())
        );
        assert_eq!(
            negotiate(&mut p, "MaxBurstLength", "100", false),
            Answer::Value("Reject".into())
        );
        assert_eq!(
            negotiate(&mut p, "MaxRecvDataSegmentLength", "65536", false),
            Answer::None
        );
        assert_eq!(p.send_max, 65536);
        assert_eq!(
            negotiate(&mut p, "X-foo", "1", false),
            Answer::Value("NotUnderstood".into())
        );
        assert_eq!(
            negotiate(&mut p, "InitialR2T", "No", false),
            Answer::Value("No".into())
        );
        assert!(!p.initial_r2t);
    }
}
