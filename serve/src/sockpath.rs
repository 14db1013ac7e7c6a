//! Making a Unix socket at a path the operator named, without harming what is there.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Binds a listening Unix socket at `path`. A socket file left there by a process that died
/// (nobody answers on it) is replaced; a socket something still listens on is refused as in
/// use; any other file (a disk image given by mistake) is never removed: refused.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use: something listens on it", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; it is left alone (give another path)",
                    path.display()
                ),
            ))
        }
        Err(_) => {}
    }
    UnixListener::bind(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_kept_a_stale_socket_replaced_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.vhdx");
        std::fs::write(&f, b"precious").unwrap();
        let e = bind_unix(&f).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&f).unwrap(), b"precious");
        let s = dir.path().join("s.sock");
        let live = bind_unix(&s).unwrap();
        assert_eq!(bind_unix(&s).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(live); // the file stays, nobody listens: stale
        bind_unix(&s).unwrap();
    }
}
