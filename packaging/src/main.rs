//! `skactivate-gen`: what the packages ship besides the binary and the units,
//! made at build time.
//!
//! * Shell completions for bash, zsh and fish, generated from the one clap
//!   definition of the command line ([`skactivate::cli::Cli`]), so they never
//!   drift from it.
//! * Man pages: every `man/NAME.SECTION.scd` run through scdoc(1) into
//!   `NAME.SECTION`. scdoc takes the date in the page footer from
//!   `SOURCE_DATE_EPOCH` when it is set, which makes the pages reproducible.
//!
//! The Debian package (`packaging/build deb`) and the RPM spec both run it;
//! keeping it out of the skactivate crate keeps clap_complete out of the
//! shipped binary.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

/// The command the completions are for.
const BIN: &str = "skactivate";

/// Make skactivate's shell completions and man pages.
#[derive(Debug, Parser)]
#[command(name = "skactivate-gen")]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Write completions to OUT/bash/skactivate, OUT/zsh/_skactivate and
    /// OUT/fish/skactivate.fish.
    Completions {
        #[arg(value_name = "OUT")]
        out: PathBuf,
    },
    /// Build every SOURCE/*.scd into OUT/NAME.SECTION with scdoc.
    Man {
        #[command(flatten)]
        man: ManArgs,
        #[arg(value_name = "OUT")]
        out: PathBuf,
    },
    /// Both: completions into OUT/completions, man pages into OUT/man.
    All {
        #[command(flatten)]
        man: ManArgs,
        #[arg(value_name = "OUT")]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ManArgs {
    /// The directory of the scdoc sources.
    #[arg(long, value_name = "DIR", default_value_os_t = default_source())]
    source: PathBuf,
    /// The scdoc program.
    #[arg(long, value_name = "PROGRAM", default_value = "scdoc")]
    scdoc: PathBuf,
}

fn default_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../man")
}

/// Where each shell looks for a completion file, relative to OUT, and the
/// file's name there.
fn completion_file(shell: Shell) -> PathBuf {
    match shell {
        Shell::Bash => Path::new("bash").join(BIN),
        Shell::Zsh => Path::new("zsh").join(format!("_{BIN}")),
        Shell::Fish => Path::new("fish").join(format!("{BIN}.fish")),
        other => unreachable!("no completion file for {other}"),
    }
}

/// Write `contents` to `path` whole or not at all.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().expect("output files are inside a directory");
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let name = path.file_name().expect("output files have names");
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&tmp, contents).with_context(|| format!("{}: cannot write", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
}

fn completions(out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut skactivate::cli::Cli::command(), BIN, &mut text);
        let path = out.join(completion_file(shell));
        write_atomically(&path, &text)?;
        written.push(path);
    }
    Ok(written)
}

/// The page a source makes: `skactivate.socket.5.scd` → `skactivate.socket.5`,
/// which must end in a man section.
fn page_name(source: &Path) -> Result<String> {
    let name = source
        .file_name()
        .and_then(OsStr::to_str)
        .and_then(|n| n.strip_suffix(".scd"))
        .with_context(|| format!("{}: not an .scd file with a UTF-8 name", source.display()))?;
    let section = name.rsplit_once('.').map(|(_, s)| s);
    match section {
        Some(s) if s.starts_with(|c: char| c.is_ascii_digit()) => Ok(name.to_owned()),
        _ => bail!(
            "{}: the name must end in a man section, like skactivate.8.scd",
            source.display()
        ),
    }
}

/// Runs scdoc with `source` on stdin and returns the roff it writes.
fn scdoc(program: &Path, source: &Path) -> Result<Vec<u8>> {
    let text = fs::read(source).with_context(|| format!("{}: cannot read", source.display()))?;
    let mut child = Command::new(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{}: cannot run (is scdoc installed?)", program.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    // scdoc reads all its input before writing, so writing first cannot block
    // on a full stdout pipe.
    let fed = stdin.write_all(&text);
    drop(stdin);
    let out = child
        .wait_with_output()
        .with_context(|| format!("{}: waiting for scdoc", source.display()))?;
    if !out.status.success() {
        // scdoc says "Error at LINE:COLUMN: ..." without the file.
        bail!(
            "{}: scdoc {}: {}",
            source.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fed.with_context(|| format!("{}: feeding scdoc", source.display()))?;
    Ok(out.stdout)
}

fn man(args: &ManArgs, out: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(&args.source)
        .with_context(|| format!("{}: cannot list the man sources", args.source.display()))?;
    let mut sources = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("{}: cannot list", args.source.display()))?
            .path();
        if path.extension() == Some(OsStr::new("scd")) {
            sources.push(path);
        }
    }
    if sources.is_empty() {
        bail!("{}: no .scd files", args.source.display());
    }
    sources.sort();
    let mut written = Vec::new();
    for source in sources {
        let page = out.join(page_name(&source)?);
        write_atomically(&page, &scdoc(&args.scdoc, &source)?)?;
        written.push(page);
    }
    Ok(written)
}

fn run(args: Args) -> Result<Vec<PathBuf>> {
    match args.what {
        What::Completions { out } => completions(&out),
        What::Man { man: m, out } => man(&m, &out),
        What::All { man: m, out } => {
            let mut written = completions(&out.join("completions"))?;
            written.extend(man(&m, &out.join("man"))?);
            Ok(written)
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("skactivate-gen: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_names_keep_the_section() {
        let name = |s: &str| page_name(Path::new(s)).map_err(|e| e.to_string());
        assert_eq!(name("man/skactivate.8.scd").unwrap(), "skactivate.8");
        assert_eq!(
            name("man/skactivate.socket.5.scd").unwrap(),
            "skactivate.socket.5"
        );
        assert_eq!(
            name("man/org.skactivate1.5.scd").unwrap(),
            "org.skactivate1.5"
        );
        let err = name("man/skactivate.scd").unwrap_err();
        assert!(err.contains("man/skactivate.scd"), "{err}");
    }

    #[test]
    fn completions_cover_every_subcommand() {
        let dir = std::env::temp_dir().join(format!("skactivate-gen-test-{}", std::process::id()));
        let written = completions(&dir).unwrap();
        assert_eq!(written.len(), 3);
        let bash = fs::read_to_string(dir.join("bash/skactivate")).unwrap();
        let fish = fs::read_to_string(dir.join("fish/skactivate.fish")).unwrap();
        let zsh = fs::read_to_string(dir.join("zsh/_skactivate")).unwrap();
        for sub in skactivate::cli::Cli::command().get_subcommands() {
            let sub = sub.get_name();
            assert!(bash.contains(sub), "bash completion lacks {sub}");
            assert!(fish.contains(sub), "fish completion lacks {sub}");
            assert!(zsh.contains(sub), "zsh completion lacks {sub}");
        }
        assert!(zsh.starts_with("#compdef skactivate"), "{}", &zsh[..40]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
