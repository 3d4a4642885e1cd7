//! Telling the service manager how we are doing, without waiting on it.
//!
//! `sd_notify` sends on a blocking datagram socket: when the manager's queue
//! is full (a PID 1 busy with a reload, a receiver that reads late), the
//! send waits. The proxy serves every connection from one thread, and the
//! daemon answers D-Bus from one thread with its service locked while it
//! tells the manager of a change: either would stop until the manager read.
//! A status line is not worth that. [`Notifier`] sends without waiting; what
//! the queue has no room for is owed, and sent at the next
//! [`Notifier::flush`] (or update) as it is by then: `READY=1` with the
//! newest status, one `WATCHDOG=1` however many pings found the queue full.

use std::io;
use std::os::unix::net::UnixDatagram;

use sd_notify::NotifyState;

/// Send `state` to `$NOTIFY_SOCKET` if there is room in its queue: `Ok(true)`
/// when sent or when there is no manager to tell, `Ok(false)` when its queue
/// is full.
pub fn notify_nowait(state: &[NotifyState]) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(true);
    };
    let msg: String = state.iter().map(|s| format!("{s}\n")).collect();
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.connect_addr(&addr)?;
    } else {
        sock.connect(&path)?;
    }
    match sock.send(msg.as_bytes()) {
        Ok(n) if n == msg.len() => Ok(true),
        Ok(_) => Err(io::Error::new(io::ErrorKind::WriteZero, "incomplete write")),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// What the service manager was told, and what it is still owed.
#[derive(Debug, Default)]
pub struct Notifier {
    /// `READY=1` wanted (since the start, or the last `RELOADING=1`).
    want_ready: bool,
    /// `READY=1` told.
    ready: bool,
    want: Option<String>,
    told: Option<String>,
    /// A `WATCHDOG=1` that found the queue full.
    watchdog: bool,
    /// Whether an error other than a full queue was logged as a warning.
    warned: bool,
}

impl Notifier {
    /// Tell the manager `status`, and `READY=1` with it if `ready` and not
    /// yet told, unless it was told exactly that already. Never waits: a
    /// message that finds the manager's queue full is owed. Returns whether
    /// nothing is owed now.
    pub fn update(&mut self, ready: bool, status: &str) -> bool {
        self.want_ready |= ready;
        if self.want.as_deref() != Some(status) {
            self.want = Some(status.to_owned());
        }
        self.flush()
    }

    /// `WATCHDOG=1`, with whatever else is owed. Returns whether nothing is
    /// owed now.
    pub fn watchdog(&mut self) -> bool {
        self.watchdog = true;
        self.flush()
    }

    /// `RELOADING=1`: the next `update(true, …)` says `READY=1` again. A
    /// reload the manager had no room to hear of is not owed: by the time
    /// there is room it is over, and what is owed is its outcome.
    pub fn reloading(&mut self) {
        if !self.flush() || !self.ready {
            return;
        }
        match notify_nowait(&[NotifyState::Reloading]) {
            Ok(false) => {}
            Ok(true) => {
                self.ready = false;
                self.want_ready = false;
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Send what is owed, in one message. Other errors than a full queue
    /// (no manager listening) count as told: there is nobody to tell; the
    /// first is logged as a warning, later ones at debug level. Returns
    /// whether nothing is owed now.
    pub fn flush(&mut self) -> bool {
        let owe_ready = self.want_ready && !self.ready;
        let owe_status = self.want.is_some() && self.want != self.told;
        let mut states = Vec::with_capacity(3);
        if owe_ready {
            states.push(NotifyState::Ready);
        }
        if owe_status && let Some(s) = &self.want {
            states.push(NotifyState::Status(s));
        }
        if self.watchdog {
            states.push(NotifyState::Watchdog);
        }
        if states.is_empty() {
            return true;
        }
        match notify_nowait(&states) {
            Ok(false) => return false,
            Ok(true) => {}
            Err(e) => self.failed(&e),
        }
        self.ready |= owe_ready;
        self.told.clone_from(&self.want);
        self.watchdog = false;
        true
    }

    fn failed(&mut self, e: &io::Error) {
        let path = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
        if std::mem::replace(&mut self.warned, true) {
            tracing::debug!("NOTIFY_SOCKET={}: {e}", path.to_string_lossy());
        } else {
            tracing::warn!(
                "NOTIFY_SOCKET={}: {e}; the service manager is not told how we are doing",
                path.to_string_lossy()
            );
        }
    }

    /// Whether something found the manager's queue full and is owed.
    pub fn owes(&self) -> bool {
        (self.want_ready && !self.ready)
            || (self.want.is_some() && self.want != self.told)
            || self.watchdog
    }

    /// Whether `READY=1` was sent (or there was no manager to send it to).
    pub fn ready_told(&self) -> bool {
        self.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver whose queue holds one datagram: the second send finds it
    /// full and returns at once, and the update is sent when room comes.
    /// The environment is this process's: the test sets `NOTIFY_SOCKET` in
    /// a child process of its own (the test binary again), so that no other
    /// test sees it.
    #[test]
    fn a_full_queue_is_left_for_later_not_waited_on() {
        const CHILD: &str = "SKACTIVATE_NOTIFY_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let dir = std::env::temp_dir().join(format!("ska-notify-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let st = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "notify::tests::a_full_queue_is_left_for_later_not_waited_on",
                    "--nocapture",
                ])
                .env(CHILD, &dir)
                .env("NOTIFY_SOCKET", dir.join("notify"))
                .status()
                .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            assert!(st.success());
            return;
        }
        let path = std::path::PathBuf::from(std::env::var_os("NOTIFY_SOCKET").unwrap());
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        // Fill the receiver's queue with datagrams of our own until a send
        // would wait (how many fit depends on net.unix.max_dgram_qlen).
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        let mut queued = 0;
        while filler.send_to(b"X=1\n", &path).is_ok() {
            queued += 1;
            assert!(queued < 100_000, "the queue never filled");
        }
        let mut n = Notifier::default();
        let t = std::time::Instant::now();
        n.update(true, "one");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(
            !n.ready_told(),
            "READY=1 cannot have gone into a full queue"
        );
        // Room again: the queued datagrams read, READY=1 goes with the
        // status as it is now.
        let mut buf = [0u8; 256];
        for _ in 0..queued {
            rx.recv(&mut buf).unwrap();
        }
        n.update(true, "two");
        assert!(n.ready_told());
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1\nSTATUS=two\n");
        // The same status is not sent twice; a new one is.
        n.update(true, "two");
        n.update(true, "three");
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STATUS=three\n");
        assert!(!n.owes());
        // A reload: READY=1 is said again after it.
        n.reloading();
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"RELOADING=1\n");
        assert!(n.update(true, "three"));
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1\n");
        // Pings and a status that find the queue full are owed, and go
        // together, once, when there is room.
        let mut queued = 0;
        while filler.send_to(b"X=1\n", &path).is_ok() {
            queued += 1;
        }
        assert!(!n.watchdog());
        assert!(!n.watchdog());
        assert!(!n.update(true, "four"));
        assert!(n.owes());
        for _ in 0..queued {
            rx.recv(&mut buf).unwrap();
        }
        assert!(n.flush());
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STATUS=four\nWATCHDOG=1\n");
        assert!(!n.owes());
        assert!(rx.recv(&mut buf).is_err(), "nothing else was sent");
    }
}
