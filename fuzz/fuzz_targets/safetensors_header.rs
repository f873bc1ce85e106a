//! The safetensors crate's header parser and tensor views on arbitrary bytes: an error or a
//! header whose every tensor view lies inside the buffer, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safetensors::SafeTensors;

fuzz_target!(|data: &[u8]| {
    if let Ok((header_len, metadata)) = SafeTensors::read_metadata(data) {
        assert!(header_len <= data.len());
        for (name, info) in metadata.tensors() {
            let _ = (name.len(), info.dtype, info.shape.len(), info.data_offsets);
        }
    }
    if let Ok(st) = SafeTensors::deserialize(data) {
        for (name, view) in st.tensors() {
            let bytes = view.data();
            let n: usize = view.shape().iter().product();
            assert_eq!(bytes.len(), n * view.dtype().bitsize() / 8, "{name}");
            let again = st.tensor(&name).expect("listed tensor");
            assert_eq!(again.data().len(), bytes.len());
        }
    }
});
