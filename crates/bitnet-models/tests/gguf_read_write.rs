//! GGUF reader and writer: files built byte by byte, a file from the reference Python writer,
//! write -> read round trips, dialect detection, and the inspect summary.

mod gguf_support;

use bitnet_models::gguf::{
    inspect, write_gguf, Dialect, GgufArray, GgufError, GgufFile, GgufMetadata, GgufValue, GgufWriter,
    TensorSpec, WriterOptions,
};
use bitnet_quant::formats::{self, i2_s, GgmlType};
use gguf_support::{data_dir, temp_dir, Raw};

/// A hand-built v2 and v3 file: two keys, two tensors, default alignment.
fn tiny_raw(version: u32) -> Vec<u8> {
    let mut r = Raw::header(version, 2, 2);
    r.kv_str("general.architecture", "llama");
    r.string("answer").u32(5).raw(&(-42i32).to_le_bytes());
    r.tensor("a", &[4], 0, 0); // 4 x f32 = 16 bytes, padded to 32
    r.tensor("b", &[2, 2], 1, 32); // 4 x f16
    r.pad(32);
    for v in [1.0f32, -2.0, 3.5, 0.0] {
        r.f32(v);
    }
    r.pad(32);
    r.raw(&[0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38, 0x00, 0x00]); // 1, -2, 0.5, 0
    r.bytes
}

#[test]
fn reads_hand_built_v2_and_v3() {
    for version in [2, 3] {
        let f = GgufFile::from_bytes(tiny_raw(version), "tiny").unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.metadata().get_str("general.architecture"), Some("llama"));
        assert_eq!(f.metadata().get("answer"), Some(&GgufValue::I32(-42)));
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.tensors().len(), 2);
        let b = f.tensor("b").unwrap();
        assert_eq!(b.shape(), &[2, 2]);
        assert_eq!(b.ggml_type(), GgmlType::F16);
        assert_eq!(b.n_bytes(), 8);
        assert_eq!(f.dequantize("a").unwrap(), vec![1.0, -2.0, 3.5, 0.0]);
        assert_eq!(f.dequantize("b").unwrap(), vec![1.0, -2.0, 0.5, 0.0]);
        assert_eq!(f.dialect(), Dialect::Common);
        assert!(matches!(f.tensor_data("c"), Err(GgufError::NoSuchTensor { .. })));
    }
}

#[test]
fn custom_alignment_is_honoured() {
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64);
    r.tensor("x", &[8], 0, 0);
    r.pad(64);
    for i in 0..8 {
        r.f32(i as f32);
    }
    let f = GgufFile::from_bytes(r.bytes, "aligned").unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.dequantize("x").unwrap()[7], 7.0);
}

/// The file written by llama.cpp's Python `gguf` package (see make_gguf_py_sample.py).
#[test]
fn reads_the_reference_python_writer() {
    let f = GgufFile::open(data_dir().join("gguf_py_sample.gguf")).unwrap();
    let md = f.metadata();
    assert_eq!(md.get("test.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(md.get("test.i8"), Some(&GgufValue::I8(-100)));
    assert_eq!(md.get("test.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(md.get("test.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(md.get("test.u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(md.get("test.i32"), Some(&GgufValue::I32(-2_000_000_000)));
    assert_eq!(md.get("test.f32"), Some(&GgufValue::F32(0.15625)));
    assert_eq!(md.get("test.u64"), Some(&GgufValue::U64((1 << 63) + 5)));
    assert_eq!(md.get("test.i64"), Some(&GgufValue::I64(-(1 << 62))));
    assert_eq!(md.get("test.f64"), Some(&GgufValue::F64(-1.0e300)));
    assert_eq!(md.get("test.bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(md.get_str("test.string"), Some("héllo ▁ 世界 🙂"));
    assert_eq!(md.get("test.arr_i32"), Some(&GgufValue::Array(GgufArray::I32(vec![1, -2, 3]))));
    assert_eq!(
        md.get("test.arr_str"),
        Some(&GgufValue::Array(GgufArray::String(vec!["a".into(), "".into(), "ü".into()])))
    );
    assert_eq!(md.get("test.arr_bool"), Some(&GgufValue::Array(GgufArray::Bool(vec![true, false, true]))));
    assert_eq!(
        md.get("test.arr_nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::I32(vec![1, 2]),
            GgufArray::I32(vec![3]),
            GgufArray::I32(vec![4, 5, 6]),
        ])))
    );
    assert_eq!(
        md.get("test.arr_nested_str"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::String(vec!["x".into(), "y".into()]),
            GgufArray::String(vec!["z".into()]),
        ])))
    );
    // Each quantized tensor X has X.ref, gguf-py's dequantization: ours must be identical.
    for name in ["bf16", "q8_0", "tq1_0", "tq2_0"] {
        let ours = f.dequantize(name).unwrap();
        let reference = f.dequantize(&format!("{name}.ref")).unwrap();
        assert_eq!(ours, reference, "{name}");
    }
    let tq = f.ternary_codes("tq2_0").unwrap();
    assert!(tq.codes.iter().all(|c| (-1..=1).contains(c)));
    assert_eq!(tq.scales.len(), 2);
    assert_eq!(f.tensor("q8_0").unwrap().shape(), &[64, 4]);
    assert_eq!(f.dequantize("f32").unwrap().len(), 192);
}

fn all_types_metadata() -> GgufMetadata {
    let mut md = GgufMetadata::new();
    md.insert("general.architecture", "bitnet".into());
    md.insert("u8", GgufValue::U8(1));
    md.insert("i8", GgufValue::I8(-1));
    md.insert("u16", GgufValue::U16(65535));
    md.insert("i16", GgufValue::I16(-32768));
    md.insert("u32", GgufValue::U32(u32::MAX));
    md.insert("i32", GgufValue::I32(i32::MIN));
    md.insert("f32", GgufValue::F32(f32::MIN_POSITIVE));
    md.insert("bool", GgufValue::Bool(false));
    md.insert("string", GgufValue::String(String::new()));
    md.insert("u64", GgufValue::U64(u64::MAX));
    md.insert("i64", GgufValue::I64(i64::MIN));
    md.insert("f64", GgufValue::F64(std::f64::consts::PI));
    md.insert("arr.u8", GgufArray::U8(vec![0, 255]).into());
    md.insert("arr.i8", GgufArray::I8(vec![-128, 127]).into());
    md.insert("arr.u16", GgufArray::U16(vec![1, 2]).into());
    md.insert("arr.i16", GgufArray::I16(vec![-1]).into());
    md.insert("arr.u32", GgufArray::U32(vec![]).into());
    md.insert("arr.i32", GgufArray::I32(vec![7; 100]).into());
    md.insert("arr.f32", GgufArray::F32(vec![0.5, -0.0]).into());
    md.insert("arr.bool", GgufArray::Bool(vec![true, false]).into());
    md.insert("arr.string", GgufArray::String(vec!["▁the".into(), "".into(), "🙂".into()]).into());
    md.insert("arr.u64", GgufArray::U64(vec![u64::MAX]).into());
    md.insert("arr.i64", GgufArray::I64(vec![i64::MIN]).into());
    md.insert("arr.f64", GgufArray::F64(vec![1e-300]).into());
    md.insert(
        "arr.nested",
        GgufArray::Array(vec![
            GgufArray::Array(vec![GgufArray::U8(vec![1]), GgufArray::String(vec![])]),
            GgufArray::F32(vec![2.0]),
            GgufArray::Array(vec![]),
        ])
        .into(),
    );
    md
}

#[test]
fn write_then_read_gives_the_same_metadata_and_bytes() {
    let dir = temp_dir("roundtrip");
    let ternary: Vec<i8> = (0..512).map(|i| (i % 3) as i8 - 1).collect();
    let tq2 = formats::tq2_0::pack(&ternary, &[0.5, 0.25]).unwrap();
    let tq1 = formats::tq1_0::pack(&ternary, &[1.0, 2.0]).unwrap();
    let f32s: Vec<f32> = (0..96).map(|i| i as f32 * 0.5 - 3.0).collect();
    let q8 = formats::quantize(GgmlType::Q8_0, &f32s).unwrap();
    let f16 = formats::quantize(GgmlType::F16, &f32s[..10]).unwrap();
    let f32b = formats::float::f32_to_bytes(&f32s[..3]);
    for (version, align) in [(3u32, None), (2, Some(64u32)), (3, Some(128))] {
        let mut md = all_types_metadata();
        if let Some(a) = align {
            md.insert("general.alignment", GgufValue::U32(a));
        }
        let tensors: Vec<(TensorSpec, &[u8])> = vec![
            (TensorSpec::new("tq2", GgmlType::TQ2_0, &[256, 2]), &tq2),
            (TensorSpec::new("odd.f32", GgmlType::F32, &[3]), &f32b),
            (TensorSpec::new("tq1", GgmlType::TQ1_0, &[512]), &tq1),
            (TensorSpec::new("q8", GgmlType::Q8_0, &[32, 3]), &q8),
            (TensorSpec::new("scalar.f16", GgmlType::F16, &[10, 1, 1, 1]), &f16),
            (TensorSpec::new("empty", GgmlType::F32, &[0]), &[]),
        ];
        let path = dir.join(format!("v{version}.gguf"));
        let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
        let mut w = GgufWriter::create_with(&path, &md, specs, WriterOptions { version }).unwrap();
        assert_eq!(w.dialect(), Dialect::Common);
        for (spec, data) in &tensors {
            assert_eq!(w.next_tensor(), Some(spec));
            w.write_tensor(&spec.name, data).unwrap();
        }
        assert_eq!(w.finish().unwrap(), path);

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.metadata(), &md);
        assert_eq!(f.alignment(), u64::from(align.unwrap_or(32)));
        assert_eq!(f.tensors().len(), tensors.len());
        for (info, (spec, data)) in f.tensors().iter().zip(&tensors) {
            assert_eq!(info.name(), spec.name);
            assert_eq!(info.shape(), &spec.shape[..]);
            assert_eq!(info.ggml_type(), spec.ggml_type);
            assert_eq!(info.offset() % f.alignment(), 0);
            assert_eq!(f.tensor_data(&spec.name).unwrap(), *data);
        }
        assert_eq!(f.ternary_codes("tq2").unwrap().codes, ternary);
        assert_eq!(f.ternary_codes("tq1").unwrap().codes, ternary);
        assert_eq!(f.bytes().len() as u64 % f.alignment(), 0);
    }
    // nothing but the finished files is left in the directory
    let mut names: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["v2.gguf", "v3.gguf"]);
}

#[test]
fn writer_refuses_to_leave_half_files() {
    let dir = temp_dir("plan");
    let md = GgufMetadata::new();
    let specs = vec![TensorSpec::new("a", GgmlType::F32, &[2]), TensorSpec::new("b", GgmlType::F32, &[2])];
    let path = dir.join("out.gguf");
    let mut w = GgufWriter::create(&path, &md, specs.clone()).unwrap();
    // out of order, wrong size, unknown
    assert!(matches!(w.write_tensor("b", &[0; 8]), Err(GgufError::Plan { .. })));
    assert!(matches!(w.write_tensor("a", &[0; 7]), Err(GgufError::Plan { .. })));
    w.write_tensor("a", &[0; 8]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("'b' is next"), "{err}");
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "temp file left behind");

    // a writer dropped half-way removes its temporary file
    let mut w = GgufWriter::create(&path, &md, specs.clone()).unwrap();
    w.write_tensor("a", &[1; 8]).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // streaming from a reader, short input
    let mut w = GgufWriter::create(&path, &md, specs).unwrap();
    w.write_tensor_from("a", &mut &[2u8; 8][..]).unwrap();
    assert!(w.write_tensor_from("b", &mut &[3u8; 5][..]).is_err());
    drop(w);
    assert!(!path.exists());

    // plans that cannot be written
    let bad = |specs: Vec<TensorSpec>| GgufWriter::create(dir.join("bad.gguf"), &md, specs).is_err();
    assert!(bad(vec![TensorSpec::new("q", GgmlType::Q8_0, &[31])]));
    assert!(bad(vec![TensorSpec::new("x", GgmlType::F32, &[1]), TensorSpec::new("x", GgmlType::F32, &[1])]));
    assert!(bad(vec![TensorSpec::new("x", GgmlType::F32, &[1, 1, 1, 1, 1])]));
    assert!(bad(vec![
        TensorSpec::new("i", GgmlType::I2_S, &[128]),
        TensorSpec::new("m", GgmlType::MXFP4, &[32])
    ]));
    let mut md2 = GgufMetadata::new();
    md2.insert("general.alignment", GgufValue::U32(48));
    assert!(GgufWriter::create(dir.join("bad.gguf"), &md2, vec![]).is_err());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

/// An I2_S file as bitnet.cpp writes it, built byte by byte: type id 36, `n/4 + 32` bytes.
fn bitnet_cpp_raw(arch: &str) -> Vec<u8> {
    let mut r = Raw::header(3, 2, 1);
    r.kv_str("general.architecture", arch);
    r.tensor("blk.0.ffn_up.weight", &[128, 2], 36, 0);
    r.tensor("blk.0.ffn_norm.weight", &[4], 0, 96);
    r.pad(32);
    // row 0: all +1 (code 2 -> 0xAA); row 1: all -1 (code 0)
    r.raw(&[0xAA; 32]).raw(&[0x00; 32]);
    r.f32(0.125).raw(&[0; 28]);
    for v in [1.0f32, 1.0, 1.0, 1.0] {
        r.f32(v);
    }
    r.bytes
}

#[test]
fn dialect_detection() {
    // type id 36 decides, whatever the architecture
    let f = GgufFile::from_bytes(bitnet_cpp_raw("llama"), "i2s").unwrap();
    assert_eq!(f.dialect(), Dialect::BitnetCpp);
    let t = f.tensor("blk.0.ffn_up.weight").unwrap();
    assert_eq!(t.ggml_type(), GgmlType::I2_S);
    assert_eq!(t.n_bytes(), 256 / 4 + 32);
    let codes = f.ternary_codes("blk.0.ffn_up.weight").unwrap();
    assert_eq!(&codes.codes[..128], &[1i8; 128][..]);
    assert_eq!(&codes.codes[128..], &[-1i8; 128][..]);
    assert_eq!(codes.scales, vec![0.125]);
    assert_eq!(f.dequantize("blk.0.ffn_up.weight").unwrap()[200], -0.125);

    // the architecture name bitnet-b1.58 alone
    let mut r = Raw::header(3, 0, 1);
    r.kv_str("general.architecture", "bitnet-b1.58");
    let f = GgufFile::from_bytes(r.bytes, "arch").unwrap();
    assert_eq!(f.dialect(), Dialect::BitnetCpp);

    // upstream's bitnet architecture with TQ2_0 is common ground
    let dir = temp_dir("dialect");
    let mut md = GgufMetadata::new();
    md.insert("general.architecture", "bitnet".into());
    let tq = formats::tq2_0::pack(&[0i8; 256], &[1.0]).unwrap();
    let p = dir.join("tq.gguf");
    write_gguf(&p, &md, &[(TensorSpec::new("w", GgmlType::TQ2_0, &[256]), &tq)]).unwrap();
    assert_eq!(GgufFile::open(&p).unwrap().dialect(), Dialect::Common);

    // id 39 is TL2 or MXFP4: the size decides
    let tl2 = vec![0u8; GgmlType::TL2.tensor_bytes(&[512, 4]).unwrap() as usize];
    let p = dir.join("tl2.gguf");
    let w = write_gguf(&p, &md, &[(TensorSpec::new("w", GgmlType::TL2, &[512, 4]), &tl2)]);
    w.unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!((f.dialect(), f.tensors()[0].type_id()), (Dialect::BitnetCpp, 39));
    assert_eq!(f.tensors()[0].ggml_type(), GgmlType::TL2);

    let mx = vec![0u8; GgmlType::MXFP4.tensor_bytes(&[512, 4]).unwrap() as usize];
    let p = dir.join("mxfp4.gguf");
    write_gguf(&p, &md, &[(TensorSpec::new("w", GgmlType::MXFP4, &[512, 4]), &mx)]).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!((f.dialect(), f.tensors()[0].type_id()), (Dialect::Upstream, 39));
    assert_eq!(f.tensors()[0].ggml_type(), GgmlType::MXFP4);

    // id 36 with id 40 contradicts: the verdict is bitnet.cpp, and id 40 is then an error
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[128], 36, 0).tensor("b", &[64], 40, 64);
    r.pad(32).raw(&[0u8; 128]);
    let err = GgufFile::from_bytes(r.bytes, "mixed").err().unwrap().to_string();
    assert!(err.contains("type id 40"), "{err}");

    // written I2_S round-trips and the writer picks bitnet.cpp ids
    let codes: Vec<i8> = (0..256).map(|i| (i % 3) as i8 - 1).collect();
    let data = i2_s::pack(&codes, 0.75).unwrap();
    let p = dir.join("i2s.gguf");
    write_gguf(&p, &md, &[(TensorSpec::new("w", GgmlType::I2_S, &[128, 2]), &data)]).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.tensors()[0].type_id(), 36);
    assert_eq!(f.ternary_codes("w").unwrap().codes, codes);
}

#[test]
fn group_scaled_ternary_types_and_prism_dialects() {
    let dir = temp_dir("prism");
    let mut md = GgufMetadata::new();
    md.insert("general.architecture", "qwen3".into());
    let codes: Vec<i8> = (0..512).map(|i| (i * 7 % 3) as i8 - 1).collect();
    let signs: Vec<i8> = (0..512).map(|i| if i % 5 == 0 { -1 } else { 1 }).collect();
    let q2 = formats::pack_ternary(GgmlType::Q2_0, &codes, &[0.5; 8]).unwrap();
    let q1 = formats::pack_ternary(GgmlType::Q1_0, &signs, &[0.25; 4]).unwrap();
    let pq2 = formats::pack_ternary(GgmlType::PQ2_0, &codes, &[0.5, 1.0, 1.5, 2.0]).unwrap();
    let ptq1 = formats::pack_ternary(GgmlType::PTQ1_0, &codes, &[0.5, 1.0, 1.5, 2.0]).unwrap();

    // Upstream's Q1_0 and Q2_0: ids 41 and 42.
    let p = dir.join("q.gguf");
    let specs = [
        (TensorSpec::new("q2", GgmlType::Q2_0, &[256, 2]), &q2[..]),
        (TensorSpec::new("q1", GgmlType::Q1_0, &[256, 2]), &q1[..]),
    ];
    write_gguf(&p, &md, &specs).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.dialect(), Dialect::Upstream);
    assert_eq!((f.tensors()[0].type_id(), f.tensors()[1].type_id()), (42, 41));
    assert_eq!(f.ternary_codes("q2").unwrap().codes, codes);
    assert_eq!(f.ternary_codes("q1").unwrap().codes, signs);
    assert_eq!(f.ternary_codes("q1").unwrap().block_len, 128);

    // PrismML's PQ2_0 and PTQ1_0: ids 142 and 143, beside upstream's.
    let p = dir.join("prism.gguf");
    let specs = [
        (TensorSpec::new("pq2", GgmlType::PQ2_0, &[256, 2]), &pq2[..]),
        (TensorSpec::new("ptq1", GgmlType::PTQ1_0, &[256, 2]), &ptq1[..]),
        (TensorSpec::new("q2", GgmlType::Q2_0, &[256, 2]), &q2[..]),
    ];
    write_gguf(&p, &md, &specs).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.dialect(), Dialect::Prism, "{}", f.dialect_reason());
    let ids: Vec<u32> = f.tensors().iter().map(|t| t.type_id()).collect();
    assert_eq!(ids, [142, 143, 42]);
    for name in ["pq2", "ptq1"] {
        let t = f.ternary_codes(name).unwrap();
        assert_eq!(
            (t.codes.as_slice(), t.scales.as_slice()),
            (&codes[..], &[0.5, 1.0, 1.5, 2.0][..]),
            "{name}"
        );
    }
    assert_eq!(f.tensor("q2").unwrap().ggml_type(), GgmlType::Q2_0);

    // PrismML's first files: id 42 with PQ2_0's group-128 layout, told apart by its size.
    let n = 4096usize;
    let big: Vec<i8> = (0..n).map(|i| (i * 5 % 3) as i8 - 1).collect();
    let data = formats::pack_ternary(GgmlType::PQ2_0, &big, &vec![0.75; n / 128]).unwrap();
    let mut r = Raw::header(3, 2, 0);
    r.tensor("blk.0.ffn_up.weight", &[1024, 4], 42, 0).tensor("norm", &[4], 0, data.len() as u64);
    r.pad(32).raw(&data);
    for v in [1.0f32; 4] {
        r.f32(v);
    }
    let f = GgufFile::from_bytes(r.bytes, "early-bonsai").unwrap();
    assert_eq!(f.dialect(), Dialect::PrismQ2g128, "{}", f.dialect_reason());
    assert_eq!(f.tensors()[0].ggml_type(), GgmlType::PQ2_0);
    assert_eq!(f.ternary_codes("blk.0.ffn_up.weight").unwrap().codes, big);

    // bitnet.cpp's types cannot share a file with PrismML's.
    let i2s = i2_s::pack(&codes, 0.5).unwrap();
    let specs = [
        (TensorSpec::new("a", GgmlType::I2_S, &[256, 2]), &i2s[..]),
        (TensorSpec::new("b", GgmlType::PQ2_0, &[256, 2]), &pq2[..]),
    ];
    let err = write_gguf(dir.join("mixed.gguf"), &md, &specs).err().unwrap().to_string();
    assert!(err.contains("PQ2_0") && err.contains("no GGUF dialect"), "{err}");
}

#[test]
fn inspect_summarizes() {
    let f = GgufFile::open(data_dir().join("gguf_py_sample.gguf")).unwrap();
    let s = inspect(f.header());
    assert!(s.starts_with("GGUF v3 file"), "{s}");
    assert!(s.contains("dialect: common"), "{s}");
    assert!(s.contains("test.arr_nested"), "{s}");
    assert!(s.contains("array<array>[3]"), "{s}");
    assert!(s.contains("tq2_0"), "{s}");
    assert!(s.contains("TQ2_0   [256, 2]  132 bytes"), "{s}");

    let mut md = GgufMetadata::new();
    md.insert("tokens", GgufArray::String((0..1000).map(|i| format!("t{i}")).collect()).into());
    md.insert("template", "x".repeat(1000).into());
    let dir = temp_dir("inspect");
    let p = dir.join("a.gguf");
    write_gguf(&p, &md, &[]).unwrap();
    let s = GgufFile::open(&p).unwrap().inspect();
    assert!(s.contains("\"t7\", … 992 more]"), "{s}");
    assert!(s.contains("… (1000 chars)"), "{s}");
    assert!(s.lines().all(|l| l.len() < 400), "{s}");
}
