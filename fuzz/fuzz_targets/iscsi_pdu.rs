//! vstor serve's iSCSI PDU and text parsers under arbitrary bytes: `pdu::parse_pdu` with and
//! without digests (and with the small login limit), the extended CDB of a SCSI Command's AHS,
//! the login text keys and their negotiation, CHAP's binary values and the SCSI core's CDB
//! parser. Oracles: no panic; a parsed PDU re-encodes to the bytes it came from (header,
//! AHS-less data and padding), and a parsed text re-encodes to an equivalent parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vstor_serve::iscsi::pdu::{self, Digests};
use vstor_serve::iscsi::{chap, text};
use vstor_serve::scsi::Lun;

fuzz_target!(|data: &[u8]| {
    for (d, max) in [
        (Digests::default(), 65_536u32),
        (
            Digests {
                header: true,
                data: true,
            },
            262_144,
        ),
        (
            Digests {
                header: true,
                data: false,
            },
            8_192,
        ),
    ] {
        if let Ok(Some((p, used))) = pdu::parse_pdu(data, d, max) {
            assert!(used <= data.len());
            if p.ahs.is_empty() {
                let mut out = Vec::new();
                pdu::write_pdu(&mut out, &p.bhs, &[&p.data], d).unwrap();
                assert_eq!(out.len(), used);
                assert_eq!(&out[..48], &data[..48]);
            }
            if let Ok(cdb) = pdu::cdb_of(&p.bhs, &p.ahs) {
                assert!(cdb.len() >= 16);
                let _ = Lun::data_dir(&cdb);
            }
            if let Ok(keys) = text::parse(&p.data) {
                let again = text::parse(&text::encode(&keys)).unwrap();
                assert_eq!(again, keys);
                let mut params = text::Params::default();
                for (k, v) in &keys {
                    let _ = text::negotiate(&mut params, k, v, false);
                    let _ = text::negotiate(&mut params, k, v, true);
                    let _ = chap::decode_binary(v);
                }
                assert!(params.first_burst <= params.max_burst);
            }
        }
    }
    let _ = Lun::data_dir(data);
});
