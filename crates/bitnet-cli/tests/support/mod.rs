//! Running the `bitnet` binary as a user runs it, for the CLI tests.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Runs `bitnet args…` with `stdin` as its standard input (empty when `None`).
pub fn run_with_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the bitnet binary runs");
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("writing stdin");
    }
    drop(input);
    child.wait_with_output().expect("the bitnet binary ends")
}
