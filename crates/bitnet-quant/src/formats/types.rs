//! The ggml tensor types: names, block geometry and byte sizes.
//!
//! The numeric type ids differ between upstream llama.cpp and the bitnet.cpp fork from id 36 on,
//! so this enum carries no id: the GGUF reader maps ids to types knowing the file's dialect.

use std::fmt;

/// A ggml tensor element type, as stored in GGUF files.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    /// Upstream only (id 39).
    MXFP4,
    /// Upstream only (id 40).
    NVFP4,
    /// Upstream (id 41): 1-bit, `±d` with one f16 `d` per 128 weights.
    Q1_0,
    /// Upstream (id 42): 2-bit codes for `{-1, 0, +1, +2}·d`, one f16 `d` per 64 weights.
    Q2_0,
    /// PrismML's fork only (id 142): Q2_0's codes with one f16 `d` per 128 weights.
    PQ2_0,
    /// PrismML's fork only (id 143): TQ1_0's base-3 packing in blocks of 128 with one f16 `d`.
    PTQ1_0,
    /// bitnet.cpp only (id 36): 2-bit ternary codes, one f32 scale per tensor.
    I2_S,
    /// bitnet.cpp only (id 37): its int8 activation type, never stored in files.
    I8_S,
    /// bitnet.cpp only (id 38): LUT layout for ARM, tiled per model shape.
    TL1,
    /// bitnet.cpp only (id 39): LUT layout for x86, tiled per model shape.
    TL2,
}

impl GgmlType {
    /// All types, for tables and tests.
    pub const ALL: [GgmlType; 41] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
        GgmlType::Q2_0,
        GgmlType::PQ2_0,
        GgmlType::PTQ1_0,
        GgmlType::I2_S,
        GgmlType::I8_S,
        GgmlType::TL1,
        GgmlType::TL2,
    ];

    /// The name llama.cpp prints (`ggml_type_name`, upper case).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
            Q2_0 => "Q2_0",
            PQ2_0 => "PQ2_0",
            PTQ1_0 => "PTQ1_0",
            I2_S => "I2_S",
            I8_S => "I8_S",
            TL1 => "TL1",
            TL2 => "TL2",
        }
    }

    /// `(elements per block, bytes per block)`, as `ggml_blck_size` / `ggml_type_size`.
    ///
    /// The bitnet.cpp types report `(1, 1)` like the fork does; their real sizes are not
    /// per-element and come from [`GgmlType::tensor_bytes`].
    pub fn block_geometry(self) -> (u64, u64) {
        use GgmlType::*;
        const QK_K: u64 = 256;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2_K => (QK_K, 84),
            Q3_K => (QK_K, 110),
            Q4_K => (QK_K, 144),
            Q5_K => (QK_K, 176),
            Q6_K => (QK_K, 210),
            Q8_K => (QK_K, 292),
            IQ2_XXS => (QK_K, 66),
            IQ2_XS => (QK_K, 74),
            IQ3_XXS => (QK_K, 98),
            IQ1_S => (QK_K, 50),
            IQ4_NL => (32, 18),
            IQ3_S => (QK_K, 110),
            IQ2_S => (QK_K, 82),
            IQ4_XS => (QK_K, 136),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (QK_K, 56),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 54),
            TQ2_0 => (QK_K, 66),
            MXFP4 => (32, 17),
            NVFP4 => (64, 36),
            Q1_0 => (128, 18),
            Q2_0 => (64, 18),
            PQ2_0 => (128, 34),
            PTQ1_0 => (128, 28),
            I2_S | I8_S | TL1 | TL2 => (1, 1),
        }
    }

    /// Bytes of a tensor of this type and shape (`shape[0]` is the innermost, row, dimension,
    /// ggml's `ne[0]`). `None` when the shape is not valid for the type (a row that is not a
    /// multiple of the block, a TL2 row shorter than 256) or the size overflows `u64`.
    ///
    /// The bitnet.cpp types follow the fork's patched `ggml_nbytes`: I2_S and TL1 are
    /// `n/4 + 32` (2 bits per weight, then a 32-byte tail holding the f32 scale); TL2 is
    /// `(ne0-256)*ne1/3*5/8 + 256*ne1/2*4/8`, rounded up to 32, plus 32.
    pub fn tensor_bytes(self, shape: &[u64]) -> Option<u64> {
        let n = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        let (block, size) = self.block_geometry();
        match self {
            GgmlType::I2_S | GgmlType::TL1 => {
                if n % 4 != 0 {
                    return None;
                }
                (n / 4).checked_add(32)
            }
            GgmlType::TL2 => {
                let ne0 = *shape.first()?;
                let ne1 = shape.get(1).copied().unwrap_or(1);
                if ne0 < 256 {
                    return None;
                }
                let a = (ne0 - 256).checked_mul(ne1)? / 3 * 5 / 8;
                let b = 256u64.checked_mul(ne1)? / 2 * 4 / 8;
                let bytes = a.checked_add(b)?;
                bytes.checked_next_multiple_of(32)?.checked_add(32)
            }
            GgmlType::I8_S => n.checked_mul(size),
            _ => {
                let row = shape.first().copied().unwrap_or(1);
                if row % block != 0 {
                    return None;
                }
                (n / block).checked_mul(size)
            }
        }
    }

    /// True for the formats that hold ternary weights ({-1, 0, +1} times a scale), Q1_0's
    /// `±d` (ternary codes without the 0) and Q2_0's codes (whose fourth code, `+2`, no
    /// ternary quantizer writes) included.
    pub fn is_ternary(self) -> bool {
        use GgmlType::*;
        matches!(self, TQ1_0 | TQ2_0 | I2_S | TL1 | TL2 | Q1_0 | Q2_0 | PQ2_0 | PTQ1_0)
    }

    /// The weights that share one scale in a ternary format whose scales vary along a row
    /// (`None` for the others: I2_S, TL1 and TL2 have one scale per tensor).
    pub fn ternary_group(self) -> Option<usize> {
        use GgmlType::*;
        match self {
            TQ1_0 | TQ2_0 => Some(256),
            Q1_0 | PQ2_0 | PTQ1_0 => Some(128),
            Q2_0 => Some(64),
            _ => None,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
