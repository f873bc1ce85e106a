//! Which engine's numbering of tensor types a file uses.
//!
//! Upstream llama.cpp and the bitnet.cpp fork agree on type ids 0..=35 (TQ1_0 = 34,
//! TQ2_0 = 35) and then diverge: the fork has I2_S = 36, I8_S = 37, TL1 = 38, TL2 = 39;
//! upstream left 36..=38 unused in files (the removed IQ4_NL_4_x repack types) and went on
//! with MXFP4 = 39, NVFP4 = 40, Q1_0 = 41, Q2_0 = 42. PrismML's fork (Ternary-Bonsai) numbers
//! like upstream and adds PQ2_0 = 142 and PTQ1_0 = 143, ids no other engine uses; its first
//! Ternary-Bonsai files, written before upstream's group-64 Q2_0, stored id 42 with PQ2_0's
//! group-128 layout. A file says nothing about which numbering it uses, so the reader infers
//! it. The rule, first match wins:
//!
//! 1. a tensor of type id 36, 37 or 38: **bitnet.cpp** (upstream never writes these ids);
//! 2. a tensor of type id 142 or 143: **PrismML**;
//! 3. a tensor of type id 42 that has the room of PQ2_0's layout and not of Q2_0's:
//!    **PrismML's first files** (id 42 read as PQ2_0);
//! 4. a tensor of type id 40, 41 or 42: **upstream** (bitnet.cpp's ids end at 39; this
//!    engine writes such files under any architecture, `bitnet-b1.58` included);
//! 5. `general.architecture` = `bitnet-b1.58`: **bitnet.cpp** (only its converter, and this
//!    engine's, write that architecture; upstream's BitNet architecture is `bitnet`);
//! 6. a tensor of type id 39, TL2 or MXFP4: the one whose byte size fits the room the
//!    tensor has in the data section (up to the next tensor, or the end, less alignment
//!    padding); if both or neither fit, `general.architecture` = `bitnet` means
//!    **bitnet.cpp**, anything else **upstream**;
//! 7. `general.file_type` = 40 (bitnet.cpp's `LLAMA_FTYPE_MOSTLY_I2_S`; upstream's file
//!    types end at 39): **bitnet.cpp**;
//! 8. otherwise **common**: only ids up to 35, which both engines read alike.
//!
//! A contradictory file (say ids 36 and 40) gets the first verdict and then fails on the
//! type id that verdict does not know, with a message naming the tensor.

use super::value::GgufMetadata;
use bitnet_quant::formats::GgmlType;
use std::fmt;

/// The numbering of tensor types a file was written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Upstream llama.cpp (ggml-org), including its MXFP4/NVFP4/Q1_0/Q2_0 ids.
    Upstream,
    /// microsoft/BitNet's fork: I2_S = 36, I8_S = 37, TL1 = 38, TL2 = 39.
    BitnetCpp,
    /// PrismML's llama.cpp fork: upstream's numbering plus PQ2_0 = 142, PTQ1_0 = 143.
    Prism,
    /// PrismML's first Ternary-Bonsai files: id 42 holds PQ2_0's group-128 layout (read only;
    /// the writer writes such tensors as PQ2_0 under [`Dialect::Prism`]).
    PrismQ2g128,
    /// Only type ids up to 35, which mean the same in both.
    Common,
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Upstream => "upstream llama.cpp",
            Dialect::BitnetCpp => "bitnet.cpp",
            Dialect::Prism => "PrismML llama.cpp",
            Dialect::PrismQ2g128 => "early PrismML (Q2_0 in groups of 128)",
            Dialect::Common => "common",
        })
    }
}

/// The types both dialects number alike, by id; `None` for ids removed from GGUF files.
fn common_type(id: u32) -> Option<GgmlType> {
    use GgmlType::*;
    Some(match id {
        0 => F32,
        1 => F16,
        2 => Q4_0,
        3 => Q4_1,
        6 => Q5_0,
        7 => Q5_1,
        8 => Q8_0,
        9 => Q8_1,
        10 => Q2_K,
        11 => Q3_K,
        12 => Q4_K,
        13 => Q5_K,
        14 => Q6_K,
        15 => Q8_K,
        16 => IQ2_XXS,
        17 => IQ2_XS,
        18 => IQ3_XXS,
        19 => IQ1_S,
        20 => IQ4_NL,
        21 => IQ3_S,
        22 => IQ2_S,
        23 => IQ4_XS,
        24 => I8,
        25 => I16,
        26 => I32,
        27 => I64,
        28 => F64,
        29 => IQ1_M,
        30 => BF16,
        34 => TQ1_0,
        35 => TQ2_0,
        _ => return None,
    })
}

/// The type of id `id` in `dialect`, or `None` if that dialect has no such type.
pub fn type_from_id(id: u32, dialect: Dialect) -> Option<GgmlType> {
    if let Some(t) = common_type(id) {
        return Some(t);
    }
    match (dialect, id) {
        (Dialect::BitnetCpp, 36) => Some(GgmlType::I2_S),
        (Dialect::BitnetCpp, 37) => Some(GgmlType::I8_S),
        (Dialect::BitnetCpp, 38) => Some(GgmlType::TL1),
        (Dialect::BitnetCpp, 39) => Some(GgmlType::TL2),
        (Dialect::PrismQ2g128, 42) => Some(GgmlType::PQ2_0),
        (Dialect::Upstream | Dialect::Common | Dialect::Prism | Dialect::PrismQ2g128, 39) => {
            Some(GgmlType::MXFP4)
        }
        (Dialect::Upstream | Dialect::Common | Dialect::Prism | Dialect::PrismQ2g128, 40) => {
            Some(GgmlType::NVFP4)
        }
        (Dialect::Upstream | Dialect::Common | Dialect::Prism | Dialect::PrismQ2g128, 41) => {
            Some(GgmlType::Q1_0)
        }
        (Dialect::Upstream | Dialect::Common | Dialect::Prism, 42) => Some(GgmlType::Q2_0),
        (Dialect::Prism, 142) => Some(GgmlType::PQ2_0),
        (Dialect::Prism, 143) => Some(GgmlType::PTQ1_0),
        _ => None,
    }
}

/// The id of `ty` in `dialect`, or `None` if that dialect cannot store it.
pub fn type_id(ty: GgmlType, dialect: Dialect) -> Option<u32> {
    (0..=143).find(|&id| type_from_id(id, dialect) == Some(ty))
}

/// The dialect a set of types needs: `BitnetCpp` for bitnet.cpp-only types, `Prism` for
/// PrismML-only ones (which it numbers alongside upstream's), `Upstream` for upstream-only ones,
/// `Common` when none; `None` when bitnet.cpp types meet upstream or PrismML ones.
pub fn dialect_for_types(types: impl IntoIterator<Item = GgmlType>) -> Option<Dialect> {
    let (mut bitnet, mut upstream, mut prism) = (false, false, false);
    for t in types {
        bitnet |= matches!(t, GgmlType::I2_S | GgmlType::I8_S | GgmlType::TL1 | GgmlType::TL2);
        upstream |= matches!(t, GgmlType::MXFP4 | GgmlType::NVFP4 | GgmlType::Q1_0 | GgmlType::Q2_0);
        prism |= matches!(t, GgmlType::PQ2_0 | GgmlType::PTQ1_0);
    }
    match (bitnet, upstream, prism) {
        (true, false, false) => Some(Dialect::BitnetCpp),
        (true, _, _) => None,
        (false, _, true) => Some(Dialect::Prism),
        (false, true, false) => Some(Dialect::Upstream),
        (false, false, false) => Some(Dialect::Common),
    }
}

/// What the dialect rule needs to know of one tensor.
pub(crate) struct RawTensor<'a> {
    pub name: &'a str,
    pub type_id: u32,
    pub shape: &'a [u64],
    /// Bytes from the tensor's offset to the next tensor's offset or the end of the data.
    pub room: Option<u64>,
}

/// Applies the rule of the module doc. Returns the dialect and the evidence, in words.
pub(crate) fn detect(
    metadata: &GgufMetadata,
    tensors: &[RawTensor<'_>],
    alignment: u64,
) -> (Dialect, String) {
    let arch = metadata.get_str("general.architecture").unwrap_or("");

    if let Some(t) = tensors.iter().find(|t| (36..=38).contains(&t.type_id)) {
        return (
            Dialect::BitnetCpp,
            format!("tensor '{}' has type id {}, which only bitnet.cpp writes", t.name, t.type_id),
        );
    }
    if let Some(t) = tensors.iter().find(|t| t.type_id == 142 || t.type_id == 143) {
        return (
            Dialect::Prism,
            format!("tensor '{}' has type id {}, which only PrismML's llama.cpp fork has", t.name, t.type_id),
        );
    }
    let fits = |t: &RawTensor<'_>, ty: GgmlType| match (ty.tensor_bytes(t.shape), t.room) {
        (Some(size), Some(room)) => size <= room && room - size < alignment.max(1),
        _ => false,
    };
    if let Some(t) =
        tensors.iter().find(|t| t.type_id == 42 && fits(t, GgmlType::PQ2_0) && !fits(t, GgmlType::Q2_0))
    {
        return (
            Dialect::PrismQ2g128,
            format!(
                "tensor '{}' (type id 42) has the size of PrismML's group-128 Q2_0, not of upstream's \
                 group-64 Q2_0",
                t.name
            ),
        );
    }
    if let Some(t) = tensors.iter().find(|t| (40..=42).contains(&t.type_id)) {
        return (
            Dialect::Upstream,
            format!("tensor '{}' has type id {}, which only upstream llama.cpp has", t.name, t.type_id),
        );
    }
    if arch == "bitnet-b1.58" {
        return (Dialect::BitnetCpp, "architecture 'bitnet-b1.58' is written only by bitnet.cpp".into());
    }
    if let Some(t) = tensors.iter().find(|t| t.type_id == 39) {
        let fits = |ty: GgmlType| match (ty.tensor_bytes(t.shape), t.room) {
            (Some(size), Some(room)) => size <= room && room - size < alignment.max(1),
            _ => false,
        };
        let (tl2, mxfp4) = (fits(GgmlType::TL2), fits(GgmlType::MXFP4));
        return match (tl2, mxfp4) {
            (true, false) => {
                (Dialect::BitnetCpp, format!("tensor '{}' (type id 39) has the size of TL2", t.name))
            }
            (false, true) => {
                (Dialect::Upstream, format!("tensor '{}' (type id 39) has the size of MXFP4", t.name))
            }
            _ if arch == "bitnet" => (
                Dialect::BitnetCpp,
                format!("tensor '{}' has type id 39 (TL2 or MXFP4) and the architecture is 'bitnet'", t.name),
            ),
            _ => (
                Dialect::Upstream,
                format!("tensor '{}' has type id 39 (TL2 or MXFP4) and the architecture is '{arch}'", t.name),
            ),
        };
    }
    if metadata.get_u64("general.file_type") == Some(40) {
        return (Dialect::BitnetCpp, "general.file_type 40 is bitnet.cpp's MOSTLY_I2_S".into());
    }
    (Dialect::Common, "all tensor type ids are 35 or lower, which both dialects read alike".into())
}
