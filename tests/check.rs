//! Golden cases for `skactivate check`.
//!
//! Every folder under `tests/check/` is one case: `root/` is a tree of unit
//! files, `args` the arguments after `check --root root` (split at
//! whitespace; the command runs in the case folder, so a FILE argument is a
//! path relative to it), and `expected` the exit code on its first line,
//! then the exact output, stdout and stderr as they interleave.
//!
//! `SKACTIVATE_BLESS=1 cargo test --test check` rewrites every `expected`
//! from what the binary does now: read each changed file before committing
//! it, a wrong golden file is a defect.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/check");
    let mut cases: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("reading tests/check").path())
        .filter(|path| path.is_dir())
        .collect();
    cases.sort();
    cases
}

/// Runs the case; returns its exit code and combined output as `expected`
/// spells them.
fn run(case: &Path) -> String {
    let args = fs::read_to_string(case.join("args"))
        .unwrap_or_else(|e| panic!("{}/args: {e}", case.display()));
    let (mut reader, writer) = std::io::pipe().expect("pipe");
    let mut child = {
        let mut command = Command::new(env!("CARGO_BIN_EXE_skactivate"));
        command
            .args(["check", "--root", "root"])
            .args(args.split_whitespace())
            .current_dir(case)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("pipe"))
            .stderr(writer);
        command.spawn().expect("running skactivate")
        // `command` and its copies of the pipe's write end go here, so that
        // the read below ends when the child exits.
    };
    let mut output = Vec::new();
    reader.read_to_end(&mut output).expect("reading the output");
    let status = child.wait().expect("waiting for skactivate");
    let code = status
        .code()
        .map_or_else(|| format!("{status}"), |c| c.to_string());
    format!("{code}\n{}", String::from_utf8_lossy(&output))
}

#[test]
fn golden_cases() {
    let bless = std::env::var_os("SKACTIVATE_BLESS").is_some_and(|v| v == "1");
    let cases = cases();
    assert!(!cases.is_empty(), "no cases under tests/check");
    let mut failed = Vec::new();
    for case in &cases {
        let name = case
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let actual = run(case);
        let expected_path = case.join("expected");
        if bless {
            fs::write(&expected_path, &actual)
                .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
            continue;
        }
        let expected = fs::read_to_string(&expected_path).unwrap_or_default();
        if actual != expected {
            eprintln!("--- {name}: expected\n{expected}--- {name}: actual\n{actual}---");
            failed.push(name);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases differ: {}",
        failed.len(),
        cases.len(),
        failed.join(", ")
    );
}
