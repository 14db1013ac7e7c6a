//! Target strings and sizes come from users and config files: parsing never panics, and a
//! parsed target's options are the ones written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vstor::{parse_size, TargetSpec};

fuzz_target!(|input: &str| {
    if let Ok(v) = parse_size(input) {
        // Whatever parses must print back to the same number.
        assert_eq!(parse_size(&v.to_string()).ok(), Some(v));
    }
    if let Ok(spec) = input.parse::<TargetSpec>() {
        assert!(!spec.path().as_os_str().is_empty());
    }
});
