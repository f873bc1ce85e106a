//! Logits of an exported checkpoint, for tools/compare_transformers_export.py:
//! `export_logits DIR OUT.f32 ID...` writes `[len(ids), vocab]` little-endian f32 to OUT.f32.

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        bail!("usage: export_logits DIR OUT.f32 ID...");
    }
    let ids: Vec<u32> =
        args[3..].iter().map(|s| s.parse().context("token ids are integers")).collect::<Result<_>>()?;
    let (model, weights) = bitnet_training::export::load_hf(std::path::Path::new(&args[1]))?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= model.config.vocab_size) {
        bail!("token id {bad} is outside the vocabulary");
    }
    let logits = model.logits(&weights, &ids);
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&args[2], bytes).with_context(|| format!("writing {}", args[2]))?;
    Ok(())
}
