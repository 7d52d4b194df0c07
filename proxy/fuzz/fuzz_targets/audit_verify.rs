#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    domicile_proxy::fuzzing::audit_verify(data);
});
