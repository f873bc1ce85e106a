//! Synthetic checkpoints: real BitNet shapes with random ternary weights, written in the HF
//! packed form with a stand-in tokenizer, so that speed can be measured with no download.

use std::path::Path;

use half::bf16;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use crate::temp_file::TempFile;
use crate::ModelError;

/// The shapes of a published model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SynthShape {
    pub name: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// `bitnet` (ReLU², sub-norms, tied) or `llama` (SiLU, no sub-norms, untied).
    pub llama: bool,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
}

pub const SHAPES: [SynthShape; 6] = [
    // microsoft/bitnet-b1.58-2B-4T
    SynthShape {
        name: "2b4t",
        vocab_size: 128256,
        hidden_size: 2560,
        intermediate_size: 6912,
        num_layers: 30,
        num_heads: 20,
        num_kv_heads: 5,
        llama: false,
        rope_theta: 500000.0,
        max_position_embeddings: 4096,
    },
    // 1bitLLM/bitnet_b1_58-large
    SynthShape {
        name: "large",
        vocab_size: 32002,
        hidden_size: 1536,
        intermediate_size: 4096,
        num_layers: 24,
        num_heads: 16,
        num_kv_heads: 16,
        llama: false,
        rope_theta: 10000.0,
        max_position_embeddings: 2048,
    },
    // 1bitLLM/bitnet_b1_58-3B
    SynthShape {
        name: "3b",
        vocab_size: 32002,
        hidden_size: 3200,
        intermediate_size: 8640,
        num_layers: 26,
        num_heads: 32,
        num_kv_heads: 32,
        llama: false,
        rope_theta: 10000.0,
        max_position_embeddings: 2048,
    },
    // HF1BitLLM/Llama3-8B-1.58-100B-tokens
    SynthShape {
        name: "8b",
        vocab_size: 128256,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        llama: true,
        rope_theta: 500000.0,
        max_position_embeddings: 8192,
    },
    // Small llama-1.58 layout whose rows fit TQ1_0/TQ2_0 blocks (256): for llama.cpp cross-checks.
    SynthShape {
        name: "tiny-llama",
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        llama: true,
        rope_theta: 10000.0,
        max_position_embeddings: 256,
    },
    SynthShape {
        name: "tiny",
        vocab_size: 512,
        hidden_size: 128,
        intermediate_size: 384,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        llama: false,
        rope_theta: 500000.0,
        max_position_embeddings: 256,
    },
];

pub fn shape_by_name(name: &str) -> Option<SynthShape> {
    SHAPES.iter().copied().find(|s| s.name == name)
}

/// xorshift64*: fast, seedable, good enough for random weights.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Packed HF bytes of random ternary weights with about a third zeros: each byte holds four
/// codes, each uniform over {-1, 0, +1}.
fn random_packed(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        let mut r = rng.next();
        for b in chunk {
            let mut byte = 0u8;
            for i in 0..4 {
                byte |= ((r % 3) as u8) << (2 * i);
                r /= 3;
            }
            *b = byte;
        }
    }
    out
}

fn bf16_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect()
}

/// A byte-level BPE tokenizer.json with `vocab_size` entries: the 256 byte symbols, filler
/// tokens, and BOS/EOS at the end. It encodes any text (one token per byte) and decodes
/// every id.
fn stand_in_tokenizer(vocab_size: usize) -> serde_json::Value {
    // GPT-2's byte-to-unicode table: printable bytes map to themselves, others to U+0100 onwards.
    let mut byte_chars = Vec::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        byte_chars.push(if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        });
    }
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let (bos, eos) = (vocab_size - 2, vocab_size - 1);
    for i in 256..bos {
        vocab.insert(format!("<|filler_{i}|>"), json!(i));
    }
    json!({
        "version": "1.0",
        "added_tokens": [
            {"id": bos, "content": "<|begin_of_text|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": eos, "content": "<|end_of_text|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Writes a random model of `shape` to `out` (config.json, generation_config.json,
/// tokenizer.json, model.safetensors) in the packed autobitlinear form of 2B-4T.
pub fn write_synthetic(shape: &SynthShape, out: &Path, seed: u64) -> Result<(), ModelError> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let s = shape;
    let head_dim = s.hidden_size / s.num_heads;
    let (q_dim, kv_dim) = (s.num_heads * head_dim, s.num_kv_heads * head_dim);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let emb_scale = 1.0f32;
    tensors.push((
        "model.embed_tokens.weight".into(),
        Dtype::BF16,
        vec![s.vocab_size, s.hidden_size],
        bf16_bytes((0..s.vocab_size * s.hidden_size).map(|_| rng.uniform() * emb_scale)),
    ));
    if s.llama {
        tensors.push((
            "lm_head.weight".into(),
            Dtype::BF16,
            vec![s.vocab_size, s.hidden_size],
            bf16_bytes((0..s.vocab_size * s.hidden_size).map(|_| rng.uniform() * 0.05)),
        ));
    }
    let ones = |n: usize| bf16_bytes(std::iter::repeat_n(1.0, n));
    tensors.push(("model.norm.weight".into(), Dtype::BF16, vec![s.hidden_size], ones(s.hidden_size)));
    for l in 0..s.num_layers {
        let p = format!("model.layers.{l}");
        tensors.push((
            format!("{p}.input_layernorm.weight"),
            Dtype::BF16,
            vec![s.hidden_size],
            ones(s.hidden_size),
        ));
        tensors.push((
            format!("{p}.post_attention_layernorm.weight"),
            Dtype::BF16,
            vec![s.hidden_size],
            ones(s.hidden_size),
        ));
        if !s.llama {
            tensors.push((
                format!("{p}.self_attn.attn_sub_norm.weight"),
                Dtype::BF16,
                vec![q_dim],
                ones(q_dim),
            ));
            tensors.push((
                format!("{p}.mlp.ffn_sub_norm.weight"),
                Dtype::BF16,
                vec![s.intermediate_size],
                ones(s.intermediate_size),
            ));
        }
        let projections = [
            ("self_attn.q_proj", q_dim, s.hidden_size),
            ("self_attn.k_proj", kv_dim, s.hidden_size),
            ("self_attn.v_proj", kv_dim, s.hidden_size),
            ("self_attn.o_proj", s.hidden_size, q_dim),
            ("mlp.gate_proj", s.intermediate_size, s.hidden_size),
            ("mlp.up_proj", s.intermediate_size, s.hidden_size),
            ("mlp.down_proj", s.hidden_size, s.intermediate_size),
        ];
        for (name, rows, cols) in projections {
            tensors.push((
                format!("{p}.{name}.weight"),
                Dtype::U8,
                vec![rows / 4, cols],
                random_packed(&mut rng, rows / 4 * cols),
            ));
            // A weight_scale (mean|W|) that keeps activations in a sane range for random weights.
            let scale = 1.0 / (cols as f32).sqrt();
            tensors.push((
                format!("{p}.{name}.weight_scale"),
                Dtype::BF16,
                vec![1],
                bf16_bytes(std::iter::once(scale)),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, shape, b)| {
            TensorView::new(*d, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::tensor(out, format!("building tensor {n}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let st_path = out.join("model.safetensors");
    // Registered, so that an interrupted synth leaves no half file behind (crate::temp_file).
    let (tmp, _) = TempFile::create(crate::temp_file::beside(&st_path), |p| std::fs::File::create(p))
        .map_err(|e| ModelError::io(&st_path, e))?;
    safetensors::serialize_to_file(views, None, tmp.path())
        .map_err(|e| ModelError::tensor(tmp.path(), format!("writing: {e}")))?;
    tmp.persist(&st_path).map_err(|e| ModelError::io(&st_path, e))?;

    let (bos, eos) = (s.vocab_size - 2, s.vocab_size - 1);
    let config = json!({
        "architectures": [if s.llama { "LlamaForCausalLM" } else { "BitNetForCausalLM" }],
        "model_type": if s.llama { "llama" } else { "bitnet" },
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "hidden_act": if s.llama { "silu" } else { "relu2" },
        "rms_norm_eps": 1e-5,
        "rope_theta": s.rope_theta,
        "max_position_embeddings": s.max_position_embeddings,
        "tie_word_embeddings": !s.llama,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
        "bitnet_rust_synthetic": format!("random ternary weights, shapes of `{}`, seed {seed}", s.name),
    });
    let write_json = |name: &str, v: &serde_json::Value| -> Result<(), ModelError> {
        let p = out.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap_or_default())
            .map_err(|e| ModelError::io(&p, e))
    };
    write_json("config.json", &config)?;
    write_json("generation_config.json", &json!({"bos_token_id": bos, "eos_token_id": [eos]}))?;
    write_json("tokenizer.json", &stand_in_tokenizer(s.vocab_size))?;
    Ok(())
}
