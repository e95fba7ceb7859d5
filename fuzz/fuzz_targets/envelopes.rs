#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bkimg_fuzz::envelopes(data));
