//! The vhost-user wire format (QEMU `docs/interop/vhost-user.rst`): a 12-byte header
//! (`request`, `flags`, `size`, little-endian), a payload of `size` bytes, and file descriptors
//! passed alongside as `SCM_RIGHTS`. Everything read from the socket is bounded and parsed by
//! hand from little-endian bytes; nothing is cast from the wire.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Requests of the frontend (front-end message types).
pub mod req {
    #![allow(missing_docs)]
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Requests of the backend on the backend channel.
pub mod backend_req {
    /// The device's configuration space changed.
    pub const CONFIG_CHANGE_MSG: u32 = 2;
}

/// Protocol feature bits.
pub mod protocol {
    #![allow(missing_docs)]
    pub const MQ: u64 = 1 << 0;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const BACKEND_REQ: u64 = 1 << 5;
    pub const CONFIG: u64 = 1 << 9;
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    pub const RESET_DEVICE: u64 = 1 << 13;
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
}

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the frontend may ask for the protocol features.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << 28;

/// Header flags: the protocol version (1) in bits 0-1.
const VERSION: u32 = 1;
/// Header flags: this is a reply.
const FLAG_REPLY: u32 = 1 << 2;
/// Header flags: the frontend wants an acknowledgement (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 1 << 3;
/// The largest payload accepted (the largest real one, GET_CONFIG, is 12 + 256 bytes).
pub const MAX_PAYLOAD: usize = 4096;
/// The most file descriptors one message carries.
pub const MAX_FDS: usize = 8;
/// The header's length.
pub const HEADER_LEN: usize = 12;

/// One message.
#[derive(Debug)]
pub struct Message {
    /// The request code.
    pub request: u32,
    /// The header flags.
    pub flags: u32,
    /// The payload.
    pub payload: Vec<u8>,
    /// The file descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

/// Why a message could not be read.
#[derive(Debug)]
pub enum RecvError {
    /// The frontend closed the connection between messages.
    Closed,
    /// A socket error or a malformed message (the connection cannot go on).
    Broken(io::Error),
}

impl From<io::Error> for RecvError {
    fn from(e: io::Error) -> Self {
        RecvError::Broken(e)
    }
}

fn malformed(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Reads exactly `buf.len()` bytes, keeping the descriptors that arrive with them (at most
/// [`MAX_FDS`] over the whole message; more is an error). `Ok(false)`: end of stream before the
/// first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf[at..])];
        let r = match recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if fds.len() > MAX_FDS {
            return Err(malformed(format!(
                "{} file descriptors in one message",
                fds.len()
            )));
        }
        if r.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(malformed(
                "file descriptors cut off (too many in one message)",
            ));
        }
        if r.bytes == 0 {
            if at == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        at += r.bytes;
    }
    Ok(true)
}

/// Reads one message from the frontend.
pub fn recv(sock: &UnixStream) -> Result<Message, RecvError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    if !recv_exact(sock, &mut hdr, &mut fds)? {
        return Err(RecvError::Closed);
    }
    let request = le32(&hdr, 0);
    let flags = le32(&hdr, 4);
    let size = le32(&hdr, 8) as usize;
    if flags & 3 != VERSION {
        return Err(malformed(format!("message version {} (only 1 is known)", flags & 3)).into());
    }
    if flags & FLAG_REPLY != 0 {
        return Err(malformed("a reply where a request was expected").into());
    }
    if size > MAX_PAYLOAD {
        return Err(malformed(format!("payload of {size} bytes (at most {MAX_PAYLOAD})")).into());
    }
    let mut payload = vec![0u8; size];
    if size > 0 && !recv_exact(sock, &mut payload, &mut fds)? {
        return Err(RecvError::Broken(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(Message {
        request,
        flags,
        payload,
        fds,
    })
}

/// Writes a message: a reply to `request` when `reply`, else a request (of the backend
/// channel), with `fds` passed alongside.
pub fn send(
    sock: &UnixStream,
    request: u32,
    flags: u32,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut hdr = [0u8; HEADER_LEN];
    hdr[0..4].copy_from_slice(&request.to_le_bytes());
    hdr[4..8].copy_from_slice(&(VERSION | flags).to_le_bytes());
    hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut msg = Vec::with_capacity(HEADER_LEN + payload.len());
    msg.extend_from_slice(&hdr);
    msg.extend_from_slice(payload);
    let mut at = 0;
    let mut fds_sent = fds.is_empty();
    while at < msg.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds_sent && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other(
                "too many file descriptors for one message",
            ));
        }
        let iov = [IoSlice::new(&msg[at..])];
        match sendmsg(sock.as_fd(), &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => {
                at += n;
                fds_sent = true;
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends a reply to `request`.
pub fn reply(
    sock: &UnixStream,
    request: u32,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    send(sock, request, FLAG_REPLY, payload, fds)
}

/// A little-endian u16 at `at` (the caller checked the length).
pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// A little-endian u32 at `at`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A little-endian u64 at `at`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The payload of a message that must be exactly `len` bytes long.
pub fn exact(msg: &Message, len: usize) -> io::Result<&[u8]> {
    if msg.payload.len() == len {
        Ok(&msg.payload)
    } else {
        Err(malformed(format!(
            "request {} with a {}-byte payload ({len} expected)",
            msg.request,
            msg.payload.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn messages_round_trip_with_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        send(&a, 5, FLAG_NEED_REPLY, &[1, 2, 3], &[f.as_fd()]).unwrap();
        let m = recv(&b).unwrap();
        assert_eq!(
            (m.request, m.flags & !3, m.payload.as_slice()),
            (5, FLAG_NEED_REPLY, &[1u8, 2, 3][..])
        );
        assert_eq!(m.fds.len(), 1);
        drop(a);
        assert!(matches!(recv(&b), Err(RecvError::Closed)));
    }

    #[test]
    fn malformed_headers_break_the_connection() {
        let cases: [&[u8]; 4] = [
            // Version 2.
            &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
            // A reply.
            &[1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0],
            // An oversized payload.
            &[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0],
            // A header cut short.
            &[1, 0, 0],
        ];
        for bytes in cases {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(bytes).unwrap();
            drop(a);
            assert!(matches!(recv(&b), Err(RecvError::Broken(_))), "{bytes:?}");
        }
        // A payload cut short.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 1, 2])
            .unwrap();
        drop(a);
        assert!(matches!(recv(&b), Err(RecvError::Broken(_))));
    }

    #[test]
    fn too_many_descriptors_break_the_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> = (0..=MAX_FDS)
            .map(|_| tempfile::tempfile().unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        // The header with eight descriptors, its four payload bytes with one more.
        let raw = |bytes: &[u8], fds: &[BorrowedFd<'_>]| {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
            sendmsg(&a, &[IoSlice::new(bytes)], &mut control, SendFlags::empty()).unwrap();
        };
        raw(&[5, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0], &fds[..MAX_FDS]);
        raw(&[0, 0, 0, 0], &fds[MAX_FDS..]);
        assert!(matches!(recv(&b), Err(RecvError::Broken(_))));
    }
}
