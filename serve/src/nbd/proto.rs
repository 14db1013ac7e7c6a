//! The NBD wire protocol: constants and the parsing of what a client sends, as pure functions
//! over bytes (the fuzz targets drive these). Values from the NBD protocol document
//! (NetworkBlockDevice/nbd doc/proto.md).

/// `NBDMAGIC`, the first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation; also the magic of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The magic of option replies.
pub const REPLY_MAGIC: u64 = 0x3_e889_0455_65a9;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server will not send the 124 zero bytes after EXPORT_NAME if the client agrees.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client agrees to NO_ZEROES.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub mod opt {
    /// Select an export and enter transmission (old clients; no error path).
    pub const EXPORT_NAME: u32 = 1;
    /// The client ends the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List meta contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select meta contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit headers (not offered).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One piece of information (INFO, GO).
    pub const INFO: u32 = 3;
    /// One meta context.
    pub const META_CONTEXT: u32 = 4;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Malformed, or not valid now.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The option is too big to handle.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types of INFO and GO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// A description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF (don't fragment) flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent disk (FLUSH on one covers all).
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (with payload).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: do not fragment the reply.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail at once unless it is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// The last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload (ends a reply).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A range that reads as zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status of one meta context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Errors sent to clients (errno values as the protocol defines them).
pub mod err {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space (also a write past the end).
    pub const ENOSPC: u32 = 28;
    /// The request is too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (FAST_ZERO that would be slow).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` block status bits.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The meta context ids this server hands out.
pub const CONTEXT_BASE_ALLOCATION: u32 = 1;
/// `qemu:allocation-depth`.
pub const CONTEXT_ALLOCATION_DEPTH: u32 = 2;
/// The meta contexts this server knows, with their ids.
pub const CONTEXTS: [(&str, u32); 2] = [
    ("base:allocation", CONTEXT_BASE_ALLOCATION),
    ("qemu:allocation-depth", CONTEXT_ALLOCATION_DEPTH),
];

/// The largest payload (a READ's or WRITE's length) the server accepts: 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option a client may send (names are at most 4096 bytes; a few queries).
pub const MAX_OPTION: u32 = 64 << 10;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// A transmission request header (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's identifier, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// The size of a request header.
pub const REQUEST_HEADER: usize = 28;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Parses a request header; a wrong magic is malformed (the connection cannot go on).
pub fn parse_request(b: &[u8; REQUEST_HEADER]) -> Result<RequestHeader, Malformed> {
    if be32(&b[0..]) != REQUEST_MAGIC {
        return Err(Malformed("bad request magic"));
    }
    Ok(RequestHeader {
        flags: be16(&b[4..]),
        kind: be16(&b[6..]),
        cookie: be64(&b[8..]),
        offset: be64(&b[16..]),
        len: be32(&b[24..]),
    })
}

/// Parses an option header (16 bytes): (option, length of its data).
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), Malformed> {
    if be64(b) != IHAVEOPT {
        return Err(Malformed("bad option magic"));
    }
    Ok((be32(&b[8..]), be32(&b[12..])))
}

/// A little reader over option data that never reads past the end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("option data shorter than its fields say"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        self.take(4).map(be32)
    }
    fn string(&mut self) -> Result<String, Malformed> {
        let n = self.u32()? as usize;
        if n > 4096 {
            return Err(Malformed("string longer than 4096 bytes"));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| Malformed("string is not UTF-8"))
    }
}

/// An INFO or GO request: the export name and the information asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" for the default export).
    pub name: String,
    /// Information types asked for.
    pub requests: Vec<u16>,
}

/// Parses the data of INFO or GO.
pub fn parse_info(data: &[u8]) -> Result<InfoRequest, Malformed> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()?;
    let requests = (0..n).map(|_| c.u16()).collect::<Result<Vec<_>, _>>()?;
    if !c.0.is_empty() {
        return Err(Malformed("trailing bytes after the information requests"));
    }
    Ok(InfoRequest { name, requests })
}

/// A LIST_META_CONTEXT or SET_META_CONTEXT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Queries.
    pub queries: Vec<String>,
}

/// Parses the data of LIST_META_CONTEXT or SET_META_CONTEXT.
pub fn parse_meta(data: &[u8]) -> Result<MetaRequest, Malformed> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u32()?;
    if n > 256 {
        return Err(Malformed("more than 256 meta context queries"));
    }
    let queries = (0..n).map(|_| c.string()).collect::<Result<Vec<_>, _>>()?;
    if !c.0.is_empty() {
        return Err(Malformed("trailing bytes after the queries"));
    }
    Ok(MetaRequest { name, queries })
}

/// The contexts a query matches: an exact name, or a namespace (`base:`, `qemu:`) for LIST.
pub fn match_contexts(query: &str, listing: bool) -> Vec<(&'static str, u32)> {
    CONTEXTS
        .iter()
        .filter(|(name, _)| {
            *name == query || (listing && query.ends_with(':') && name.starts_with(query))
        })
        .copied()
        .collect()
}

/// An option reply header.
pub fn option_reply(option: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut b = [0u8; REQUEST_HEADER];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&cflag::FUA.to_be_bytes());
        b[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!(
            r,
            RequestHeader {
                flags: cflag::FUA,
                kind: cmd::WRITE,
                cookie: 7,
                offset: 4096,
                len: 512
            }
        );
        b[0] ^= 1;
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn info_and_meta() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        let i = parse_info(&d).unwrap();
        assert_eq!(
            (i.name.as_str(), i.requests),
            ("abc", vec![info::BLOCK_SIZE])
        );
        assert!(parse_info(&d[..d.len() - 1]).is_err());
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&5u32.to_be_bytes());
        m.extend_from_slice(b"qemu:");
        let q = parse_meta(&m).unwrap();
        assert_eq!(q.queries, vec!["qemu:".to_string()]);
        assert_eq!(match_contexts("qemu:", true).len(), 1);
        assert!(match_contexts("qemu:", false).is_empty());
        assert_eq!(match_contexts("base:allocation", false).len(), 1);
        // A length field that claims more than there is.
        let mut bad = Vec::new();
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta(&bad).is_err());
        assert!(parse_info(&bad).is_err());
    }
}
