//! Training checkpoints: model, AdamW moments, the sampler's generator and the run's settings,
//! in one safetensors file written through a temporary file and a rename.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::export::write_atomic;
use crate::model::Params;
use crate::optim::AdamW;

/// Progress that is not in the tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    pub tokens_seen: u64,
    /// The data sampler's generator.
    pub sampler: [u64; 4],
    pub adam_step: u64,
}

/// Checkpoints live in `out/checkpoints/step-NNNNNNNN.safetensors`.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes a checkpoint and keeps only the newest `keep` of them.
pub fn save(
    out: &Path,
    params: &Params<f32>,
    opt: &AdamW,
    state: &TrainState,
    settings: &serde_json::Value,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, p) in [("param", params), ("adam_m", &opt.m), ("adam_v", &opt.v)] {
        for t in &p.tensors {
            blobs.push((format!("{prefix}/{}", t.name), t.shape.clone(), f32_bytes(&t.data)));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = blobs
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([
        ("state".to_string(), serde_json::to_string(state)?),
        ("settings".to_string(), serde_json::to_string(settings)?),
    ]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    let path = dir.join(format!("step-{:08}.safetensors", state.step));
    write_atomic(&path, &bytes)?;
    let mut all = list(out)?;
    while all.len() > keep.max(1) {
        let (_, old) = all.remove(0);
        std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(path)
}

/// Checkpoints in `out`, oldest first, with their steps.
pub fn list(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoint_dir(out);
    let mut v = Vec::new();
    if !dir.exists() {
        return Ok(v);
    }
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.strip_suffix(".safetensors")) {
            if let Ok(step) = step.parse::<u64>() {
                v.push((step, p));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// A loaded checkpoint.
pub struct Loaded {
    pub state: TrainState,
    pub settings: serde_json::Value,
    pub params: HashMap<String, Vec<f32>>,
    pub adam_m: HashMap<String, Vec<f32>>,
    pub adam_v: HashMap<String, Vec<f32>>,
}

/// Reads a checkpoint, checking that it is whole: its header, state and settings parse, every
/// tensor is F32 and every value is finite (training never saves a NaN: the loss check stops
/// the run first, so one here is damage, not divergence).
pub fn load(path: &Path) -> Result<Loaded> {
    let corrupt = |why: String| anyhow::anyhow!("checkpoint {} is corrupt: {why}", path.display());
    let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let info = meta.metadata().clone().unwrap_or_default();
    let field = |key: &str| info.get(key).ok_or_else(|| corrupt(format!("its header has no {key}")));
    let state: TrainState =
        serde_json::from_str(field("state")?).map_err(|e| corrupt(format!("its state: {e}")))?;
    let settings: serde_json::Value =
        serde_json::from_str(field("settings")?).map_err(|e| corrupt(format!("its settings: {e}")))?;
    let mut maps: [HashMap<String, Vec<f32>>; 3] = Default::default();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(corrupt(format!("tensor {name} is {:?}, not F32", view.dtype())));
        }
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(corrupt(format!("tensor {name} holds {v} at index {i}")));
        }
        let (slot, key) = match name.split_once('/') {
            Some(("param", k)) => (0, k),
            Some(("adam_m", k)) => (1, k),
            Some(("adam_v", k)) => (2, k),
            _ => return Err(corrupt(format!("unexpected tensor {name}"))),
        };
        maps[slot].insert(key.to_string(), data);
    }
    let [params, adam_m, adam_v] = maps;
    Ok(Loaded { state, settings, params, adam_m, adam_v })
}

/// What [`load_newest`] found.
pub struct Newest {
    pub loaded: Loaded,
    pub path: PathBuf,
    /// Newer checkpoints that did not load, with why, for the caller to report.
    pub skipped: Vec<(PathBuf, anyhow::Error)>,
}

/// The newest checkpoint in `out` that loads. An error if none does.
pub fn load_newest(out: &Path) -> Result<Newest> {
    let all = list(out)?;
    if all.is_empty() {
        bail!("--resume: no checkpoint in {}", checkpoint_dir(out).display());
    }
    let mut skipped = Vec::new();
    for (_, path) in all.into_iter().rev() {
        match load(&path) {
            Ok(loaded) => return Ok(Newest { loaded, path, skipped }),
            Err(e) => skipped.push((path, e)),
        }
    }
    let reasons: Vec<String> = skipped.iter().map(|(_, e)| format!("{e:#}")).collect();
    bail!("--resume: no checkpoint in {} can be read: {}", checkpoint_dir(out).display(), reasons.join("; "))
}

/// Fills `p`'s tensors from a map by name, checking sizes.
pub fn fill(p: &mut Params<f32>, map: &HashMap<String, Vec<f32>>, what: &str) -> Result<()> {
    for t in &mut p.tensors {
        let d = map.get(&t.name).with_context(|| format!("checkpoint lacks {what} {}", t.name))?;
        if d.len() != t.data.len() {
            bail!("checkpoint {what} {} has {} values, expected {}", t.name, d.len(), t.data.len());
        }
        t.data.copy_from_slice(d);
    }
    Ok(())
}
