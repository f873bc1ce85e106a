//! Any bytes given to the GGUF reader give a header or an error, never a panic, a hang or a
//! huge allocation; what a header accepts can be read, dequantized, summarized and turned
//! into a tokenizer without panicking either.
#![no_main]

use bitnet_models::gguf::{inspect, tokenizer::GgufTokenizer, GgufHeader};
use bitnet_quant::formats;
use libfuzzer_sys::fuzz_target;

/// Tensors larger than this are only sliced, not dequantized, to keep runs fast.
const MAX_ELEMENTS: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = GgufHeader::parse(data, "fuzz") else {
        return;
    };
    for t in header.tensors() {
        let bytes = header
            .tensor_data(data, t.name())
            .expect("a tensor the header accepted lies inside the file");
        assert_eq!(bytes.len() as u64, t.n_bytes());
        if t.n_elements() <= MAX_ELEMENTS {
            let n = t.n_elements() as usize;
            let _ = formats::dequantize(t.ggml_type(), bytes, n);
            let _ = formats::ternary_codes(t.ggml_type(), bytes, n);
        }
    }
    let _ = inspect(&header);
    if let Ok(tok) = GgufTokenizer::from_metadata(header.metadata(), "fuzz") {
        if let Ok(ids) = tok.encode("Hello wörld 12 <s>\n", true) {
            let _ = tok.decode(&ids, false);
        }
    }
});
