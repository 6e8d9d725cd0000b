//! Any request body: the parser never panics, and every refusal names a line of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = outpost::profile::update::parse_body(data) {
        let lines = data.split(|b| *b == b'\n').count() as u64;
        assert!(
            e.line >= 1 && e.line <= lines.max(1),
            "line {} of {lines}",
            e.line
        );
        assert!(!e.reason.is_empty());
    }
});
