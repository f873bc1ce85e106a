//! bitnet-training: quantization-aware training of BitNet b1.58 models.
//!
//! The model (`model`) is written layer by layer (`layers`), each with its forward and an
//! explicit backward; BitLinear uses the straight-through estimator. Around it: AdamW and the
//! learning-rate schedules (`optim`), the tokenizer and token files (`data`), checkpoints that
//! resume bit for bit (`checkpoint`), export to the Hugging Face packed 2B-4T form (`export`),
//! and the `bitnet train` command (`train`: [`TrainArgs`], [`run_train`]).

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod export;
pub mod generate;
pub mod layers;
pub mod linalg;
pub mod model;
pub mod optim;
pub mod profile;
pub mod real;
pub mod rng;
pub mod train;

pub use layers::bitlinear::{Backward, Precision};
pub use model::{Layout, Model, Params, Prepared, Tensor};
pub use real::Real;
pub use train::{run_train, train, train_with, Preset, RunSettings, StepReport, Summary, TrainArgs};
