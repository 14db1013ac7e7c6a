//! iSCSI PDUs (RFC 7143 §11): the 48-byte basic header segment, additional header segments,
//! the data segment with its padding, and the optional CRC32C header and data digests.

use std::io::{self, Read, Write};

/// The basic header segment's length.
pub const BHS_LEN: usize = 48;

/// Opcodes (RFC 7143 §11.1.1).
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TMF_REQ: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQ: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQ: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQ: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESP: u8 = 0x21;
    /// SCSI Task Management Function Response.
    pub const TMF_RESP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK: u8 = 0x03;
    /// Protocol error.
    pub const PROTOCOL: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
}

/// The reserved tag ("no tag").
pub const NO_TAG: u32 = 0xffff_ffff;

/// A basic header segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs(op {:#04x}, flags {:#04x}, itt {:#x}, dsl {})",
            self.opcode(),
            self.flags(),
            self.itt(),
            self.data_len()
        )
    }
}

impl Bhs {
    /// A header of `opcode` with every other field zero.
    pub fn new(opcode: u8) -> Bhs {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode & 0x3f;
        Bhs(b)
    }
    /// The opcode (without the immediate bit).
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The immediate delivery bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    /// Byte 1: the final bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// The final (F) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }
    /// DataSegmentLength.
    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }
    /// Sets DataSegmentLength (the caller keeps it below 2^24).
    pub fn set_data_len(&mut self, n: u32) {
        let b = n.to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..4]);
    }
    /// The LUN field (bytes 8 to 15).
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    /// The Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    /// A big-endian u32 at `off`.
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
    /// A big-endian u16 at `off`.
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    /// A big-endian u64 at `off`.
    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.0[off..off + 8].try_into().expect("8 bytes"))
    }
    /// Stores a big-endian u32 at `off`.
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    /// Stores a big-endian u16 at `off`.
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    /// Stores a big-endian u64 at `off`.
    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
}

/// Which digests a connection uses (negotiated at login; none before).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C over the header (BHS and AHS).
    pub header: bool,
    /// CRC32C over the data segment and its padding.
    pub data: bool,
}

/// A whole PDU as received.
#[derive(Clone, Debug)]
pub struct Pdu {
    /// The basic header segment.
    pub bhs: Bhs,
    /// The additional header segments (TotalAHSLength bytes).
    pub ahs: Vec<u8>,
    /// The data segment, without its padding.
    pub data: Vec<u8>,
}

/// Why a PDU could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The connection failed or ended.
    Io(io::Error),
    /// The header digest did not match: nothing in the header can be trusted, and at error
    /// recovery level 0 the connection ends (RFC 7143 §7.8).
    HeaderDigest,
    /// The data segment is longer than this side's MaxRecvDataSegmentLength.
    TooLong(Bhs),
    /// The data digest did not match (the PDU's header is trustworthy).
    DataDigest(Bhs),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// The iSCSI CRC32C of `data`, as its four bytes go on the wire (RFC 7143 §13.1, with the
/// example of RFC 3720 B.4: 32 zero bytes give `aa 36 91 8a`).
pub fn digest(data: &[u8]) -> [u8; 4] {
    crc32c::crc32c(data).to_le_bytes()
}

fn digest2(a: &[u8], b: &[u8]) -> [u8; 4] {
    crc32c::crc32c_append(crc32c::crc32c(a), b).to_le_bytes()
}

/// Bytes of padding after a data segment of `n` bytes.
pub fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Reads one PDU. `max_data` is this side's MaxRecvDataSegmentLength: a longer data segment
/// is refused without reading it.
pub fn read_pdu(r: &mut impl Read, digests: Digests, max_data: u32) -> Result<Pdu, ReadError> {
    let mut bhs = Bhs([0u8; BHS_LEN]);
    r.read_exact(&mut bhs.0)?;
    let mut ahs = vec![0u8; bhs.ahs_len()];
    r.read_exact(&mut ahs)?;
    if digests.header {
        let mut d = [0u8; 4];
        r.read_exact(&mut d)?;
        if digest2(&bhs.0, &ahs) != d {
            return Err(ReadError::HeaderDigest);
        }
    }
    let n = bhs.data_len();
    if n > max_data {
        return Err(ReadError::TooLong(bhs));
    }
    let total = n as usize + pad(n as usize);
    let mut data = Vec::with_capacity(total);
    r.take(total as u64).read_to_end(&mut data)?;
    if data.len() != total {
        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if digests.data && n > 0 {
        let mut d = [0u8; 4];
        r.read_exact(&mut d)?;
        if digest(&data) != d {
            return Err(ReadError::DataDigest(bhs));
        }
    }
    data.truncate(n as usize);
    Ok(Pdu { bhs, ahs, data })
}

/// Parses one PDU from the front of `buf` (for the fuzz target and tests): the PDU and the
/// bytes it took, or `Ok(None)` when `buf` holds less than a whole PDU.
pub fn parse_pdu(
    buf: &[u8],
    digests: Digests,
    max_data: u32,
) -> Result<Option<(Pdu, usize)>, ReadError> {
    let mut cur = io::Cursor::new(buf);
    match read_pdu(&mut cur, digests, max_data) {
        Ok(p) => Ok(Some((p, cur.position() as usize))),
        Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The bytes that go around a PDU's data segment: the header (with DataSegmentLength set)
/// and its digest before, the padding and the data digest after. See [`frame`].
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    head: [u8; BHS_LEN + 4],
    head_len: usize,
    tail: [u8; 7],
    tail_len: usize,
}

impl Frame {
    /// The header, and its digest when header digests are on.
    pub fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }
    /// The padding, and the data digest when data digests are on and there is data.
    pub fn tail(&self) -> &[u8] {
        &self.tail[..self.tail_len]
    }
}

/// The frame of a PDU with header `bhs` and the data segment `data` (in pieces): a PDU on the
/// wire is `head()`, the pieces, `tail()`.
pub fn frame(bhs: &Bhs, data: &[&[u8]], digests: Digests) -> Frame {
    let n: usize = data.iter().map(|d| d.len()).sum();
    let mut h = *bhs;
    h.set_data_len(n as u32);
    let mut f = Frame {
        head: [0; BHS_LEN + 4],
        head_len: BHS_LEN,
        tail: [0; 7],
        tail_len: pad(n),
    };
    f.head[..BHS_LEN].copy_from_slice(&h.0);
    if digests.header {
        f.head[BHS_LEN..].copy_from_slice(&digest(&h.0));
        f.head_len += 4;
    }
    if digests.data && n > 0 {
        let mut crc = 0u32;
        for d in data {
            crc = crc32c::crc32c_append(crc, d);
        }
        // The padding is zeroes, already in place.
        crc = crc32c::crc32c_append(crc, &f.tail[..f.tail_len]);
        f.tail[f.tail_len..f.tail_len + 4].copy_from_slice(&crc.to_le_bytes());
        f.tail_len += 4;
    }
    f
}

/// Writes one PDU: the header (with DataSegmentLength set from `data`), its digest, the data
/// in pieces, padding and the data digest. Nothing is flushed.
pub fn write_pdu(
    w: &mut impl Write,
    bhs: &Bhs,
    data: &[&[u8]],
    digests: Digests,
) -> io::Result<()> {
    let f = frame(bhs, data, digests);
    w.write_all(f.head())?;
    for d in data {
        w.write_all(d)?;
    }
    w.write_all(f.tail())
}

/// Writes every byte of `bufs` with as few `writev` calls as the kernel allows (at most
/// [`MAX_IOV`] slices each).
pub fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(MAX_IOV);
        match w.write_vectored(&bufs[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => io::IoSlice::advance_slices(&mut bufs, k),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The most slices one `writev` takes (Linux's UIO_MAXIOV).
pub const MAX_IOV: usize = 1024;

/// Serial number arithmetic on 32-bit sequence numbers (RFC 1982): whether `a` is before `b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// The extended CDB of a SCSI Command, from its AHS (type 1): the whole CDB is the header's
/// 16 bytes followed by these. `Err` when the AHS is malformed.
pub fn cdb_of(bhs: &Bhs, ahs: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut cdb = bhs.0[32..48].to_vec();
    let mut rest = ahs;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err("truncated AHS");
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let kind = rest[2];
        // AHSLength counts the bytes after the type byte; each AHS is padded to 4 bytes.
        let total = (3 + len).next_multiple_of(4);
        if total > rest.len() || len == 0 {
            return Err("AHS longer than TotalAHSLength");
        }
        match kind {
            1 => {
                // A reserved byte, then the CDB beyond its first 16 bytes.
                cdb.extend_from_slice(&rest[4..3 + len]);
            }
            2 => {} // expected bidirectional read length: no bidirectional commands here
            _ => return Err("unknown AHS type"),
        }
        rest = &rest[total..];
    }
    Ok(cdb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_rfc3720_example() {
        assert_eq!(digest(&[0u8; 32]), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(digest(&[0xffu8; 32]), [0x43, 0xab, 0xa8, 0x62]);
    }

    #[test]
    fn pdu_round_trips_with_digests() {
        let d = Digests {
            header: true,
            data: true,
        };
        let mut h = Bhs::new(op::NOP_IN);
        h.set_u32(16, 7);
        let mut out = Vec::new();
        write_pdu(&mut out, &h, &[b"hello", b" w"], d).unwrap();
        assert_eq!(out.len(), 48 + 4 + 8 + 4);
        let (p, used) = parse_pdu(&out, d, 8192).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(p.data, b"hello w");
        assert_eq!(p.bhs.itt(), 7);
        // A flipped data bit is a data digest error; a flipped header bit a header one.
        let mut bad = out.clone();
        bad[53] ^= 1;
        assert!(matches!(
            parse_pdu(&bad, d, 8192),
            Err(ReadError::DataDigest(_))
        ));
        bad = out.clone();
        bad[16] ^= 1;
        assert!(matches!(
            parse_pdu(&bad, d, 8192),
            Err(ReadError::HeaderDigest)
        ));
        assert!(matches!(parse_pdu(&out, d, 4), Err(ReadError::TooLong(_))));
        assert!(parse_pdu(&out[..50], d, 8192).unwrap().is_none());
    }

    /// A writer that takes at most 5 bytes and 2 slices a call.
    struct Dribble(Vec<u8>);
    impl Write for Dribble {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(5);
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            let mut n = 0;
            for b in bufs.iter().take(2) {
                let k = b.len().min(5 - n);
                self.0.extend_from_slice(&b[..k]);
                n += k;
                if n == 5 {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_written_vectored_match_write_pdu() {
        for digests in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
        ] {
            let mut h = Bhs::new(op::DATA_IN);
            h.set_u32(16, 9);
            let (a, b): (&[u8], &[u8]) = (b"abc", b"defgh");
            let mut plain = Vec::new();
            write_pdu(&mut plain, &h, &[a, b], digests).unwrap();
            write_pdu(&mut plain, &h, &[], digests).unwrap();
            let (f1, f2) = (frame(&h, &[a, b], digests), frame(&h, &[], digests));
            let mut iov = [
                io::IoSlice::new(f1.head()),
                io::IoSlice::new(a),
                io::IoSlice::new(&[]),
                io::IoSlice::new(b),
                io::IoSlice::new(f1.tail()),
                io::IoSlice::new(f2.head()),
                io::IoSlice::new(f2.tail()),
            ];
            let mut w = Dribble(Vec::new());
            write_all_vectored(&mut w, &mut iov).unwrap();
            assert_eq!(w.0, plain);
            let (p, used) = parse_pdu(&w.0, digests, 8192).unwrap().unwrap();
            assert_eq!(p.data, b"abcdefgh");
            assert_eq!(
                parse_pdu(&w.0[used..], digests, 8192).unwrap().unwrap().1,
                48 + if digests.header { 4 } else { 0 }
            );
        }
    }

    #[test]
    fn serial_numbers_wrap() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(0xffff_fff0, 3));
        assert!(!sn_lt(3, 0xffff_fff0));
        assert!(!sn_lt(5, 5));
    }

    #[test]
    fn extended_cdb() {
        let mut h = Bhs::new(op::SCSI_CMD);
        h.0[32] = 0x7f;
        // 32-byte CDB: 16 more bytes plus the reserved byte: AHSLength 17, padded to 20.
        let mut ahs = vec![0, 17, 1, 0];
        ahs.extend(1..=16u8);
        ahs.extend([0u8; 0]);
        let cdb = cdb_of(&h, &ahs).unwrap();
        assert_eq!(cdb.len(), 32);
        assert_eq!(cdb[16], 1);
        assert!(cdb_of(&h, &ahs[..10]).is_err());
    }
}
