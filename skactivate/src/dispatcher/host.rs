//! What the dispatcher asks of the running kernel and process before it loads
//! anything: the kernel's release (for messages, never for decisions), the
//! memlock limit old kernels charge maps to, and the verifier's verdict in a
//! form an administrator can act on.

use std::io;

/// The running kernel's release (`uname -r`), for messages only: features are
/// probed, never inferred from it. `uname(2)` rather than /proc, which the
/// shipped unit hides (`ProcSubset=pid`).
pub fn kernel_release() -> String {
    // SAFETY: an all-zero utsname is valid; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "(unknown)".to_owned();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `RLIMIT_MEMLOCK` as (soft, hard); `None` stands for infinity.
pub fn memlock_limit() -> (Option<u64>, Option<u64>) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a live rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    let f = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    (f(r.rlim_cur), f(r.rlim_max))
}

/// Kernels before 5.11 charge every BPF map and program to `RLIMIT_MEMLOCK`
/// (of the user, checked against the caller's limit); later ones charge the
/// memory cgroup and ignore the limit. Raising it is harmless either way, so
/// it is raised unconditionally rather than after guessing from the release:
/// to infinity where the process may (CAP_SYS_RESOURCE, as bpftool does), else
/// the soft limit to the hard one, which is what the unit's `LimitMEMLOCK=`
/// sets.
pub fn raise_memlock() {
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `inf` is a live rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) } == 0 {
        return;
    }
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a live rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } == 0 && r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: as above; raising the soft limit up to the hard one needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) };
    }
}

/// The line of a verifier log that says why it refused: the last line that
/// is not one of the statistics the verifier appends.
pub fn verifier_verdict(log: &str) -> Option<String> {
    const STATS: [&str; 6] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
        "peak_states",
        "mark_read",
    ];
    log.lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !STATS.iter().any(|s| l.starts_with(s)))
        .map(str::to_owned)
}

/// Whether an error of `BPF_MAP_UPDATE_BATCH` says the map has no batch
/// operations (`ENOTSUPP`, 524, inside the kernel's own numbering, or
/// `EOPNOTSUPP`/`EINVAL` from kernels that check differently).
pub fn no_batch_support(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(524 | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_the_last_line_before_the_statistics() {
        let log = "0: R1=ctx() R10=fp0\n; int x\n45: (73) *(u8 *)(r10 -20) = r1\n\
                   attempt to corrupt spilled pointer on stack\n\
                   processed 45 insns (limit 1000000) max_states_per_insn 0 total_states 3\n\n";
        assert_eq!(
            verifier_verdict(log).as_deref(),
            Some("attempt to corrupt spilled pointer on stack")
        );
        assert_eq!(verifier_verdict("\n\n"), None);
    }

    #[test]
    fn the_release_is_what_uname_says() {
        let r = kernel_release();
        assert!(r.chars().next().is_some_and(|c| c.is_ascii_digit()), "{r}");
    }
}
