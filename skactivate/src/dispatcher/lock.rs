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
//!   would change identity under the holder.
//!
//! A lock directory is removed, by its holder, with the state it guards
//! (`StateLock::remove`): namespaces come and go, and their inode numbers
//! with them. Whoever opened the directory before it was removed gets the
//! lock of a directory that is no longer there; `lock` sees that (the path
//! no longer leads to the inode it locked) and starts again.
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

impl StateLock {
    /// Remove the lock directory, still holding the lock, then release it:
    /// for when the state it guards was removed.
    pub fn remove(self) -> io::Result<()> {
        fs::remove_dir(&self.record)?;
        let dir = self.record.parent().map(Path::to_owned);
        let r = dir.map_or(Ok(()), |d| match fs::remove_dir(&d) {
            // A waiter recorded itself meanwhile? It cannot: records are made
            // only under the lock. Anything else is worth reporting.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        });
        drop(self);
        r
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

/// The lock directory a held lock is on.
pub fn lock_dir_of(lock: &StateLock) -> PathBuf {
    lock.record.parent().map(Path::to_owned).unwrap_or_default()
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
    // Bounded: each round lost means another holder removed the directory
    // in between, which takes that holder's whole lifetime.
    let mut attempts = 0;
    loop {
        match lock_once(&path)? {
            Some(lock) => return Ok(lock),
            None if attempts < 16 => attempts += 1,
            None => {
                return Err(io_err(&path)(io::Error::other(
                    "the lock directory kept being removed while it was locked",
                )));
            }
        }
    }
}

/// `flock(LOCK_EX | LOCK_NB)` on `dir`: whether it was taken.
fn try_flock(dir: &fs::File) -> io::Result<bool> {
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// `None`: the directory locked was removed meanwhile (see the module doc).
fn lock_once(path: &Path) -> Result<Option<StateLock>, LockError> {
    use std::os::unix::fs::MetadataExt;
    let path = path.to_owned();
    mkdir(&path)?;
    let dir = fs::File::open(&path).map_err(io_err(&path))?;
    // The holder records its pid just after locking: a lock without a
    // record is being taken, or was let go by a holder whose descriptor
    // lives on for a moment in a child another thread of its process has
    // forked (until the child's exec closes it). So where no pid is
    // recorded, the lock is tried again for a moment before it is called
    // held.
    let mut tries = 0;
    while !try_flock(&dir).map_err(io_err(&path))? {
        let pid = recorded(&path).into_iter().max();
        if pid.is_some() || tries == 20 {
            return Err(LockError::Held { path, pid });
        }
        tries += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let held = dir.metadata().map_err(io_err(&path))?;
    match fs::metadata(&path) {
        Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    }
    // Ours. Records of earlier holders are stale (they no longer hold it).
    for old in recorded(&path) {
        let _ = fs::remove_dir(path.join(format!("pid-{old}")));
    }
    let record = path.join(format!("pid-{}", std::process::id()));
    mkdir(&record)?;
    Ok(Some(StateLock { _dir: dir, record }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_lock_can_be_taken_again() {
        let root = std::env::temp_dir().join(format!("skactivate-lock-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let held = lock(&root, 7).unwrap();
        let dir = lock_dir(&root, 7);
        assert_eq!(recorded(&dir), [std::process::id()]);
        match lock(&root, 7) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("a second writer got {other:?}"),
        }
        held.remove().unwrap();
        assert!(!dir.exists());
        let again = lock(&root, 7).unwrap();
        assert_eq!(recorded(&dir), [std::process::id()]);
        drop(again);
        assert!(dir.is_dir(), "a lock dropped, not removed, stays");
        fs::remove_dir_all(&root).unwrap();
    }
}
