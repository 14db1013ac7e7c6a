//! `ImageLock::convert`: a lock changes mode on its own open file description without ever
//! letting the file go, as a live disk does at a checkpoint (writer to parent) and at a merge
//! (parent to writer).

use vstor_core::{ErrorKind, ImageLock, LockMode};

#[test]
fn a_writer_becomes_a_parent_and_back_without_letting_the_file_go() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("img");
    std::fs::write(&f, [0u8; 4096]).unwrap();
    let mut l = ImageLock::acquire(&f, LockMode::Exclusive).unwrap();
    // A writer: nobody else reads or writes.
    let e = ImageLock::acquire(&f, LockMode::Shared).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    // Now a parent: readers come in, writers stay out.
    l.convert(&f, LockMode::SharedStrict).unwrap();
    assert_eq!(l.mode(), LockMode::SharedStrict);
    let reader = ImageLock::acquire(&f, LockMode::SharedStrict).unwrap();
    for m in [LockMode::Exclusive, LockMode::WriteSharing] {
        let e = ImageLock::acquire(&f, m).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse, "{m:?}");
    }
    // Back to a writer is refused while the reader is there, and the parent's lock is kept.
    let e = l.convert(&f, LockMode::Exclusive).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    assert_eq!(l.mode(), LockMode::SharedStrict);
    let e = ImageLock::acquire(&f, LockMode::Exclusive).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InUse,
        "a failed upgrade let the file go"
    );
    drop(reader);
    l.convert(&f, LockMode::Exclusive).unwrap();
    let e = ImageLock::acquire(&f, LockMode::Shared).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    drop(l);
    ImageLock::acquire(&f, LockMode::Exclusive).unwrap();
}
