//! `--mode splice`: each direction moves through a pipe with splice(2), as
//! systemd-socket-proxyd does, so the payload is never copied to user space.
//! Bytes the client sent before the backend was connected wait in the client
//! socket's receive queue and are the first spliced, in order; EOF is
//! forwarded with shutdown(SHUT_WR) once the pipe is empty.
//!
//! In sockmap mode a connection the kernel will not carry goes on here
//! after its opening (opening.rs), the bytes the opening holds written
//! first.

use std::cell::Cell;
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use super::sys;
use super::{Activity, Fault};

/// Each direction's pipe, as systemd-socket-proxyd's.
pub const PIPE_SIZE: usize = 256 * 1024;

/// One direction, `src` to `dst`, until EOF was forwarded: `held` (bytes
/// read from src before) first, then what src has. `spliced` counts the
/// bytes spliced to dst.
pub async fn relay(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    activity: &Activity,
    held: &[u8],
    spliced: &Cell<u64>,
) -> Result<(), Fault> {
    if !held.is_empty() {
        super::write_all(dst, held).await?;
        activity.touch();
    }
    let (pr, pw) = sys::pipe(PIPE_SIZE).map_err(Fault::Read)?;
    // The size we got (pipe-max-size may have capped it).
    // SAFETY: plain fcntl on our pipe.
    let cap = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&pw), libc::F_GETPIPE_SZ) };
    let cap = usize::try_from(cap).unwrap_or(4096).max(4096);
    let mut in_pipe = 0usize;
    let mut eof = false;
    loop {
        if eof && in_pipe == 0 {
            sys::shutdown_write(dst.get_ref().as_fd()).map_err(Fault::Write)?;
            return Ok(());
        }
        tokio::select! {
            r = src.readable(), if !eof && in_pipe < cap => {
                let mut g = r.map_err(Fault::Read)?;
                match g.try_io(|fd| sys::splice(fd.get_ref().as_fd(), pw.as_fd(), cap - in_pipe)) {
                    Err(_would_block) => {}
                    Ok(Ok(0)) => eof = true,
                    Ok(Ok(n)) => {
                        in_pipe += n;
                        activity.touch();
                    }
                    Ok(Err(e)) => return Err(Fault::Read(e)),
                }
            }
            w = dst.writable(), if in_pipe > 0 => {
                let mut g = w.map_err(Fault::Write)?;
                match g.try_io(|fd| sys::splice(pr.as_fd(), fd.get_ref().as_fd(), in_pipe)) {
                    Err(_would_block) => {}
                    Ok(Ok(n)) => {
                        in_pipe -= n;
                        spliced.set(spliced.get() + n as u64);
                    }
                    Ok(Err(e)) => return Err(Fault::Write(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{request_sent, run};
    use super::*;
    use std::io::Read;

    /// What the opening held goes first, then what src has, then EOF; only
    /// the latter counts as spliced.
    #[test]
    fn held_bytes_go_first_and_spliced_ones_are_counted() {
        run(async {
            let (src, _client, dst, mut backend) = request_sent(b"second");
            let spliced = Cell::new(0);
            relay(&src, &dst, &Activity::default(), b"first ", &spliced)
                .await
                .unwrap();
            assert_eq!(spliced.get(), 6);
            let mut got = Vec::new();
            backend.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"first second");
        });
    }
}
