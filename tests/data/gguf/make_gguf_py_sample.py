"""Writes gguf_py_sample.gguf with the reference Python writer (PyPI `gguf`, from llama.cpp).

Run: pip install gguf==0.19.0 numpy && python3 make_gguf_py_sample.py
The Rust test gguf_interop.rs reads it: every metadata type (nested arrays included), and
tensors in F32, F16, BF16, Q8_0, TQ1_0 and TQ2_0, each quantized tensor `X` followed by `X.ref`,
gguf-py's own dequantization of it in F32.
"""
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFValueType as V

rng = np.random.default_rng(20260101)
w = gguf.GGUFWriter("gguf_py_sample.gguf", arch="llama")
w.add_uint8("test.u8", 200)
w.add_int8("test.i8", -100)
w.add_uint16("test.u16", 60000)
w.add_int16("test.i16", -30000)
w.add_uint32("test.u32", 4000000000)
w.add_int32("test.i32", -2000000000)
w.add_float32("test.f32", 0.15625)
w.add_uint64("test.u64", 2**63 + 5)
w.add_int64("test.i64", -(2**62))
w.add_float64("test.f64", -1.0e300)
w.add_bool("test.bool", True)
w.add_string("test.string", "héllo ▁ 世界 🙂")
w.add_array("test.arr_i32", [1, -2, 3])
w.add_array("test.arr_f32", [0.5, -0.25])
w.add_array("test.arr_str", ["a", "", "ü"])
w.add_array("test.arr_bool", [True, False, True])
w.add_array("test.arr_nested", [[1, 2], [3], [4, 5, 6]])
w.add_array("test.arr_nested_str", [["x", "y"], ["z"]])

def ternary(n):
    return rng.integers(-1, 2, size=n).astype(np.float32) * np.float32(0.0625)

tensors = {
    "f32": (rng.standard_normal((3, 64)).astype(np.float32), T.F32),
    "f16": (rng.standard_normal((2, 32)).astype(np.float32), T.F16),
    "bf16": (rng.standard_normal((2, 32)).astype(np.float32), T.BF16),
    "q8_0": (rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0),
    "tq1_0": (ternary(512).reshape(2, 256) * rng.uniform(0.5, 2, (2, 1)).astype(np.float32), T.TQ1_0),
    "tq2_0": (ternary(512).reshape(2, 256), T.TQ2_0),
}
for name, (x, qt) in tensors.items():
    if qt == T.F32:
        w.add_tensor(name, x)
    elif qt == T.F16:
        w.add_tensor(name, x.astype(np.float16))
    else:
        q = gguf.quants.quantize(x, qt)
        w.add_tensor(name, q, raw_dtype=qt)
        w.add_tensor(name + ".ref", gguf.quants.dequantize(q, qt).astype(np.float32))

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
