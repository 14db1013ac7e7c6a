//! Header updates: they alternate slots and bump the sequence number; the first write after an
//! open renews FileWriteGuid and DataWriteGuid and sets a LogGuid; a clean close clears it.

use std::sync::Arc;

use vstor_core::{BlockDevice, MemoryDevice};
use vstor_vhdx::meta::read_headers;
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

#[test]
fn header_updates_alternate_and_guids_change_on_first_write() {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let v = Vhdx::create_on(
        mem.clone(),
        &CreateOptions::dynamic(64 << 20).block_size(1 << 20),
        None,
    )
    .unwrap();
    let h0 = read_headers(&*mem, "t").unwrap();
    assert_eq!((h0.slots[0].clone(), h0.slots[1].clone()), (Ok(1), Ok(2)));
    assert_eq!(h0.current.slot, 1);
    let before = v.header();
    // Reads change nothing.
    let mut b = vec![0u8; 4096];
    v.read_at(0, &mut b).unwrap();
    assert_eq!(
        read_headers(&*mem, "t")
            .unwrap()
            .current
            .header
            .sequence_number
            .get(),
        2
    );
    // The first write: a new header in the other slot.
    v.write_at(0, &[1u8; 4096]).unwrap();
    let h1 = read_headers(&*mem, "t").unwrap();
    assert_eq!(h1.current.slot, 0);
    assert_eq!(h1.current.header.sequence_number.get(), 3);
    let cur = h1.current.header.clone();
    assert_ne!(cur.data_write_guid, before.data_write_guid);
    assert_ne!(cur.file_write_guid, before.file_write_guid);
    assert!(
        !cur.log_guid.is_nil(),
        "the log is in use while the image is open for writing"
    );
    // Further writes do not touch the header.
    v.write_at(8 << 20, &[2u8; 4096]).unwrap();
    v.flush().unwrap();
    assert_eq!(
        read_headers(&*mem, "t")
            .unwrap()
            .current
            .header
            .sequence_number
            .get(),
        3
    );
    // A clean close clears the LogGuid, in the other slot again.
    v.close().unwrap();
    let h2 = read_headers(&*mem, "t").unwrap();
    assert_eq!(h2.current.slot, 1);
    assert_eq!(h2.current.header.sequence_number.get(), 4);
    assert!(h2.current.header.log_guid.is_nil());
    assert_eq!(h2.current.header.data_write_guid, cur.data_write_guid);
    drop(v);
    // Reopening read-only writes nothing; reopening writable writes nothing until a write.
    let r = Vhdx::open_on(mem.clone(), "t", &OpenOptions::read_only(), None).unwrap();
    drop(r);
    let w = Vhdx::open_on(mem.clone(), "t", &OpenOptions::default(), None).unwrap();
    drop(w);
    assert_eq!(
        read_headers(&*mem, "t")
            .unwrap()
            .current
            .header
            .sequence_number
            .get(),
        4
    );
}
