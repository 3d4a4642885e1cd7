//! Every path skactivate uses, in one place.

use std::path::{Path, PathBuf};

/// Where bpffs is mounted on a systemd host (systemd mounts it at boot;
/// `skactivate daemon --bpffs` overrides it).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// The network namespace of the calling thread.
pub const SELF_NETNS: &str = "/proc/thread-self/ns/net";

/// Our directory on a bpffs: `<bpffs>/skactivate`.
pub fn state_root(bpffs: &Path) -> PathBuf {
    bpffs.join("skactivate")
}

/// The pinned state of the dispatcher of one network namespace, named by the
/// namespace's inode: `<bpffs>/skactivate/<netns inode>`.
pub fn netns_state(bpffs: &Path, netns_inode: u64) -> PathBuf {
    state_root(bpffs).join(netns_inode.to_string())
}

/// The pin of the dispatcher's bpf_link inside a state directory.
pub const LINK_PIN: &str = "link";

/// The pin of the program the link runs (opening it needs no CAP_SYS_ADMIN,
/// unlike fetching the program by id), and the name a new program is pinned
/// under before it replaces the old one (bpffs refuses names with a dot).
pub const PROGRAM_PIN: &str = "program";
pub const PROGRAM_PIN_NEW: &str = "program-new";

/// The installed binary, as units and generated drop-ins call it.
pub const BINARY: &str = "/usr/bin/skactivate";

/// The registration template the generator links socket units to.
pub const TEMPLATE_UNIT: &str = "/usr/lib/systemd/system/skactivate@.service";

/// The name the binary answers to when systemd runs it as a generator
/// (installed as /usr/lib/systemd/system-generators/skactivate-generator).
pub const GENERATOR_NAME: &str = "skactivate-generator";
