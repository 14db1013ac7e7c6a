//! Arbitrary requests, including absurd offsets and lengths, against the in-memory device
//! behind the fault injector, checked against a model (zero-length requests are no-ops that
//! succeed): every request either fails with a typed
//! error and changes nothing, or does exactly what it says.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vstor::core::{BlockDevice, CutPolicy, FaultDevice, MemoryDevice, Request};

const CAP: u64 = 64 * 1024;

#[derive(Debug, Arbitrary)]
enum Action {
    Write { offset: u64, len: u16, byte: u8 },
    Read { offset: u64, len: u16 },
    Discard { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    Flush,
    Cut { seed: u64 },
}

fuzz_target!(|actions: Vec<Action>| {
    let medium: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(CAP).unwrap());
    let dev = FaultDevice::new(medium);
    let mut model = vec![0u8; CAP as usize];
    let fits =
        |o: u64, l: u64| o % 512 == 0 && l % 512 == 0 && o.checked_add(l).is_some_and(|e| e <= CAP);
    for a in actions.into_iter().take(64) {
        match a {
            Action::Write { offset, len, byte } => {
                let data = vec![byte; len as usize];
                let r = dev.submit_all(&mut [Request::write(offset, &data)]);
                assert_eq!(r.is_ok(), fits(offset, len as u64));
                if r.is_ok() {
                    model[offset as usize..offset as usize + len as usize].fill(byte);
                }
            }
            Action::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                let r = dev.read_at(offset, &mut buf);
                assert_eq!(r.is_ok(), fits(offset, len as u64));
                if r.is_ok() {
                    assert_eq!(buf, model[offset as usize..offset as usize + len as usize]);
                }
            }
            Action::Discard { offset, len } | Action::Zero { offset, len } => {
                let r = dev.write_zeroes(offset, len);
                assert_eq!(r.is_ok(), fits(offset, len));
                if r.is_ok() {
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
            }
            Action::Flush => dev.flush().unwrap(),
            Action::Cut { seed } => {
                // After a cut, reload the model from the medium: the durable state.
                dev.power_cut(CutPolicy::Random { seed, torn: true })
                    .unwrap();
                dev.power_on();
                dev.inner().read_at(0, &mut model).unwrap();
            }
        }
    }
});
