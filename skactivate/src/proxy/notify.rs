//! Telling the service manager how the proxy is doing, without waiting on it.
//!
//! The proxy serves every connection from one thread. `sd_notify` sends on
//! a blocking datagram socket: when the manager's queue is full (a PID 1
//! busy with a reload, a receiver that reads late), the send waits, and
//! with it every connection of the proxy. A status line is not worth
//! that. [`Notifier`] sends without waiting; a message the queue has no
//! room for is sent again at the next look ([`Notifier::update`]), with
//! the status as it is by then. `READY=1` goes out with the first status
//! that gets through.

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
    ready: bool,
    told: Option<String>,
}

impl Notifier {
    /// Tell the manager `status`, and `READY=1` with it if `ready` and not
    /// yet told, unless it was told exactly that already. Never waits: a
    /// message that finds the manager's queue full is left for the next
    /// call. Other errors (no manager listening) are logged at debug level
    /// and count as told: there is nobody to tell.
    pub fn update(&mut self, ready: bool, status: &str) {
        let owe_ready = ready && !self.ready;
        if !owe_ready && self.told.as_deref() == Some(status) {
            return;
        }
        let status_state = NotifyState::Status(status);
        let sent = if owe_ready {
            notify_nowait(&[NotifyState::Ready, status_state])
        } else {
            notify_nowait(&[status_state])
        };
        match sent {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => tracing::debug!("NOTIFY_SOCKET: {e}"),
        }
        self.ready |= owe_ready;
        self.told = Some(status.to_owned());
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
                    "proxy::notify::tests::a_full_queue_is_left_for_later_not_waited_on",
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
        assert!(rx.recv(&mut buf).is_err(), "nothing else was sent");
    }
}
