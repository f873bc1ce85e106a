//! `bitnet.convert`, `bitnet.quantize` and `bitnet.train`: the CLI's commands of the same names.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use bitnet_models::convert::{convert_hf_to_gguf, quantize_gguf, HeadType, QuantizeTarget, WeightType};
use bitnet_training::train::Arch;
use bitnet_training::{train_with, Preset, StepReport, Summary, TrainArgs};
use clap::ValueEnum;
use pyo3::prelude::*;
use pyo3::types::PyBool;

use crate::args;
use crate::errors::{model_error, require_exists, tool_error, value_error};
use crate::worker;

/// One of a clap value enum's names (as the CLI spells them), or a `ValueError` listing them.
fn choice<T: ValueEnum>(name: &str, value: &str) -> PyResult<T> {
    T::from_str(value, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| format!("{:?}", p.get_name())))
            .collect();
        value_error(format!("{name} must be one of {}, got {value:?}", names.join(", ")))
    })
}

fn weight_type(value: &str) -> PyResult<WeightType> {
    WeightType::from_name(value).ok_or_else(|| {
        let names: Vec<String> = WeightType::ALL.iter().map(|t| format!("{:?}", t.name())).collect();
        value_error(format!("type must be one of {}, got {value:?}", names.join(", ")))
    })
}

fn head_type(value: &str) -> PyResult<HeadType> {
    match value {
        "f16" => Ok(HeadType::F16),
        "q8_0" => Ok(HeadType::Q8_0),
        "q6_k" => Ok(HeadType::Q6K),
        "q4_k" => Ok(HeadType::Q4K),
        other => Err(value_error(format!(
            "lm_head_type must be \"f16\", \"q8_0\", \"q6_k\" or \"q4_k\", got {other:?}"
        ))),
    }
}

/// Converts a Hugging Face BitNet checkpoint folder to a GGUF file (as `bitnet convert`).
///
/// type: the ternary projections' type: "tq2_0", "tq1_0", "q2_0" or "q1_0" (llama.cpp; "q1_0"
///     holds no zeros), "pq2_0" or "ptq1_0" (PrismML), "i2_s" (bitnet.cpp), or "f16".
/// lm_head_type: the head's (or tied embeddings') type: "f16", "q8_0", "q6_k" or "q4_k".
/// The file is written under a temporary name and renamed when complete.
#[pyfunction]
#[pyo3(signature = (src, dst, r#type="tq2_0", lm_head_type="f16"))]
pub fn convert(py: Python<'_>, src: PathBuf, dst: PathBuf, r#type: &str, lm_head_type: &str) -> PyResult<()> {
    let (weight, head) = (weight_type(r#type)?, head_type(lm_head_type)?);
    require_exists(&src, "checkpoint")?;
    py.detach(|| convert_hf_to_gguf(&src, &dst, weight, head, |_, _| {})).map_err(model_error)
}

/// Re-encodes a GGUF file as another type (as `bitnet quantize`).
///
/// type: "tq2_0", "tq1_0", "q2_0", "q1_0" (llama.cpp), "pq2_0", "ptq1_0" (PrismML) or "i2_s"
///     (bitnet.cpp) re-encode the ternary projections (exact codes); "f16", "bf16", "q8_0",
///     "q6_k" or "q4_k" re-encode every weight matrix (projections, embeddings, head) from its decoded
///     values.
/// The file is written under a temporary name and renamed when complete.
#[pyfunction]
#[pyo3(signature = (src, dst, r#type))]
pub fn quantize(py: Python<'_>, src: PathBuf, dst: PathBuf, r#type: &str) -> PyResult<()> {
    let target = QuantizeTarget::from_name(r#type).ok_or_else(|| {
        let names: Vec<String> = QuantizeTarget::NAMES.iter().map(|n| format!("{n:?}")).collect();
        value_error(format!("type must be one of {}, got {:?}", names.join(", "), r#type))
    })?;
    require_exists(&src, "GGUF file")?;
    py.detach(|| quantize_gguf(&src, &dst, target, |_, _| {})).map_err(model_error)
}

/// What `bitnet.train` returns.
#[pyclass(frozen, module = "bitnet", name = "TrainSummary", get_all)]
pub struct PyTrainSummary {
    /// Optimizer steps done.
    pub steps_done: u64,
    /// True when the run stopped before its last step (the callback asked, or Ctrl-C).
    pub stopped_early: bool,
    /// Training loss of the last step.
    pub final_loss: f64,
    /// Validation loss at the end (None when stopped early).
    pub val_loss: Option<f64>,
    pub parameters: usize,
    pub tokens_per_s: f64,
    /// The output folder, which holds the model (loadable with Model.load).
    pub out: PathBuf,
}

#[pymethods]
impl PyTrainSummary {
    fn __repr__(&self) -> String {
        format!(
            "TrainSummary(steps_done={}, stopped_early={}, final_loss={:.4}, val_loss={:?}, out={:?})",
            self.steps_done,
            if self.stopped_early { "True" } else { "False" },
            self.final_loss,
            self.val_loss,
            self.out
        )
    }
}

impl PyTrainSummary {
    fn new(s: Summary, out: PathBuf) -> Self {
        Self {
            steps_done: s.steps_done,
            stopped_early: s.stopped_early,
            final_loss: s.final_loss,
            val_loss: s.val_loss,
            parameters: s.parameters,
            tokens_per_s: s.tokens_per_s,
            out,
        }
    }
}

/// Trains a BitNet b1.58 model on a text file (quantization-aware, as `bitnet train`).
///
/// data: UTF-8 text; its last 5 % (cut at a line break) is the validation split.
/// out: the output folder: the model in Hugging Face form (Model.load(out) runs it),
///     tokenizer.json, train_log.jsonl, checkpoints/.
/// preset: "tiny", "small" or "medium" (model and run sizes); steps: optimizer steps
///     (default: the preset's).
/// callback: called as callback(step, loss) after every optimizer step; returning False stops
///     the run (a checkpoint is saved and the model exported). An exception it raises stops the
///     run the same way and is raised again.
/// resume: continue from the newest checkpoint in out. fp: train in full precision instead.
/// arch: "bitnet" (ReLU², sub-norms, tied head) or "llama158".
/// save_every: write a checkpoint every N steps (None: only at the end, or as the resumed run did).
/// The other arguments override the preset (see `bitnet train --help`). Ctrl-C stops the run
/// after its current step, with a checkpoint, and raises KeyboardInterrupt.
#[pyfunction]
#[pyo3(signature = (
    data, out, *, preset="tiny", steps=None, callback=None, seed=0, threads=None, resume=false,
    fp=false, arch=None, batch=None, seq=None, lr=None, vocab=None, tokenizer=None, hidden=None,
    layers=None, save_every=None, eval_every=None, samples=0, quiet=true
))]
#[allow(clippy::too_many_arguments)]
pub fn train(
    py: Python<'_>,
    data: PathBuf,
    out: PathBuf,
    preset: &str,
    steps: Option<i64>,
    callback: Option<Py<PyAny>>,
    seed: i128,
    threads: Option<i64>,
    resume: bool,
    fp: bool,
    arch: Option<&str>,
    batch: Option<i64>,
    seq: Option<i64>,
    lr: Option<f64>,
    vocab: Option<i64>,
    tokenizer: Option<PathBuf>,
    hidden: Option<i64>,
    layers: Option<i64>,
    save_every: Option<i64>,
    eval_every: Option<i64>,
    samples: i64,
    quiet: bool,
) -> PyResult<PyTrainSummary> {
    if !resume {
        require_exists(&data, "training data")?;
    }
    if let Some(t) = &tokenizer {
        require_exists(t, "tokenizer")?;
    }
    let positive = |name: &str, v: Option<i64>| v.map(|n| args::positive(name, n)).transpose();
    let mut a = TrainArgs::new(&data, &out);
    a.preset = choice::<Preset>("preset", preset)?;
    a.steps = positive("steps", steps)?.map(|n| n as u64);
    a.seed = u64::try_from(seed).map_err(|_| value_error(format!("seed must be in 0..2**64, got {seed}")))?;
    a.threads = positive("threads", threads)?;
    a.resume = resume;
    a.fp = fp;
    a.arch = arch.map(|s| choice::<Arch>("arch", s)).transpose()?;
    a.batch = positive("batch", batch)?;
    a.seq = positive("seq", seq)?;
    a.lr = lr;
    a.vocab = positive("vocab", vocab)?;
    a.tokenizer = tokenizer;
    a.hidden = positive("hidden", hidden)?;
    a.layers = positive("layers", layers)?;
    a.save_every = save_every.map(|n| args::count("save_every", n)).transpose()?.map(|n| n as u64);
    a.eval_every = eval_every.map(|n| args::count("eval_every", n)).transpose()?.map(|n| n as u64);
    a.samples = args::count("samples", samples)?;
    a.quiet = quiet;

    // An exception the callback raised: the run stops, then it is raised here.
    let callback_error: Arc<Mutex<Option<PyErr>>> = Arc::default();
    let callback_failed = callback_error.clone();
    let summary = worker::run_interruptible(py, "train", move |stop| {
        train_with(&a, |report: &StepReport| {
            if stop.is_raised() {
                return ControlFlow::Break(());
            }
            let Some(callback) = &callback else { return ControlFlow::Continue(()) };
            let keep_going = Python::attach(|py| {
                let answer = callback.call1(py, (report.step, report.loss))?;
                // Only an explicit False stops: a callback that returns nothing goes on.
                let said_false = answer.bind(py).cast::<PyBool>().is_ok_and(|b| !b.is_true());
                Ok::<bool, PyErr>(!said_false)
            });
            match keep_going {
                Ok(true) => ControlFlow::Continue(()),
                Ok(false) => ControlFlow::Break(()),
                Err(e) => {
                    *callback_failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
    })?;
    if let Some(e) = callback_error.lock().unwrap_or_else(PoisonError::into_inner).take() {
        return Err(e);
    }
    Ok(PyTrainSummary::new(summary.map_err(tool_error)?, out))
}
