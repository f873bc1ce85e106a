//! Damaged and lying GGUF files: each must be an error, never a panic, a hang or an
//! allocation the file cannot back.

mod gguf_support;

use bitnet_models::gguf::{GgufError, GgufFile, GgufHeader, GgufMetadata, GgufValue};
use bitnet_quant::formats::{self, GgmlType};
use gguf_support::{temp_dir, Raw};
use rand::{Rng, SeedableRng};

const HUGE: u64 = 1 << 63;

/// A valid file with metadata of several kinds and three tensors whose data ends exactly at
/// the end of the file (no trailing padding, so every truncation cuts something needed).
fn valid_file() -> Vec<u8> {
    let mut md = GgufMetadata::new();
    md.insert("general.architecture", "llama".into());
    md.insert("general.name", "damaged".into());
    md.insert(
        "tokenizer.ggml.tokens",
        bitnet_models::gguf::GgufArray::String((0..20).map(|i| format!("tok{i}")).collect()).into(),
    );
    md.insert("llama.block_count", GgufValue::U32(1));
    let dir = temp_dir("damaged");
    let path = dir.join("valid.gguf");
    let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
    let q8 = formats::quantize(GgmlType::Q8_0, &x).unwrap();
    let tq2 = formats::quantize(GgmlType::TQ2_0, &x).unwrap();
    let f32s = formats::float::f32_to_bytes(&x[..32]);
    use bitnet_models::gguf::{write_gguf, TensorSpec};
    write_gguf(
        &path,
        &md,
        &[
            (TensorSpec::new("q8", GgmlType::Q8_0, &[256]), &q8),
            (TensorSpec::new("tq2", GgmlType::TQ2_0, &[256]), &tq2),
            (TensorSpec::new("f32", GgmlType::F32, &[32]), &f32s),
        ],
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // the last tensor is 128 bytes: a multiple of the alignment, so no padding follows it
    let f = GgufFile::from_bytes(bytes.clone(), "valid").unwrap();
    let last = f.tensor("f32").unwrap();
    assert_eq!(f.data_offset() + last.offset() + last.n_bytes(), bytes.len() as u64);
    bytes
}

/// Parses and, when that succeeds, reads every tensor both ways; must not panic.
fn exercise(bytes: Vec<u8>) -> Result<(), GgufError> {
    let f = GgufFile::from_bytes(bytes, "damaged")?;
    for t in f.tensors() {
        let _ = f.tensor_data(t.name())?;
        let _ = f.dequantize(t.name());
        let _ = f.ternary_codes(t.name());
    }
    let _ = f.inspect();
    Ok(())
}

#[test]
fn truncation_at_50_random_points() {
    let bytes = valid_file();
    let mut rng = rand::rngs::StdRng::seed_from_u64(50);
    let mut cuts: Vec<usize> = (0..46).map(|_| rng.random_range(0..bytes.len())).collect();
    cuts.extend([0, 3, 4, bytes.len() - 1]);
    for cut in cuts {
        let r = exercise(bytes[..cut].to_vec());
        assert!(r.is_err(), "truncated at {cut} of {} parsed", bytes.len());
        let msg = r.unwrap_err().to_string();
        assert!(msg.starts_with("damaged: "), "{msg}");
    }
}

#[test]
fn random_header_byte_flips_do_not_panic() {
    let bytes = valid_file();
    let header_len = GgufFile::from_bytes(bytes.clone(), "v").unwrap().data_offset() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut errors = 0;
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..header_len);
            b[i] ^= 1 << rng.random_range(0..8);
        }
        errors += usize::from(exercise(b).is_err());
    }
    // most flips break something; the point is that none panicked
    assert!(errors > 500, "only {errors} of 2000 flips were errors");
}

/// Offsets of the fields of a hand-built file, to overwrite them with absurd values.
struct Layout {
    bytes: Vec<u8>,
    n_tensors_at: usize,
    n_kv_at: usize,
    key_len_at: usize,
    str_len_at: usize,
    arr_count_at: usize,
    name_len_at: usize,
    n_dims_at: usize,
    dim0_at: usize,
    dim1_at: usize,
    type_at: usize,
    offset_at: usize,
}

fn layout() -> Layout {
    let mut r = Raw::header(3, 1, 2);
    let key_len_at = r.len();
    r.string("general.name").u32(8);
    let str_len_at = r.len();
    r.string("x");
    r.string("arr").u32(9).u32(4);
    let arr_count_at = r.len();
    r.u64(2).u32(1).u32(2);
    let name_len_at = r.len();
    r.string("t").u32(2);
    let n_dims_at = name_len_at + 8 + 1;
    let dim0_at = r.len();
    r.u64(4);
    let dim1_at = r.len();
    r.u64(2);
    let type_at = r.len();
    r.u32(0);
    let offset_at = r.len();
    r.u64(0);
    r.pad(32).raw(&[0u8; 32]);
    Layout {
        bytes: r.bytes,
        n_tensors_at: 8,
        n_kv_at: 16,
        key_len_at,
        str_len_at,
        arr_count_at,
        name_len_at,
        n_dims_at,
        dim0_at,
        dim1_at,
        type_at,
        offset_at,
    }
}

fn with_u64(b: &[u8], at: usize, v: u64) -> Vec<u8> {
    let mut b = b.to_vec();
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b
}

fn with_u32(b: &[u8], at: usize, v: u32) -> Vec<u8> {
    let mut b = b.to_vec();
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    b
}

/// Parses `bytes`, which must fail with a message containing `needle`.
fn fails(what: &str, bytes: Vec<u8>, needle: &str) {
    match GgufHeader::parse(&bytes, "lie.gguf") {
        Ok(_) => panic!("{what}: parsed"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("lie.gguf: "), "{what}: {msg}");
            assert!(msg.contains(needle), "{what}: {msg} (wanted {needle:?})");
        }
    }
}

#[test]
fn absurd_counts_lengths_dims_and_offsets() {
    let l = layout();
    let b = &l.bytes;
    GgufHeader::parse(b, "lie.gguf").expect("the base file is valid");

    for v in [HUGE, u64::MAX, 1 << 40, 1000] {
        fails("tensor count", with_u64(b, l.n_tensors_at, v), "tensor");
        fails("kv count", with_u64(b, l.n_kv_at, v), "metadata");
        fails("key length", with_u64(b, l.key_len_at, v), "metadata[0] key length");
        fails("string length", with_u64(b, l.str_len_at, v), "'general.name' length");
        fails("array count", with_u64(b, l.arr_count_at, v), "'arr' count");
        fails("tensor name length", with_u64(b, l.name_len_at, v), "tensor[0] name length");
        fails("offset", with_u64(b, l.offset_at, v), "offset");
    }
    for v in [HUGE, u64::MAX, 1 << 40] {
        fails("dims[0]", with_u64(b, l.dim0_at, v), "tensor[0] 't'");
    }
    // 2^32 × 2^32 overflows i64
    let b2 = with_u64(&with_u64(b, l.dim0_at, 1 << 32), l.dim1_at, 1 << 32);
    fails("dims product", b2, "overflow");
    fails("n_dims", with_u32(b, l.n_dims_at, 1 << 31), "n_dims");
    fails("n_dims 5", with_u32(b, l.n_dims_at, 5), "at most 4");
    fails("type id", with_u32(b, l.type_at, 1000), "type id 1000");
    fails("removed type id", with_u32(b, l.type_at, 4), "type id 4");
    fails("misaligned offset", with_u64(b, l.offset_at, 8), "alignment");
    fails("value type", with_u32(b, l.key_len_at + 8 + 12, 99), "unknown value type 99");
    fails("array element type", with_u32(b, l.arr_count_at - 4, 77), "unknown value type 77");
    fails("version 1", with_u32(b, 4, 1), "version 1");
    fails("big endian", with_u32(b, 4, 3u32.swap_bytes()), "big-endian");
    fails("magic", [b"GGML", &b[4..]].concat(), "not a GGUF file");
    fails("empty", Vec::new(), "not a GGUF file");
    // f32 [4, 2] at offset 0 needs 32 bytes; the file has 32 after the header
    let mut short = b.clone();
    short.truncate(b.len() - 1);
    fails("data past end", short, "past the end");
}

#[test]
fn inconsistent_metadata_and_tensors() {
    // duplicate key
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("a", 1).kv_u32("a", 2);
    fails("duplicate key", r.bytes, "duplicate key 'a'");
    // empty key
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("", 1);
    fails("empty key", r.bytes, "empty key");
    // invalid UTF-8 in a string
    let mut r = Raw::header(3, 0, 1);
    r.string("k").u32(8).u64(2).raw(&[0xC3, 0x28]);
    fails("utf8", r.bytes, "not UTF-8");
    // bool that is neither 0 nor 1
    let mut r = Raw::header(3, 0, 1);
    r.string("k").u32(7).u8(2);
    fails("bool", r.bytes, "bool byte is 2");
    // alignment that is not a power of two, and of the wrong type
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("general.alignment", 48);
    fails("alignment 48", r.bytes, "general.alignment");
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("general.alignment", 0);
    fails("alignment 0", r.bytes, "general.alignment");
    let mut r = Raw::header(3, 0, 1);
    r.kv_str("general.alignment", "32");
    fails("alignment string", r.bytes, "general.alignment");
    // duplicate tensor names
    let mut r = Raw::header(3, 2, 0);
    r.tensor("t", &[1], 0, 0).tensor("t", &[1], 0, 32);
    r.pad(32).raw(&[0u8; 64]);
    fails("duplicate tensor", r.bytes, "duplicate tensor name 't'");
    // row not a multiple of the block
    let mut r = Raw::header(3, 1, 0);
    r.tensor("q", &[33], 8, 0).pad(32).raw(&[0u8; 64]);
    fails("block", r.bytes, "does not fit type Q8_0");
    // I2_S whose n/4 + 32 bytes are not there
    let mut r = Raw::header(3, 1, 0);
    r.tensor("i", &[1024], 36, 0).pad(32).raw(&[0u8; 256]);
    fails("i2_s size", r.bytes, "past the end");
    // arrays nested past the limit
    let mut r = Raw::header(3, 0, 1);
    r.string("deep").u32(9);
    for _ in 0..40 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    fails("nesting", r.bytes, "nested deeper");
    // an array of 2^60 empty arrays (12 bytes each could never fit)
    let mut r = Raw::header(3, 0, 1);
    r.string("wide").u32(9).u32(9).u64(1 << 60);
    fails("wide", r.bytes, "cannot fit");
}

#[test]
fn a_lying_file_on_disk_is_an_error_with_its_path() {
    let dir = temp_dir("disk");
    let p = dir.join("liar.gguf");
    std::fs::write(&p, with_u64(&layout().bytes, 8, HUGE)).unwrap();
    let msg = GgufFile::open(&p).err().unwrap().to_string();
    assert!(msg.contains("liar.gguf"), "{msg}");
    assert!(msg.contains("tensor count at offset 8"), "{msg}");
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(GgufFile::open(&empty).is_err());
    assert!(matches!(GgufFile::open(dir.join("missing.gguf")), Err(GgufError::Io { .. })));
}

#[test]
fn a_tensor_count_one_too_high_is_an_error_not_a_phantom_tensor() {
    // One tensor written, two announced: the second would be read out of the zero padding.
    let mut r = Raw::header(3, 2, 0);
    r.tensor("t", &[8], 0, 0).pad(32).raw(&[0u8; 96]);
    fails("count one too high", r.bytes, "tensor[1] name at offset");
    let mut r = Raw::header(3, 2, 0);
    r.tensor("t", &[8], 0, 0).pad(32).raw(&[0u8; 96]);
    fails("count one too high", r.bytes, "empty name");
}

#[test]
fn a_wrong_magic_is_shown_as_text_and_hex() {
    let b = layout().bytes;
    fails("magic", [b"GGUX", &b[4..]].concat(), "the magic at offset 0 is \"GGUX\" (47 47 55 58)");
    fails("binary magic", [&[0u8, 1, 0x7f, b'G'][..], &b[4..]].concat(), "\"...G\" (00 01 7f 47)");
    fails("empty", Vec::new(), "the magic at offset 0 is empty");
}
