//! `bitnet`: run, inspect and (soon) convert, train and serve BitNet b1.58 models.

mod bench;
mod chat;
mod commands;
mod device;
mod embed;
mod interrupt;
mod pull;
mod serve;

use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// Chat with a model: multi-turn, streamed, with the checkpoint's chat template.
    #[command(after_help = "Examples:
  bitnet chat --model ./bitnet-b1.58-2B-4T
  bitnet chat --model model.gguf --system \"You are a terse assistant.\"
  echo \"What is 2+2?\" | bitnet chat --model ./bitnet-b1.58-2B-4T --temperature 0

In a chat: /reset forgets the conversation, /system TEXT sets a new system message, Ctrl-C stops
a reply, Ctrl-D (end of input) exits.")]
    Chat(chat::ChatArgs),
    /// Serve a model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,
    /// /v1/models), many requests batched together, a chat page at /, /health and /metrics.
    #[command(after_help = "Examples:
  bitnet serve --model ./bitnet-b1.58-2B-4T --port 8080
  bitnet serve --model model.gguf --max-seqs 32 --kv-type bf16 --api-key secret
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 32}'

See docs/serving.md for every endpoint, parameter and metric.")]
    Serve(serve::ServeArgs),
    /// Print the logits of a prompt as JSON, for parity checks with other engines.
    #[command(after_help = "Examples:
  bitnet logits --model ./tiny --prompt \"Hello\"
  bitnet logits --model ./tiny --tokens 0,53,73 --all-positions")]
    Logits(commands::LogitsArgs),
    /// Print the embedding of each text: the last token's final hidden state, L2-normalized
    /// (BitNet-embedding models), one line of numbers per text or OpenAI's JSON.
    #[command(after_help = "Examples:
  bitnet embed --model ./bitnet-embedding-0.6b --input \"query: What is BitNet?\"
  bitnet embed --model model.gguf -f texts.txt --json")]
    Embed(embed::EmbedArgs),
    /// Describe a checkpoint folder or a .gguf file: architecture, quantization form, tensors,
    /// parameters, bytes (for a .gguf: its metadata too).
    #[command(after_help = "Examples:
  bitnet inspect ./bitnet-b1.58-2B-4T
  bitnet inspect ./model-dir --json
  bitnet inspect 2b4t-i2_s.gguf --json")]
    Inspect(commands::InspectArgs),
    /// Write a model with real shapes and random ternary weights, for speed measurements.
    #[command(after_help = "Examples:
  bitnet synth --config 2b4t --out /tmp/bitnet-2b4t
  bitnet synth --config tiny --out /tmp/tiny --seed 3
  bitnet synth --config tiny --out /tmp/tiny --force   # replace the model already there")]
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
  bitnet quantize model-tq1_0.gguf model-i2_s.gguf --type i2_s
  bitnet quantize model-tq2_0.gguf model-q2_0.gguf --type q2_0")]
    Quantize(commands::QuantizeArgs),
    /// List the CPU's features and every GPU (name, memory, compute capability, driver).
    Devices,
    /// Train a BitNet b1.58 model from a text file (quantization-aware, straight-through estimator).
    ///
    /// Ctrl-C (or SIGTERM) stops after the current step, saves a checkpoint and exits with
    /// status 130; `--resume` continues from it.
    #[command(after_help = "Examples:
  bitnet train --data corpus.txt --preset tiny --steps 30 --out runs/tiny
  bitnet train --data corpus.txt --preset small --save-every 200 --out runs/small
  bitnet train --data corpus.txt --out runs/small --resume              # after Ctrl-C or a crash
  bitnet train --data corpus.txt --out runs/small --resume --steps 4000 --schedule-steps 4000
                                                     # train a finished run further, schedule stretched
  bitnet train --data corpus.txt --preset tiny --fp --out runs/tiny-fp")]
    Train(bitnet_training::TrainArgs),
    /// Download a model from the Hugging Face Hub into its cache and print its local path.
    ///
    /// Honours HF_ENDPOINT (a mirror), HF_HOME / HF_HUB_CACHE (the cache) and HF_TOKEN (private
    /// and gated models). Every file is checked against the repository's size and hash; an
    /// interrupted download resumes where it stopped when run again.
    #[command(after_help = "Examples:
  bitnet pull microsoft/bitnet-b1.58-2B-4T
  bitnet generate --model \"$(bitnet pull microsoft/bitnet-b1.58-2B-4T)\" --prompt \"Hello\"
  bitnet pull microsoft/bitnet-b1.58-2B-4T-gguf --file ggml-model-i2_s.gguf
  bitnet pull 1bitLLM/bitnet_b1_58-large --revision main --include \"*.md\"")]
    Pull(pull::PullArgs),
}

fn main() {
    install_signal_handler();
    let cli = Cli::parse();
    // Only for commands whose output is a pipe's: a server or a download writes to sockets,
    // where a peer that hangs up makes a write fail with EPIPE, and the default disposition
    // would kill the whole process for one client's Stop.
    if !matches!(cli.command, Command::Serve(_) | Command::Pull(_)) {
        restore_sigpipe();
    }
    let result = match cli.command {
        Command::Generate(a) => commands::generate(a),
        Command::Chat(a) => chat::chat(a),
        Command::Serve(a) => serve::serve(a),
        Command::Logits(a) => commands::logits(a),
        Command::Embed(a) => embed::embed(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::Synth(a) => commands::synth(a),
        Command::Bench(a) => bench::bench(a),
        Command::Convert(a) => commands::convert(a),
        Command::Quantize(a) => commands::quantize(a),
        Command::Train(a) => train(a),
        Command::Devices => device::devices(),
        Command::Pull(a) => pull::pull(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The exit status of a run cut short by a signal, as shells report SIGINT's.
const INTERRUPTED: i32 = 130;

/// `bitnet train`, with the thread count capped; a run that stopped early (Ctrl-C) exits with
/// [`INTERRUPTED`], as an interrupted program does, not with success.
fn train(mut a: bitnet_training::TrainArgs) -> anyhow::Result<()> {
    a.threads = a.threads.map(|n| commands::capped_threads(n, "--threads"));
    if bitnet_training::train(&a)?.stopped_early {
        std::process::exit(INTERRUPTED);
    }
    Ok(())
}

/// Unix tools end quietly when the reader of their output goes away (`bitnet inspect m |
/// head -1`): SIGPIPE kills them. Rust starts programs with SIGPIPE ignored, so a write fails
/// with BrokenPipe instead and `println!` panics; restore the default. Never for commands that
/// talk over sockets (see `main`).
#[cfg(unix)]
fn restore_sigpipe() {
    // SAFETY: sets one signal's disposition to the default. The Ctrl-C handler's thread is the
    // only other one by now, and it does not touch SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}

/// Ctrl-C, SIGTERM and SIGHUP. A training run stops after its current step and saves a
/// checkpoint (a second signal ends it at once); anything else ends at once. Ending removes
/// the temporary files being written (a `convert` leaves no hidden half GGUF) and exits with
/// [`INTERRUPTED`].
fn install_signal_handler() {
    static SIGNALS: AtomicUsize = AtomicUsize::new(0);
    let handler = || {
        if interrupt::on_signal() {
            return;
        }
        // On a terminal, off the line that the progress bar or the echoed ^C left the cursor on;
        // a log gets no blank line.
        let fresh_line = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { "\n" } else { "" };
        if SIGNALS.fetch_add(1, Ordering::SeqCst) == 0 && bitnet_training::train::request_stop() {
            eprintln!(
                "{fresh_line}stopping after this step to save a checkpoint (interrupt again to quit at once)"
            );
            return;
        }
        eprint!("{fresh_line}");
        for path in bitnet_models::temp_file::abandon_all() {
            eprintln!("removed the unfinished {}", path.display());
        }
        eprintln!("interrupted");
        std::process::exit(INTERRUPTED);
    };
    if let Err(e) = ctrlc::set_handler(handler) {
        eprintln!("warning: cannot handle Ctrl-C ({e}): an interrupted command may leave temporary files");
    }
}
