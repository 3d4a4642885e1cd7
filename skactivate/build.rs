//! Builds the C dispatcher (../ebpf/*.bpf.c) with clang into OUT_DIR; the crate
//! embeds the object with `aya::include_bytes_aligned!`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());

    println!("cargo::rerun-if-env-changed=CLANG");
    println!(
        "cargo::rerun-if-changed={}",
        ebpf.join("skactivate.h").display()
    );

    let mut args = vec![
        "-target".to_owned(),
        "bpf".to_owned(),
        "-O2".to_owned(),
        "-g".to_owned(),
        "-Wall".to_owned(),
        "-Werror".to_owned(),
    ];
    // <asm/types.h> lives in the multiarch include dir on Debian.
    if let Some(dir) = multiarch_include() {
        args.push(format!("-I{}", dir.display()));
    }

    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        panic!("<bpf/bpf_helpers.h> not found: on Debian/Ubuntu: apt-get install libbpf-dev");
    }
    // empty: the baseline program of the benchmarks (benches/dispatcher.rs);
    // floor: what any dispatcher's hit costs at least (the same benchmark);
    // proxy: the verdict program of `skactivate proxy --mode sockmap`;
    // reference: the plain single-trie dispatcher the benchmark holds ours
    // against (embedded by benches/dispatcher.rs only, never shipped).
    for name in ["dispatcher", "empty", "floor", "proxy", "reference"] {
        let src = ebpf.join(format!("{name}.bpf.c"));
        println!("cargo::rerun-if-changed={}", src.display());
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new(&clang)
            .args(&args)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{clang} failed to build {} ({s})", src.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{clang}` not found: the BPF dispatcher is C and needs clang and the libbpf \
                 headers. On Debian/Ubuntu: apt-get install clang libbpf-dev"
            ),
            Err(e) => panic!("running {clang}: {e}"),
        }
    }
}

/// `/usr/include/<triplet>`, asked of the C compiler rather than assumed.
fn multiarch_include() -> Option<PathBuf> {
    let out = Command::new("gcc").arg("-print-multiarch").output().ok()?;
    let triplet = String::from_utf8(out.stdout).ok()?;
    let dir = Path::new("/usr/include").join(triplet.trim());
    (!triplet.trim().is_empty() && dir.is_dir()).then_some(dir)
}
