//! Any stored bytes: decoding a profile, export or clock record never panics, and what
//! decodes encodes back to bytes that decode to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::store::codec;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = codec::decode_profile(data) {
        let again = codec::decode_profile(&codec::encode_profile(&record)).unwrap();
        assert_eq!(again, record);
    }
    if let Ok(record) = codec::decode_export(data) {
        let again = codec::decode_export(&codec::encode_export(&record)).unwrap();
        assert_eq!(again, record);
    }
    if let Ok(record) = codec::decode_clock(data) {
        let _ = codec::encode_clock(&record);
    }
});
