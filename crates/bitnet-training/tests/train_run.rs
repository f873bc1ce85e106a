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

fn checkpoint_steps(out: &Path) -> Vec<u64> {
    bitnet_training::checkpoint::list(out).unwrap().iter().map(|(s, _)| *s).collect()
}

/// Issue 18: a model already in --out is not overwritten without --force; --force replaces it
/// and deletes an earlier run's checkpoints.
#[test]
fn a_model_in_out_is_replaced_only_with_force() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("force");
    let data = write_corpus(&dir);
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("config.json"), "{\"precious\": true}").unwrap();
    std::fs::write(out.join("model.safetensors"), "precious weights").unwrap();
    let err = format!("{:#}", train(&args(&data, &out, &["--steps", "2"])).unwrap_err());
    assert!(err.contains("already holds a model") && err.contains("--force"), "{err}");
    assert!(err.contains("config.json") && err.contains("model.safetensors"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "{\"precious\": true}");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), b"precious weights");
    assert!(!out.join("data").exists() && !out.join("tokenizer.json").exists(), "nothing was written");

    let s = train(&args(&data, &out, &["--steps", "2", "--force"])).unwrap();
    assert_eq!(s.steps_done, 2);
    assert_ne!(std::fs::read(out.join("model.safetensors")).unwrap(), b"precious weights");
    assert_eq!(checkpoint_steps(&out), [2]);
    // --force over an earlier run: its checkpoints go, the new run's come
    train(&args(&data, &out, &["--steps", "1", "--force"])).unwrap();
    assert_eq!(checkpoint_steps(&out), [1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 18: --save-every is a setting of the run, so a resumed run keeps checkpointing; a
/// second crash then loses at most N steps.
#[test]
fn a_resumed_run_keeps_saving_every_n_steps() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("save-every");
    let data = write_corpus(&dir);
    let out = dir.join("run");
    train(&args(&data, &out, &["--save-every", "4", "--stop-after", "5"])).unwrap();
    assert_eq!(checkpoint_steps(&out), [4, 5]);
    train(&args(&data, &out, &["--resume"])).unwrap();
    assert_eq!(checkpoint_steps(&out), [8, 12], "checkpoints at 8 and 12, as in a straight run");
    // --save-every on resume replaces the run's
    let out2 = dir.join("run2");
    train(&args(&data, &out2, &["--save-every", "4", "--stop-after", "5"])).unwrap();
    train(&args(&data, &out2, &["--resume", "--save-every", "3"])).unwrap();
    assert_eq!(checkpoint_steps(&out2), [9, 12]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 18: --steps on resume extends a run (the schedule keeps its length unless
/// --schedule-steps says otherwise), a resume of a finished run leaves its files alone, and
/// --steps below the checkpoint is an error.
#[test]
fn steps_on_resume_extend_the_run_and_a_finished_run_is_left_alone() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("extend");
    let data = write_corpus(&dir);
    let (extended, straight) = (dir.join("extended"), dir.join("straight"));
    train(&args(&data, &extended, &["--steps", "8"])).unwrap();
    let files = ["metrics.json", "train_log.jsonl", "model.safetensors", "run.json"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(extended.join(f)).unwrap()).collect();
    // (the helper always passes --steps; the CLI test resumes with no --steps at all)
    let s = train(&args(&data, &extended, &["--resume", "--steps", "8"])).unwrap();
    assert_eq!(s.steps_done, 8);
    assert!(s.final_loss.is_finite(), "the finished run's own summary");
    for (f, b) in files.iter().zip(&before) {
        assert!(std::fs::read(extended.join(f)).unwrap() == *b, "{f} changed");
    }
    let err = train(&args(&data, &extended, &["--resume", "--steps", "5"])).unwrap_err().to_string();
    assert!(err.contains("--steps 5") && err.contains("step 8"), "{err}");

    let s = train(&args(&data, &extended, &["--resume", "--steps", "12"])).unwrap();
    assert_eq!(s.steps_done, 12);
    // the same as a straight run of 12 steps on a schedule of 8
    train(&args(&data, &straight, &["--steps", "12", "--schedule-steps", "8"])).unwrap();
    let (a, b) = (log(&straight), log(&extended));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.step, x.loss.to_bits(), x.lr.to_bits()), (y.step, y.loss.to_bits(), y.lr.to_bits()));
    }
    assert_eq!(b.last().unwrap().step, 12);
    assert!(b.iter().filter(|l| l.step > 8).all(|l| l.lr == 0.0), "past its end the schedule's final rate");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Overwrites the first value of a checkpoint's data with NaN, its header intact.
fn put_nan_in(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..8 + header + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Issue 18: a damaged newest checkpoint is skipped with a warning for the older one beside
/// it; a NaN in a checkpoint is called damage, not divergence.
#[test]
fn resume_falls_back_from_a_corrupt_newest_checkpoint() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("corrupt");
    let data = write_corpus(&dir);
    let (straight, run) = (dir.join("straight"), dir.join("run"));
    train(&args(&data, &straight, &[])).unwrap();
    train(&args(&data, &run, &["--save-every", "4", "--stop-after", "6"])).unwrap();
    let ckpt = |step: u64| run.join(format!("checkpoints/step-{step:08}.safetensors"));
    put_nan_in(&ckpt(6));
    let err = format!("{:#}", bitnet_training::checkpoint::load(&ckpt(6)).err().unwrap());
    assert!(err.contains("step-00000006.safetensors is corrupt") && err.contains("NaN"), "{err}");
    assert!(!err.contains("--lr"), "{err}");
    // truncated, too: still the older one
    let len = std::fs::metadata(ckpt(6)).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(ckpt(6)).unwrap().set_len(len / 2).unwrap();
    let s = train(&args(&data, &run, &["--resume"])).unwrap();
    assert_eq!(s.steps_done, 12);
    let (a, b) = (log(&straight), log(&run));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}: resumed from step 4", x.step);
    }
    // none readable: an error that says why for each
    let run2 = dir.join("run2");
    train(&args(&data, &run2, &["--save-every", "4", "--stop-after", "6"])).unwrap();
    for step in [4, 6] {
        put_nan_in(&run2.join(format!("checkpoints/step-{step:08}.safetensors")));
    }
    let err = format!("{:#}", train(&args(&data, &run2, &["--resume"])).unwrap_err());
    assert!(
        err.contains("step-00000004") && err.contains("step-00000006") && err.contains("corrupt"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 18: a checkpoint that cannot be written (a full disk: its temporary file is a link to
/// /dev/full) is an error naming the file, and leaves no temporary file behind.
#[cfg(target_os = "linux")]
#[test]
fn a_checkpoint_on_a_full_disk_names_the_file_and_leaves_no_temporary() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("full");
    let data = write_corpus(&dir);
    let out = dir.join("run");
    let tmp = out.join("checkpoints/step-00000004.safetensors.tmp");
    std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
    let err = format!("{:#}", train(&args(&data, &out, &["--save-every", "4"])).unwrap_err());
    assert!(err.contains(&tmp.display().to_string()), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(std::fs::symlink_metadata(&tmp).is_err(), "the temporary file is removed");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 18: flags are checked before the data is read, and a failed run leaves no folder it
/// made behind.
#[test]
fn flags_are_checked_first_and_a_failed_run_leaves_no_folder() {
    std::env::set_var("BITNET_CACHE_DIR", "off");
    let dir = scratch("fail-early");
    let out = dir.join("o");
    let err = format!("{:#}", train(&args(&dir.join("missing.txt"), &out, &["--steps", "0"])).unwrap_err());
    assert!(err.contains("--steps") && !err.contains("--data"), "{err}");
    assert!(!out.exists());
    // fails after tokenizing: a corpus shorter than one window
    let small = dir.join("small.txt");
    std::fs::write(&small, "the king said.\n").unwrap();
    let err = format!("{:#}", train(&args(&small, &out, &[])).unwrap_err());
    assert!(err.contains("fewer than one window"), "{err}");
    assert!(!out.exists(), "the folder this run made is removed");
    // a folder that was there stays
    std::fs::create_dir_all(&out).unwrap();
    train(&args(&small, &out, &[])).unwrap_err();
    assert!(out.exists());
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
