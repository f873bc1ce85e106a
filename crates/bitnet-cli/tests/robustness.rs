//! Nothing lost, nothing crashes, nothing surprises (issue 18): the `bitnet` binary called as
//! a user calls it, with the inputs and interruptions users meet.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bitnet"));
    // token files are cached per user; these runs must not depend on, or fill, that cache
    c.env("BITNET_CACHE_DIR", "off");
    c
}

fn bitnet(args: &[&str]) -> Output {
    bin().args(args).output().expect("the bitnet binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must fail cleanly: exit code 1, a message containing every needle, no
/// panic; returns the message.
fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let out = bitnet(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "bitnet {args:?} should exit 1; stderr: {err}");
    for needle in needles {
        assert!(err.contains(needle), "bitnet {args:?}: stderr lacks {needle:?}: {err}");
    }
    assert!(!err.contains("panicked"), "bitnet {args:?} panicked: {err}");
    err
}

fn fixture(form: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf-bitnet-tiny").join(form)
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of a checkpoint folder's files.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// About 40 KB of varied sentences, deterministic.
fn write_corpus(dir: &Path) -> PathBuf {
    let words = ["the", "king", "said", "that", "she", "was", "not", "a", "lady", "of", "great", "wit"];
    let mut text = String::new();
    let mut x: u64 = 12345;
    for line in 0..1200 {
        for _ in 0..6 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(words[(x >> 60) as usize % words.len()]);
            text.push(' ');
        }
        text.push_str(if line % 9 == 8 { ".\n\n\n" } else { ".\n" });
    }
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p
}

/// `bitnet train` flags of a model small enough for a test.
const SMALL_RUN: [&str; 20] = [
    "--vocab",
    "300",
    "--hidden",
    "32",
    "--layers",
    "1",
    "--intermediate",
    "64",
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--seq",
    "16",
    "--batch",
    "2",
    "--samples",
    "0",
    "--threads",
    "2",
];

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", s(data), "--out", s(out), "--quiet"];
    args.extend_from_slice(&SMALL_RUN);
    args.extend_from_slice(extra);
    bitnet(&args)
}

/// Item 1: `train --out` and `synth --out` refuse to overwrite a model (`cp -a
/// assets/default-model m && bitnet train --data corpus.txt --out m --steps 5`).
#[test]
fn a_model_in_out_is_not_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    copy_dir(&repo_file("assets/default-model"), &m);
    let weights = std::fs::read(m.join("model.safetensors")).unwrap();
    let data = write_corpus(dir.path());
    let out = train(&data, &m, &["--steps", "5"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already holds a model") && err.contains("--force"), "{err}");
    assert!(std::fs::read(m.join("model.safetensors")).unwrap() == weights, "the model is untouched");

    fails_with(&["synth", "--config", "tiny", "--out", s(&m)], &["already holds a model", "--force"]);
    assert!(std::fs::read(m.join("model.safetensors")).unwrap() == weights, "the model is untouched");
    let out = bitnet(&["synth", "--config", "tiny", "--out", s(&m), "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read(m.join("model.safetensors")).unwrap() != weights, "--force replaces it");
    let fresh = dir.path().join("fresh");
    assert!(bitnet(&["synth", "--config", "tiny", "--out", s(&fresh)]).status.success());
}

/// Item 3: `--resume` on a finished run leaves its files alone and says so.
#[test]
fn resuming_a_finished_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_corpus(dir.path());
    let run = dir.path().join("run");
    let out = train(&data, &run, &["--steps", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let files = ["metrics.json", "train_log.jsonl", "model.safetensors", "run.json"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(run.join(f)).unwrap()).collect();
    let out = bitnet(&["train", "--data", s(&data), "--out", s(&run), "--resume"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("the run is finished (3 of 3 steps)"), "{err}");
    assert!(!err.contains("NaN"), "{err}");
    for (f, b) in files.iter().zip(&before) {
        assert!(std::fs::read(run.join(f)).unwrap() == *b, "{f} changed");
    }
    let metrics: Value = serde_json::from_slice(&before[0]).unwrap();
    assert!(metrics["final_loss"].is_f64(), "{metrics}");
}

/// Item 10: a stopped run exits 130 and says it stopped, even with --quiet.
#[test]
fn a_stopped_training_run_exits_130_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_corpus(dir.path());
    let run = dir.path().join("run");
    let out = train(&data, &run, &["--steps", "10", "--stop-after", "2"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: checkpoint saved at step 2; continue with --resume"), "{err}");
    assert!(run.join("checkpoints/step-00000002.safetensors").exists());
}

/// Item 10: Ctrl-C during training: the run stops after its step, saves a checkpoint, exits 130.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_training_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_corpus(dir.path());
    let run = dir.path().join("run");
    let mut args =
        vec!["train", "--data", s(&data), "--out", s(&run), "--steps", "100000", "--log-every", "1"];
    args.extend_from_slice(&SMALL_RUN);
    args.push("--quiet");
    let child = bin().args(&args).stderr(Stdio::piped()).spawn().unwrap();
    // wait for the first steps to be logged
    let log = run.join("train_log.jsonl");
    wait_for("the first log line", || std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 2));
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: checkpoint saved at step"), "{err}");
    assert_eq!(std::fs::read_dir(run.join("checkpoints")).unwrap().count(), 1, "{err}");
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Temporary files in `dir` (the GGUF writer's `.NAME.PID-N.tmp`, `NAME.tmp`).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Item 4: an interrupted `convert` or `quantize` leaves no hidden temporary file (`timeout -s
/// INT 2 bitnet convert …; ls -la .o.gguf.*.tmp`). The model has a large embedding, so that
/// converting it to Q6_K takes long enough to be interrupted.
#[cfg(unix)]
#[test]
fn an_interrupted_convert_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("wide-vocab");
    let shape = bitnet_models::synth::SynthShape {
        name: "wide-vocab",
        vocab_size: 131072,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 1,
        num_heads: 4,
        num_kv_heads: 2,
        llama: false,
        rope_theta: 10000.0,
        max_position_embeddings: 256,
    };
    bitnet_models::synth::write_synthetic(&shape, &model, 1).unwrap();
    let outdir = dir.path().join("out");
    std::fs::create_dir_all(&outdir).unwrap();
    // Starts `args`, signals it once its temporary file is there, and checks what is left.
    let interrupt = |what: &str, args: &[&str], o: &Path| {
        for signal_name in ["INT", "TERM"] {
            let child = bin().args(args).stderr(Stdio::piped()).spawn().unwrap();
            wait_for("the temporary file", || !temporaries(&outdir).is_empty());
            signal(child.id(), signal_name);
            let out = child.wait_with_output().unwrap();
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(130), "{what}, SIG{signal_name}: {err}");
            assert_eq!(temporaries(&outdir), Vec::<String>::new(), "{what}, SIG{signal_name}: {err}");
            assert!(!o.exists(), "{what}, SIG{signal_name}: no output either");
        }
    };
    let o = outdir.join("o.gguf");
    let args = ["convert", "--model", s(&model), "--out", s(&o), "--type", "i2_s", "--lm-head-type", "q6_k"];
    interrupt("convert", &args, &o);
    // `quantize` likewise: a whole GGUF re-encoded as Q6_K (the wide embedding included).
    let src = dir.path().join("src.gguf");
    let out =
        bin().args(["convert", "--model", s(&model), "--out", s(&src), "--type", "i2_s"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let q = outdir.join("q.gguf");
    interrupt("quantize", &["quantize", "--type", "q6_k", s(&src), s(&q)], &q);
}

/// Item 7: a closed stdout ends the program quietly (SIGPIPE), never with a panic
/// (`bitnet logits -p hi | head -c 10`, `generate … | head`, `inspect DIR | head -1`).
#[cfg(unix)]
#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let packed = fixture("packed");
    for args in [
        &["logits", "-p", "hi"][..],
        &["generate", "-p", "hi", "-n", "8"],
        &["inspect", s(&packed)],
        &["inspect", s(&packed), "--json"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // the reader is gone before the first byte is written
        let out = bin().args(args).stdout(writer).stderr(Stdio::piped()).output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "bitnet {args:?}: {err}");
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "bitnet {args:?}: {:?} {err}", out.status);
    }
}

/// Item 9: `inspect FILE.gguf --json` prints JSON.
#[test]
fn inspect_of_a_gguf_file_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let out = bitnet(&["convert", "--model", s(&fixture("packed")), "--out", s(&gguf), "--type", "i2_s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bitnet(&["inspect", s(&gguf), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["metadata"]["general.architecture"]["value"], "bitnet-b1.58");
    let tensors = v["tensors"].as_array().unwrap();
    assert!(tensors.iter().any(|t| t["name"] == "blk.0.attn_q.weight" && t["type"] == "I2_S"), "{v}");
    // text without --json
    let out = bitnet(&["inspect", s(&gguf)]);
    assert!(serde_json::from_slice::<Value>(&out.stdout).is_err());
    assert!(String::from_utf8_lossy(&out.stdout).contains("blk.0.attn_q.weight"));
}

/// Rewrites a safetensors file with `name`'s values replaced (BF16 tensors).
fn replace_bf16(path: &Path, name: &str, value: f32) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let t = owned.iter_mut().find(|t| t.0 == name).unwrap();
    assert_eq!(t.1, safetensors::Dtype::BF16);
    let bits = (value.to_bits() >> 16) as u16;
    t.3 = t.3.chunks(2).flat_map(|_| bits.to_le_bytes()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Item 9: a NaN weight_scale is refused by convert as by the loader, an absurd rms_norm_eps
/// names config.json and the field.
#[test]
fn convert_and_load_refuse_the_same_damaged_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let nan = dir.path().join("nan-scale");
    copy_dir(&fixture("packed"), &nan);
    let scale = "model.layers.0.self_attn.q_proj.weight_scale";
    replace_bf16(&nan.join("model.safetensors"), scale, f32::NAN);
    let o = dir.path().join("o.gguf");
    fails_with(&["convert", "--model", s(&nan), "--out", s(&o), "--type", "i2_s"], &[scale, "NaN"]);
    assert!(!o.exists() && temporaries(dir.path()).is_empty());
    fails_with(&["logits", "--model", s(&nan), "--tokens", "0,1"], &[scale, "NaN"]);

    let eps = dir.path().join("eps");
    copy_dir(&fixture("packed"), &eps);
    let cfg_path = eps.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rms_norm_eps"] = serde_json::json!(1e50);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    for args in [
        &["generate", "--model", s(&eps), "--tokens", "0,1", "-n", "4"][..],
        &["inspect", s(&eps)],
        &["convert", "--model", s(&eps), "--out", s(&o), "--type", "i2_s"],
    ] {
        fails_with(args, &[s(&cfg_path), "rms_norm_eps 1e50"]);
    }
    // A negative one, as the file writes it.
    cfg["rms_norm_eps"] = serde_json::json!(-1.0);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    fails_with(&["inspect", s(&eps)], &["rms_norm_eps -1 is not"]);
}

/// Item 10: error messages say each thing once, and bytes as text.
#[test]
fn errors_say_each_thing_once() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails_with(
        &["convert", "--model", "/nonexistent", "--out", "o.gguf", "--type", "i2_s"],
        &["/nonexistent/config.json"],
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let err = fails_with(&["quantize", "/nonexistent.gguf", "o.gguf", "--type", "i2_s"], &["cannot open"]);
    assert_eq!(err.matches("/nonexistent.gguf").count(), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUX\x03\0\0\0 and more").unwrap();
    fails_with(&["inspect", s(&bad)], &["\"GGUX\" (47 47 55 58)"]);
    fails_with(&["inspect", "/nonexistent.gguf"], &["/nonexistent.gguf: no such file or folder"]);
    fails_with(
        &["generate", "--model", "/nonexistent.gguf", "-p", "hi"],
        &["/nonexistent.gguf: no such file or folder"],
    );
}

/// Item 10: `--threads 100000` is capped at a multiple of the cores, with a note.
#[test]
fn absurd_thread_counts_are_capped() {
    let start = Instant::now();
    let out = bitnet(&["logits", "--tokens", "0,1", "-t", "100000"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("--threads 100000 is more than 4 threads for each of the"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(60), "{:?}", start.elapsed());
}

/// Item 10: flags are checked before the corpus is read, and a failed run leaves no folder.
#[test]
fn train_checks_flags_first_and_leaves_no_folder_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    fails_with(
        &["train", "--data", "/nonexistent.txt", "--out", s(&out), "--steps", "0"],
        &["--steps must be positive"],
    );
    assert!(!out.exists());
    fails_with(&["train", "--data", "/nonexistent.txt", "--out", s(&out)], &["cannot read --data"]);
    assert!(!out.exists(), "the failed run made no folder, or removed it");
}

/// Item 15: every flag has help; inspect says it takes a .gguf.
#[test]
fn every_flag_has_help() {
    let commands = [
        "generate", "chat", "serve", "logits", "embed", "inspect", "synth", "bench", "convert", "quantize",
        "devices", "train", "pull",
    ];
    for cmd in commands {
        let out = bitnet(&[cmd, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success());
        let lines: Vec<&str> = help.lines().collect();
        // The flags are listed under `Options:`, up to the next section (examples that follow,
        // such as `curl -d ...`, are not flags).
        let options = lines.iter().position(|l| *l == "Options:").expect("an Options section");
        for (i, line) in lines.iter().enumerate().skip(options + 1) {
            if !line.is_empty() && !line.starts_with(' ') {
                break;
            }
            let t = line.trim_start();
            // a flag's line (not a possible value's `- name:`), its help after it on the same
            // line or the next; a flag with none shows nothing there, or only its default
            if !(line.starts_with(' ') && t.starts_with('-') && !t.starts_with("- ")) {
                continue;
            }
            let same_line = t.split_once("  ").map_or("", |(_, rest)| rest.trim());
            let text =
                if same_line.is_empty() { lines.get(i + 1).map_or("", |l| l.trim()) } else { same_line };
            assert!(!text.is_empty() && !text.starts_with('['), "`bitnet {cmd} --help`: no help for {t}");
        }
    }
    let help = String::from_utf8_lossy(&bitnet(&["inspect", "--help"]).stdout).into_owned();
    assert!(help.contains("a .gguf file"), "{help}");
}

/// `convert --type q2_0|q1_0` and `quantize` between the group-scaled types: a model of 256-wide
/// rows converts to Q2_0, runs and requantizes to PrismML's PQ2_0; rows of 160 (not a multiple of
/// 64) and zero codes in Q1_0 are refused with the tensor and the reason.
#[test]
fn convert_and_quantize_to_group_scaled_types() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    assert!(bitnet(&["synth", "--config", "tiny-llama", "--out", s(&hf)]).status.success());
    let q2 = dir.path().join("q2.gguf");
    let out = bitnet(&["convert", "--model", s(&hf), "--out", s(&q2), "--type", "q2_0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bitnet(&["inspect", s(&q2), "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let tensors = v["tensors"].as_array().unwrap();
    assert!(tensors.iter().any(|t| t["name"] == "blk.0.ffn_up.weight" && t["type"] == "Q2_0"), "{v}");
    let out = bitnet(&["generate", "--model", s(&q2), "--tokens", "1,2,3", "-n", "4", "--temperature", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pq2 = dir.path().join("pq2.gguf");
    let out = bitnet(&["quantize", s(&q2), s(&pq2), "--type", "pq2_0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bitnet(&["inspect", s(&pq2), "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["tensors"].as_array().unwrap().iter().any(|t| t["type"] == "PQ2_0"), "{v}");
    fails_with(&["quantize", s(&q2), s(&dir.path().join("q1.gguf")), "--type", "q1_0"], &["Q1_0", "no zero"]);
    let wide160 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/deep5/packed");
    let out160 = dir.path().join("x.gguf");
    fails_with(
        &["convert", "--model", s(&wide160), "--out", s(&out160), "--type", "q2_0"],
        &["hidden_size 160", "multiple of 64"],
    );
}

/// A dense model (qwen3 or llama with float or block-format projections that are not ternary
/// values) asked to become a ternary type is refused, naming the tensor and the types that keep
/// it, and nothing is written; the dense types re-encode it. `convert` refuses the same.
#[test]
fn quantize_refuses_to_ternarize_a_dense_model() {
    let dir = tempfile::tempdir().unwrap();
    let dense = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tiny/dense.gguf");
    let out = dir.path().join("q2.gguf");
    fails_with(
        &["quantize", s(&dense), s(&out), "--type", "q2_0"],
        &["blk.0.attn_q.weight", "dense model", "ternarized", "q8_0"],
    );
    assert!(!out.exists(), "a refused quantize writes nothing");
    let q8 = dir.path().join("q8.gguf");
    let done = bitnet(&["quantize", s(&dense), s(&q8), "--type", "q8_0"]);
    assert!(done.status.success(), "{}", stderr(&done));
    // The same for `convert` of a checkpoint without quantization_config: a dense Qwen3, and
    // Ternary-Bonsai's form (ternary values times a scale per group, not one per matrix).
    let qwen3 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tiny");
    for form in ["dense", "bonsai"] {
        let out = dir.path().join(format!("{form}.gguf"));
        fails_with(
            &["convert", "--model", s(&qwen3.join(form)), "--out", s(&out), "--type", "f16"],
            &["q_proj.weight", "dense model", "quantization_config"],
        );
        assert!(!out.exists(), "a refused convert writes nothing");
    }
}

/// Issue 18, item 14: the embedded default model (`assets/default-model`) converts to every
/// ternary GGUF type that can hold its zeros (all but Q1_0), and each file decodes greedily to the
/// same ids as the checkpoint: its rows are multiples of 256, which every block type holds.
#[test]
fn the_default_model_converts_to_every_ternary_type() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo_file("assets/default-model");
    let greedy = |m: &Path| -> Value {
        let args =
            ["generate", "--model", s(m), "--prompt", "The king said", "-n", "12", "--temperature", "0"];
        let out = bitnet(&[&args[..], &["--json"]].concat());
        assert!(out.status.success(), "{}: {}", m.display(), stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).expect("JSON")["generated"].clone()
    };
    let want = greedy(&model);
    for ty in ["i2_s", "tq2_0", "tq1_0", "q2_0", "pq2_0", "ptq1_0"] {
        let gguf = dir.path().join(format!("{ty}.gguf"));
        let out = bitnet(&["convert", "--model", s(&model), "--out", s(&gguf), "--type", ty]);
        assert!(out.status.success(), "convert --type {ty}: {}", stderr(&out));
        assert_eq!(greedy(&gguf), want, "--type {ty}: greedy ids differ from the checkpoint's");
    }
}

/// A K-quant head on a model whose rows are not whole 256-value super-blocks: `convert` says
/// which setting and why before writing anything (it used to fail in the GGUF writer, naming
/// only a shape).
#[test]
fn a_k_quant_head_that_does_not_fit_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let (o, model) = (dir.path().join("o.gguf"), fixture("packed"));
    for head in ["q4_k", "q6_k"] {
        let args =
            ["convert", "--model", s(&model), "--out", s(&o), "--type", "i2_s", "--lm-head-type", head];
        let out = bin().args(args).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{head}: {err}");
        assert!(
            err.contains("hidden_size 128 is not a multiple of 256") && err.contains("lm_head"),
            "{head}: {err}"
        );
        assert!(!o.exists(), "{head}: nothing written");
    }
}
