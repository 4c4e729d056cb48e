//! The safetensors header parser on arbitrary bytes: errors are fine, panics, overflows,
//! out-of-bounds reads and unbounded allocations are not (`moestream_formats::fuzzing`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moestream_formats::fuzzing::safetensors_header(data);
});
