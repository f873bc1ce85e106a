//! End-to-end runs of `bitnet train` on a small synthetic text: interrupt + resume reproduces
//! an uninterrupted run bit for bit; bad input is a clear error.

use std::path::{Path, PathBuf};

use bitnet_training::train::LogLine;
use std::ops::ControlFlow;

use bitnet_training::{train, train_with, Preset, StepReport, TrainArgs};
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    train: TrainArgs,
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// About 40 KB of varied sentences, deterministic.
fn write_corpus(dir: &Path) -> PathBuf {
    let words = [
        "the", "king", "said", "that", "she", "was", "not", "a", "lady", "of", "great", "wit", "and", "he",
        "would", "go",
    ];
    let mut text = String::new();
    let mut x: u64 = 12345;
    for line in 0..1200 {
        for _ in 0..6 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(words[(x >> 60) as usize]);
            text.push(' ');
        }
        text.push_str(if line % 9 == 8 { ".\n\n\n" } else { ".\n" });
    }
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn args(data: &Path, out: &Path, extra: &[&str]) -> TrainArgs {
    let mut v: Vec<String> = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--steps",
        "12",
        "--vocab",
        "300",
        "--hidden",
        "32",
        "--layers",
        "2",
        "--intermediate",
        "64",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--seq",
        "16",
        "--batch",
        "3",
        "--accum",
        "2",
        "--warmup",
        "3",
        "--eval-every",
        "4",
        "--log-every",
        "1",
        "--threads",
        "2",
        "--samples",
        "0",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // an extra flag that is already there replaces its value
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i].to_string();
        let takes_value = i + 1 < extra.len() && !extra[i + 1].starts_with("--");
        match v.iter().position(|x| *x == flag) {
            Some(p) if takes_value => v[p + 1] = extra[i + 1].to_string(),
            Some(_) => {}
            None => {
                v.push(flag);
                if takes_value {
                    v.push(extra[i + 1].to_string());
                }
            }
        }
        i += if takes_value { 2 } else { 1 };
    }
    Cli::parse_from(v).train
}

fn log(out: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn interrupted_and_resumed_run_reproduces_the_uninterrupted_losses_bit_for_bit() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("resume");
    let data = write_corpus(&dir);
    let straight = dir.join("straight");
    let stopped = dir.join("stopped");
    let s = train(&args(&data, &straight, &[])).unwrap();
    assert_eq!(s.steps_done, 12);
    assert!(!s.stopped_early);

    // "Ctrl-C" after step 7: a checkpoint is written and the run returns cleanly.
    let s = train(&args(&data, &stopped, &["--save-every", "5", "--stop-after", "7"])).unwrap();
    assert!(s.stopped_early);
    assert_eq!(s.steps_done, 7);
    assert!(stopped.join("checkpoints/step-00000007.safetensors").exists());
    assert!(stopped.join("model.safetensors").exists(), "an interrupted run still exports its model");
    // a fresh run into a folder with checkpoints is refused
    let err = train(&args(&data, &stopped, &[])).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");

    let s = train(&args(&data, &stopped, &["--resume"])).unwrap();
    assert_eq!(s.steps_done, 12);

    let a = log(&straight);
    let b = log(&stopped);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.step, y.step);
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}: {} vs {}", x.step, x.loss, y.loss);
        assert_eq!(x.val_loss.map(f64::to_bits), y.val_loss.map(f64::to_bits), "val at step {}", x.step);
        assert_eq!(x.grad_norm.to_bits(), y.grad_norm.to_bits());
    }
    assert!(a.iter().filter(|l| l.val_loss.is_some()).count() >= 3);
    assert!(a.last().unwrap().loss < a[0].loss, "the loss went down");
    let ma = std::fs::read(straight.join("model.safetensors")).unwrap();
    let mb = std::fs::read(stopped.join("model.safetensors")).unwrap();
    assert!(ma == mb, "exported models differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--backward int16` is a setting of the run: a resumed run keeps it (without the flag) and
/// reproduces the uninterrupted losses; its losses are not the f32 backward's.
#[test]
fn int16_backward_resumes_bit_for_bit() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("int16");
    let data = write_corpus(&dir);
    let (exact, straight, stopped) = (dir.join("f32"), dir.join("straight"), dir.join("stopped"));
    train(&args(&data, &exact, &[])).unwrap();
    train(&args(&data, &straight, &["--backward", "int16"])).unwrap();
    let s = train(&args(&data, &stopped, &["--backward", "int16", "--stop-after", "6"])).unwrap();
    assert!(s.stopped_early);
    train(&args(&data, &stopped, &["--resume"])).unwrap();
    let run_json = std::fs::read_to_string(stopped.join("run.json")).unwrap();
    assert!(run_json.contains("\"backward\": \"int16\""), "{run_json}");
    let (a, b, f) = (log(&straight), log(&stopped), log(&exact));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}: {} vs {}", x.step, x.loss, y.loss);
    }
    // The first step's loss is the forward's, the same; later steps follow other gradients.
    assert_eq!(a[0].loss.to_bits(), f[0].loss.to_bits());
    assert!(a.iter().zip(&f).any(|(x, y)| x.loss != y.loss), "int16 gave the f32 losses");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn same_seed_same_threads_is_deterministic_and_seeds_differ() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("seed");
    let data = write_corpus(&dir);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        train(&args(&data, &out, &[&["--steps", "4"], extra].concat())).unwrap();
        log(&out).iter().map(|l| l.loss.to_bits()).collect::<Vec<_>>()
    };
    let a = run("a", &[]);
    let b = run("b", &[]);
    let c = run("c", &["--seed", "9"]);
    let fp = run("fp", &["--fp"]);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, fp);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_a_clear_error() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("bad");
    let missing = dir.join("nope.txt");
    let err = train(&args(&missing, &dir.join("o1"), &[])).unwrap_err();
    assert!(format!("{err:#}").contains("cannot read --data"), "{err:#}");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "  \n\n").unwrap();
    let err = train(&args(&empty, &dir.join("o2"), &[])).unwrap_err();
    assert!(err.to_string().contains("is empty"), "{err}");
    let err = train(&args(&empty, &dir.join("o3"), &["--resume"])).unwrap_err();
    assert!(err.to_string().contains("no checkpoint"), "{err}");
    let bad = Cli::try_parse_from(["train", "--data", "x", "--out", "y", "--preset", "huge"]);
    let msg = bad.err().unwrap().to_string();
    assert!(msg.contains("huge") && msg.contains("tiny"), "{msg}");
    let data = write_corpus(&dir);
    let err = train(&args(&data, &dir.join("o4"), &["--hidden", "30"])).unwrap_err();
    assert!(err.to_string().contains("--hidden"), "{err}");
    let err = train(&args(&data, &dir.join("o5"), &["--fp", "--backward", "int16"])).unwrap_err();
    assert!(err.to_string().contains("--backward int16") && err.to_string().contains("--fp"), "{err}");
    let bad = Cli::try_parse_from(["train", "--data", "x", "--out", "y", "--backward", "int4"]);
    let msg = bad.err().unwrap().to_string();
    assert!(msg.contains("int4") && msg.contains("int16"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `TrainArgs::new` gives the command line's defaults; `train_with` reports every step with the
/// loss the log holds, and a `Break` from its callback stops the run as Ctrl-C does.
#[test]
fn train_with_reports_every_step_and_stops_when_asked() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("callback");
    let data = write_corpus(&dir);
    let defaults = TrainArgs::new(&data, dir.join("x"));
    let parsed = Cli::parse_from(["train", "--data", "d", "--out", "o"]).train;
    assert_eq!(defaults.data, data);
    assert_eq!(defaults.preset, Preset::Tiny);
    assert_eq!(
        format!("{:?}", TrainArgs { data: "d".into(), out: "o".into(), ..defaults }),
        format!("{parsed:?}")
    );

    let out = dir.join("run");
    let mut reports: Vec<StepReport> = Vec::new();
    let summary = train_with(&args(&data, &out, &[]), |r| {
        reports.push(*r);
        if r.step == 5 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert!(summary.stopped_early);
    assert_eq!(summary.steps_done, 5);
    assert_eq!(reports.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert!(reports.iter().all(|r| r.steps == 12));
    assert!(out.join("checkpoints/step-00000005.safetensors").exists());
    assert!(out.join("model.safetensors").exists());
    for (r, l) in reports.iter().zip(log(&out)) {
        assert_eq!((r.step, r.loss.to_bits()), (l.step, l.loss.to_bits()));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
