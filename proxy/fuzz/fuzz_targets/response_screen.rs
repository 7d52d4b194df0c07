#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| domicile_proxy::fuzzing::response_screen(data));
