//! `bitnet`: run, inspect and (soon) convert, train and serve BitNet b1.58 models.

mod bench;
mod commands;
mod default_model;
mod device;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bitnet", version, about = "BitNet b1.58 inference, conversion and training", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the training variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout; speed goes to stderr.
    #[command(after_help = "Examples:
  bitnet generate --prompt \"Once upon a time\"
  bitnet generate --model ./bitnet-b1.58-2B-4T --prompt \"The capital of France is\" --max-tokens 32
  bitnet generate --tokens 0,53,73 --temperature 0.8 --top-p 0.95 --seed 1 --json")]
    Generate(commands::GenerateArgs),
    /// Print the logits of a prompt as JSON, for parity checks with other engines.
    #[command(after_help = "Examples:
  bitnet logits --model ./tiny --prompt \"Hello\"
  bitnet logits --model ./tiny --tokens 0,53,73 --all-positions")]
    Logits(commands::LogitsArgs),
    /// Describe a checkpoint: architecture, quantization form, tensors, parameters, bytes.
    #[command(after_help = "Examples:
  bitnet inspect ./bitnet-b1.58-2B-4T
  bitnet inspect ./model-dir --json")]
    Inspect(commands::InspectArgs),
    /// Write a model with real shapes and random ternary weights, for speed measurements.
    #[command(after_help = "Examples:
  bitnet synth --config 2b4t --out /tmp/bitnet-2b4t
  bitnet synth --config tiny --out /tmp/tiny --seed 3")]
    Synth(commands::SynthArgs),
    /// Time prompt processing (ppN) and generation (tgN), llama-bench style; or training steps.
    #[command(after_help = "Examples:
  bitnet bench --model /tmp/bitnet-2b4t -p 128,512 -n 128 -t 1,2 -r 3
  bitnet bench --model /tmp/bitnet-2b4t -p 512 -n 0 --output json
  bitnet bench --train small -t 1,2 --backward int16")]
    Bench(bench::BenchArgs),
    /// Convert a Hugging Face BitNet checkpoint to GGUF (llama.cpp TQ types, bitnet.cpp I2_S).
    #[command(after_help = "Examples:
  bitnet convert --model ./bitnet-b1.58-2B-4T --out 2b4t-tq2_0.gguf --type tq2_0
  bitnet convert --model ./bitnet-b1.58-2B-4T --out 2b4t-i2_s.gguf --type i2_s --lm-head-type q6_k
  bitnet generate --model 2b4t-i2_s.gguf --prompt \"Hello\"")]
    Convert(commands::ConvertArgs),
    /// Re-encode the ternary tensors of a GGUF file as another type.
    #[command(after_help = "Examples:
  bitnet quantize model-i2_s.gguf model-tq2_0.gguf --type tq2_0
  bitnet quantize model-tq1_0.gguf model-i2_s.gguf --type i2_s")]
    Quantize(commands::QuantizeArgs),
    /// List the CPU's features and every GPU (name, memory, compute capability, driver).
    Devices,
    /// Train a BitNet b1.58 model from a text file (quantization-aware, straight-through estimator).
    #[command(after_help = "Examples:
  bitnet train --data corpus.txt --preset tiny --steps 30 --out runs/tiny
  bitnet train --data corpus.txt --preset small --save-every 200 --out runs/small --resume
  bitnet train --data corpus.txt --preset tiny --fp --out runs/tiny-fp")]
    Train(bitnet_training::TrainArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => commands::generate(a),
        Command::Logits(a) => commands::logits(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::Synth(a) => commands::synth(a),
        Command::Bench(a) => bench::bench(a),
        Command::Convert(a) => commands::convert(a),
        Command::Quantize(a) => commands::quantize(a),
        Command::Train(a) => bitnet_training::run_train(&a),
        Command::Devices => device::devices(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
