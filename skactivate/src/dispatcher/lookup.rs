//! Lookup: where a packet would go, asked of the live program.

use super::*;

impl Dispatcher {
    /// Where a packet for `addr:port` would go, found by running the live
    /// program once with `BPF_PROG_TEST_RUN` (which counts in the metrics like
    /// real traffic). The program decides verdict and socket; the index tells
    /// which binding it used.
    pub fn lookup(&self, protocol: Protocol, addr: IpAddr, port: u16) -> Result<Lookup> {
        let run = self.test_run(protocol, addr, port, 1)?;
        let cookie = (run.ctx_out.cookie != 0).then_some(run.ctx_out.cookie);
        let verdict = match (run.retval, cookie) {
            (1, Some(_)) => Verdict::Redirect,
            (1, None) => Verdict::Pass,
            _ => Verdict::Drop,
        };
        let mut by_cookie = None;
        if let Some(c) = cookie {
            for &id in self.dests.keys() {
                if self.socket_cookie(id)? == Some(c) {
                    by_cookie = Some(id);
                }
            }
        }
        let candidates = self.matching_entries(protocol, addr, port)?;
        let chosen = match verdict {
            Verdict::Redirect => candidates.iter().find(|(_, id)| Some(*id) == by_cookie),
            Verdict::Drop => candidates.first(),
            Verdict::Pass => None,
        };
        Ok(Lookup {
            verdict,
            binding: chosen.map(|(b, _)| *b),
            destination: by_cookie
                .or(chosen.map(|(_, id)| *id))
                .and_then(|id| self.dests.get(&id))
                .map(|s| s.destination.clone()),
            cookie,
        })
    }

    /// The entries that cover `addr` on `port` (a specific one or `*`), in
    /// precedence order: longest prefix first, the specific port before `*`.
    pub(super) fn matching_entries(
        &self,
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    ) -> Result<Vec<(Binding, u32)>> {
        let mut out = Vec::new();
        for bits in self.kinds.lengths(Family::of(&addr), protocol) {
            let Ok(prefix) = IpNet::new(addr, bits) else {
                continue;
            };
            let prefix = prefix.trunc();
            let ports: &[u16] = if port == 0 { &[0] } else { &[port, 0] };
            for &p in ports {
                let e = Entry {
                    protocol,
                    prefix,
                    port: p,
                };
                if let Some(id) = self.entries.get(&e) {
                    out.push((e.binding(), id));
                }
            }
        }
        Ok(out)
    }

    /// Run the program `repeat` times on one lookup; the kernel reports the mean
    /// duration. Used by `lookup` and by the benchmarks.
    pub fn test_run(
        &self,
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
        repeat: u32,
    ) -> Result<sys::TestRun<abi::SkLookupCtx>> {
        test_run(self.program.as_fd(), protocol, addr, port, repeat)
    }
}

/// Run an sk_lookup program once per `repeat` on a synthetic lookup.
pub fn test_run(
    prog: BorrowedFd<'_>,
    protocol: Protocol,
    addr: IpAddr,
    port: u16,
    repeat: u32,
) -> Result<sys::TestRun<abi::SkLookupCtx>> {
    let mut ctx = abi::SkLookupCtx {
        protocol: u32::from(protocol.number()),
        local_port: u32::from(port),
        remote_port: 40000u16.to_be(),
        ..Default::default()
    };
    match addr {
        IpAddr::V4(a) => {
            ctx.family = libc::AF_INET as u32;
            ctx.local_ip4 = u32::from_ne_bytes(a.octets());
            ctx.remote_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        }
        IpAddr::V6(a) => {
            ctx.family = libc::AF_INET6 as u32;
            let o = a.octets();
            for (i, w) in ctx.local_ip6.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            ctx.remote_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        }
    }
    sys::prog_test_run(prog, &ctx, repeat).map_err(sys_err("BPF_PROG_TEST_RUN"))
}
