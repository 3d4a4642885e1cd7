//! Golden cases for `skactivate-generator`: each folder under
//! `tests/generator/` holds a `root/` tree of unit files and `expected`, the
//! exit code, stderr and the output tree the generator must produce.
//! `SKACTIVATE_BLESS=1` rewrites `expected` (read every blessed diff).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/generator");
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// The output tree as text: links with their targets, files with contents.
fn describe(dir: &Path, base: &Path, out: &mut String) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let rel = p.strip_prefix(base).unwrap().display().to_string();
        let meta = fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            writeln!(out, "L {rel} -> {}", fs::read_link(&p).unwrap().display()).unwrap();
        } else if meta.is_dir() {
            describe(&p, base, out);
        } else {
            writeln!(out, "F {rel}").unwrap();
            for line in fs::read_to_string(&p).unwrap().lines() {
                writeln!(out, "| {line}").unwrap();
            }
        }
    }
}

fn run(case: &Path) -> String {
    let tmp = std::env::temp_dir().join(format!(
        "skactivate-generator-test-{}-{}",
        std::process::id(),
        case.file_name().unwrap().to_string_lossy()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let out = tmp.join("normal");
    fs::create_dir_all(&out).unwrap();
    // systemd runs the generator through a link named skactivate-generator.
    let link = tmp.join("skactivate-generator");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_skactivate"), &link).unwrap();
    let r = Command::new(&link)
        .arg(&out)
        .arg(tmp.join("early"))
        .arg(tmp.join("late"))
        .env("SKACTIVATE_GENERATOR_ROOT", case.join("root"))
        .output()
        .unwrap();
    let mut text = format!("exit {}\nstderr:\n", r.status.code().unwrap_or(-1));
    text.push_str(&String::from_utf8_lossy(&r.stderr));
    text.push_str("tree:\n");
    describe(&out, &out, &mut text);
    fs::remove_dir_all(&tmp).unwrap();
    text
}

#[test]
fn generator_golden_cases() {
    let bless = std::env::var_os("SKACTIVATE_BLESS").is_some();
    let mut failed = Vec::new();
    let all = cases();
    assert!(
        all.len() >= 10,
        "expected at least 10 generator cases, found {}",
        all.len()
    );
    for case in &all {
        let got = run(case);
        let expected_path = case.join("expected");
        if bless {
            fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failed.push(format!(
                "{}:\n--- expected\n{expected}--- got\n{got}",
                case.display()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases differ:\n{}",
        failed.len(),
        all.len(),
        failed.join("\n")
    );
}
