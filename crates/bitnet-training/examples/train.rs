//! `cargo run --release -p bitnet-training --example train -- --data FILE --preset tiny --out DIR`
//! (the same command as `bitnet train`).

use clap::Parser;

#[derive(Parser)]
#[command(about = "Quantization-aware training of a BitNet b1.58 model")]
struct Cli {
    #[command(flatten)]
    train: bitnet_training::TrainArgs,
}

fn main() -> anyhow::Result<()> {
    bitnet_training::run_train(&Cli::parse().train)
}
