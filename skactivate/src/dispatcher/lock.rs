//! One writer per network namespace.
//!
//! The lock is `flock(LOCK_EX)` on a directory of its own on the bpffs,
//! `<bpffs>/skactivate/locks/<netns inode>/`, next to the pinned state it
//! guards. Why there:
//!
//! * bpffs takes `flock` on directories like any filesystem (the VFS does it),
//!   and the kernel drops the lock when the holder's last fd closes, crash or
//!   not: there is nothing stale to clean up.
//! * It lives wherever the state lives, so two bpffs mounts (tests, containers)
//!   never contend, and it needs no other writable path (the shipped unit can
//!   write only /sys/fs/bpf).
//! * Not the state directory itself: that one is built under another name and
//!   renamed into place, and replaced when its namespace died; a lock on it
//!   would change identity under the holder. The lock directory is never
//!   removed.
//!
//! `flock` does not say who holds a lock, so the holder records its pid as the
//! name of an empty subdirectory, `pid-<N>` (bpffs has no regular files). The
//! record is informational: exclusion is the lock's alone.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The held lock; released when dropped.
#[derive(Debug)]
pub struct StateLock {
    _dir: fs::File,
    record: PathBuf,
}

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.record);
    }
}

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another open file holds it; its pid if recorded.
    Held {
        path: PathBuf,
        pid: Option<u32>,
    },
    Io {
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LockError + '_ {
    move |source| LockError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The lock directory of the namespace `netns` under the state root.
pub fn lock_dir(root: &Path, netns: u64) -> PathBuf {
    root.join("locks").join(netns.to_string())
}

fn mkdir(path: &Path) -> Result<(), LockError> {
    match fs::create_dir(path) {
        Ok(()) => fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o750))
            .map_err(io_err(path)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The pids recorded in a lock directory.
fn recorded(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("pid-")?.parse().ok())
        .collect()
}

/// Take the lock of `netns`'s state under `root`, without waiting. Creates the
/// lock directory if needed and nothing else.
pub fn lock(root: &Path, netns: u64) -> Result<StateLock, LockError> {
    let parent = root.join("locks");
    mkdir(&parent)?;
    let path = lock_dir(root, netns);
    mkdir(&path)?;
    let dir = fs::File::open(&path).map_err(io_err(&path))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_err(&path)(e));
        }
        // The holder records its pid just after locking: give it a moment.
        let mut pid = None;
        for _ in 0..20 {
            pid = recorded(&path).into_iter().max();
            if pid.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        return Err(LockError::Held { path, pid });
    }
    // Ours. Records of earlier holders are stale (they no longer hold it).
    for old in recorded(&path) {
        let _ = fs::remove_dir(path.join(format!("pid-{old}")));
    }
    let record = path.join(format!("pid-{}", std::process::id()));
    mkdir(&record)?;
    Ok(StateLock { _dir: dir, record })
}
