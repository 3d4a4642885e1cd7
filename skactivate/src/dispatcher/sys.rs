//! The few `bpf(2)` commands aya 0.14 does not expose: running a program
//! (`BPF_PROG_TEST_RUN`, not offered for sk_lookup), replacing a link's program
//! (`BPF_LINK_UPDATE`, private in aya), link and program info, and the element
//! operations of the SOCKMAP, whose 8-byte values aya's `SockMap` refuses.
//!
//! Each attr struct is the prefix of the kernel's `union bpf_attr` member for
//! that command; the kernel zero-fills what a shorter attr leaves out.
//!
//! Soundness: `bpf()` is the one `unsafe fn`; every public function is safe
//! for any fd it is given. Where the kernel *writes* into a Rust value (a
//! lookup, a next key, a batch, an info struct, a test run's context), the
//! value is `aya::Pod` (valid for every bit pattern) and the kernel cannot
//! write more than the value holds: info and test-run sizes are passed to
//! it, and map element sizes are checked against the map's own
//! (`BPF_OBJ_GET_INFO_BY_FD`) before the call, so a map of other sizes gets
//! `EINVAL` rather than a buffer overrun. Where the kernel only *reads* (an
//! update, a delete) a map of other sizes makes it read past the value: the
//! result is `EFAULT` or a wrong element, never a write into our memory.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aya_obj::generated::{BPF_F_NO_PREALLOC, BPF_F_REPLACE, bpf_cmd, bpf_map_type};

const BPF_MAP_CREATE: libc::c_long = bpf_cmd::BPF_MAP_CREATE as libc::c_long;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = bpf_cmd::BPF_MAP_LOOKUP_ELEM as libc::c_long;
const BPF_MAP_UPDATE_ELEM: libc::c_long = bpf_cmd::BPF_MAP_UPDATE_ELEM as libc::c_long;
const BPF_MAP_DELETE_ELEM: libc::c_long = bpf_cmd::BPF_MAP_DELETE_ELEM as libc::c_long;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = bpf_cmd::BPF_MAP_GET_NEXT_KEY as libc::c_long;
const BPF_OBJ_PIN: libc::c_long = bpf_cmd::BPF_OBJ_PIN as libc::c_long;
const BPF_OBJ_GET: libc::c_long = bpf_cmd::BPF_OBJ_GET as libc::c_long;
const BPF_PROG_TEST_RUN: libc::c_long = bpf_cmd::BPF_PROG_TEST_RUN as libc::c_long;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = bpf_cmd::BPF_PROG_GET_FD_BY_ID as libc::c_long;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long;
const BPF_MAP_UPDATE_BATCH: libc::c_long = bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long;
const BPF_MAP_DELETE_BATCH: libc::c_long = bpf_cmd::BPF_MAP_DELETE_BATCH as libc::c_long;
const BPF_LINK_UPDATE: libc::c_long = bpf_cmd::BPF_LINK_UPDATE as libc::c_long;
const BPF_LINK_DETACH: libc::c_long = bpf_cmd::BPF_LINK_DETACH as libc::c_long;

/// Map types (`enum bpf_map_type`) the dispatcher uses.
pub const MAP_TYPE_HASH: u32 = bpf_map_type::BPF_MAP_TYPE_HASH as u32;
pub const MAP_TYPE_ARRAY: u32 = bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
pub const MAP_TYPE_PERCPU_ARRAY: u32 = bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as u32;
pub const MAP_TYPE_LPM_TRIE: u32 = bpf_map_type::BPF_MAP_TYPE_LPM_TRIE as u32;
pub const MAP_TYPE_SOCKMAP: u32 = bpf_map_type::BPF_MAP_TYPE_SOCKMAP as u32;
const MAP_TYPE_LRU_HASH: u32 = bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32;

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
///
/// `T` must be a `#[repr(C)]` prefix of the `union bpf_attr` member of `cmd`,
/// and every pointer in it must point to a live buffer of the size and type
/// the kernel reads from or writes to for `cmd`, valid for any bit pattern
/// the kernel may write (see the `Pod` bounds of the callers).
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller's contract; the kernel reads at most size_of::<T>()
    // bytes of `attr`, which is live for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_from(r: libc::c_long) -> OwnedFd {
    let fd = i32::try_from(r).expect("the kernel returns an int fd");
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("fds are non-negative")
}

fn ptr<T>(p: *const T) -> u64 {
    p as usize as u64
}

/// `BPF_OBJ_GET` and `BPF_OBJ_PIN` take a path and, for a pin, the fd.
fn obj_path(cmd: libc::c_long, path: &Path, fd: u32) -> io::Result<libc::c_long> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = Attr {
        pathname: ptr(c.as_ptr()),
        bpf_fd: fd,
        file_flags: 0,
    };
    // SAFETY: Attr is the BPF_OBJ_GET/BPF_OBJ_PIN prefix; `c` outlives the call.
    unsafe { bpf(cmd, &mut attr) }
}

/// `BPF_OBJ_GET`: open a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    obj_path(BPF_OBJ_GET, path, 0).map(fd_from)
}

/// `BPF_OBJ_PIN`: pin an object at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    obj_path(BPF_OBJ_PIN, path, raw(fd)).map(drop)
}

/// The parts of `struct bpf_link_info` skactivate reads, for a netns link.
#[derive(Debug, Clone, Copy)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// 0 once the network namespace is gone (the link is auto-detached).
    pub netns_ino: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn obj_info<T: Default + aya::Pod>(fd: BorrowedFd<'_>) -> io::Result<T> {
    let mut info = T::default();
    let mut attr = InfoAttr {
        bpf_fd: raw(fd),
        info_len: u32::try_from(size_of::<T>()).expect("small struct"),
        info: ptr(&mut info as *mut T),
    };
    // SAFETY: InfoAttr is the info prefix; `info` is a live Pod of info_len bytes.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info { type, id, prog_id; union (8-aligned) { netns { netns_ino, attach_type } } }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Info {
        link_type: u32,
        id: u32,
        prog_id: u32,
        pad: u32,
        netns_ino: u32,
        attach_type: u32,
    }
    // SAFETY: u32 fields, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for Info {}
    let i: Info = obj_info(link)?;
    Ok(LinkInfo {
        id: i.id,
        prog_id: i.prog_id,
        netns_ino: i.netns_ino,
    })
}

/// The parts of `struct bpf_map_info` skactivate reads.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

// SAFETY: u32 fields, no padding; any bit pattern is valid.
unsafe impl aya::Pod for MapInfo {}

pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    obj_info(map)
}

/// The parts of `struct bpf_prog_info` skactivate reads.
#[derive(Debug, Clone, Copy)]
pub struct ProgInfo {
    pub id: u32,
    pub tag: [u8; 8],
}

pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Info {
        prog_type: u32,
        id: u32,
        tag: [u8; 8],
    }
    // SAFETY: u32 and bytes, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for Info {}
    let i: Info = obj_info(prog)?;
    Ok(ProgInfo {
        id: i.id,
        tag: i.tag,
    })
}

/// `BPF_PROG_GET_FD_BY_ID`. The kernel allows it only with CAP_SYS_ADMIN, so
/// the dispatcher never uses it (it opens its program through a pin); tests
/// and diagnostics do, to see whether a program still exists.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = Attr {
        prog_id: id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: Attr is the BPF_PROG_GET_FD_BY_ID prefix; no pointers.
    unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }.map(fd_from)
}

/// `BPF_LINK_UPDATE`: atomically swap the link's program; with `old`
/// (`BPF_F_REPLACE`) only if it still runs that one.
pub fn link_update(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: raw(link),
        new_prog_fd: raw(new),
        flags: if old.is_some() { BPF_F_REPLACE } else { 0 },
        old_prog_fd: old.map_or(0, raw),
    };
    // SAFETY: Attr is the BPF_LINK_UPDATE prefix; no pointers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// `BPF_LINK_DETACH`: detach the link's program now. Dropping the last
/// reference does too, but when that reference is a bpffs pin the kernel
/// releases the link from a work queue, a moment later.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
    }
    let mut attr = Attr { link_fd: raw(link) };
    // SAFETY: Attr is the BPF_LINK_DETACH prefix; no pointers.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// `MEMBARRIER_CMD_GLOBAL` (linux/membarrier.h).
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Wait until every program run that began before this call has ended,
/// so that a map value no run reads any more can be taken away. A BPF
/// program runs inside an RCU read-side section, and
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()` in the
/// kernel (kernel/sched/membarrier.c, since Linux 4.3) wherever there is
/// more than one CPU. Where it is refused (a kernel with `nohz_full=`
/// says EINVAL; a seccomp filter without it, EPERM), sleep instead: far
/// longer than a program runs, though not a guarantee.
pub fn wait_for_program_runs() {
    // SAFETY: membarrier takes two ints and no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        tracing::debug!(
            "membarrier(MEMBARRIER_CMD_GLOBAL): {}; sleeping 50 ms instead",
            io::Error::last_os_error()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// What one `BPF_PROG_TEST_RUN` of an sk_lookup program returned.
#[derive(Debug, Clone, Copy)]
pub struct TestRun<C> {
    pub retval: u32,
    /// Mean ns per run, as the kernel measured it over `repeat` runs.
    pub duration_ns: u32,
    pub ctx_out: C,
}

/// `BPF_PROG_TEST_RUN` with a context and no packet data (what sk_lookup takes).
pub fn prog_test_run<C: aya::Pod>(
    prog: BorrowedFd<'_>,
    ctx_in: &C,
    repeat: u32,
) -> io::Result<TestRun<C>> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        pad: u32,
    }
    let mut out = *ctx_in;
    let size = u32::try_from(size_of::<C>()).expect("small ctx");
    let mut attr = Attr {
        prog_fd: raw(prog),
        retval: 0,
        data_size_in: 0,
        data_size_out: 0,
        data_in: 0,
        data_out: 0,
        repeat,
        duration: 0,
        ctx_size_in: size,
        ctx_size_out: size,
        ctx_in: ptr(ctx_in as *const C),
        ctx_out: ptr(&mut out as *mut C),
        flags: 0,
        cpu: 0,
        batch_size: 0,
        pad: 0,
    };
    // SAFETY: Attr is the test-run prefix; ctx_in and ctx_out are live Pod
    // values of ctx_size_in/out bytes.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(TestRun {
        retval: attr.retval,
        duration_ns: attr.duration,
        ctx_out: out,
    })
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64, // or next_key
    flags: u64,
}

/// The batch operations' part of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_UPDATE_ELEM` of a sock map: the value is the socket's fd as u64.
pub fn sockmap_insert(map: BorrowedFd<'_>, key: u32, sock: BorrowedFd<'_>) -> io::Result<()> {
    let value = u64::from(raw(sock));
    let mut attr = ElemAttr {
        map_fd: raw(map),
        pad: 0,
        key: ptr(&key),
        value: ptr(&value),
        flags: 0, // BPF_ANY: a new socket replaces the old one
    };
    // SAFETY: ElemAttr; key and value are live Pod values of the map's sizes.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// `BPF_MAP_LOOKUP_ELEM` of a sock map with 8-byte values: the socket's cookie,
/// or `None` when the key is absent (its socket closed or never came).
pub fn sockmap_cookie(map: BorrowedFd<'_>, key: u32) -> io::Result<Option<u64>> {
    // The kernel writes the cookie, a u64, only into a SOCKMAP whose value
    // size is 8 (else ENOSPC); any other map writes its own value size.
    check_map(map, &[MAP_TYPE_SOCKMAP], size_of::<u32>(), size_of::<u64>())?;
    // SAFETY: checked just above.
    unsafe { lookup_elem(map, &key) }
}

/// `BPF_MAP_UPDATE_BATCH` (`BPF_ANY`: the kernel takes no other flag for a
/// batch): `values[i]` for `keys[i]`, in order. Returns how many went in, and
/// the error that stopped the rest, if any.
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, io::Result<()>) {
    assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: ptr(keys.as_ptr()),
        values: ptr(values.as_ptr()),
        count: u32::try_from(keys.len()).expect("batch fits u32"),
        map_fd: raw(map),
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: BatchAttr is the batch prefix; `count` Pod keys and values are live.
    let r = unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop);
    (attr.count as usize, r)
}

/// `BPF_MAP_LOOKUP_BATCH` of a hash map: every element, `chunk` per
/// syscall, handed to `each` in the kernel's order. An error says the map
/// (or the kernel) has no batch lookups before anything was read when
/// `each` was never called (ENOTSUPP, EINVAL on old kernels).
pub fn map_lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    mut each: impl FnMut(&K, &V),
) -> io::Result<()> {
    map_lookup_batch_buckets(map, chunk, 0, u32::MAX, |k, v, _| each(k, v))
}

/// `map_lookup_batch` from bucket `from` on, until a call ends at or past
/// bucket `until` (or at the end). A call reads whole buckets, so the last
/// one may read on past `until`: `each` is told which elements came from a
/// call that did (`true`), so that a reader of the buckets from `until` on
/// can be told apart.
pub fn map_lookup_batch_buckets<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    from: u32,
    until: u32,
    mut each: impl FnMut(&K, &V, bool),
) -> io::Result<()> {
    // Only the hash maps' cursor is the u32 below (a bucket index), and the
    // kernel writes `count` keys and values of the map's sizes.
    check_map(
        map,
        &[MAP_TYPE_HASH, MAP_TYPE_LRU_HASH],
        size_of::<K>(),
        size_of::<V>(),
    )?;
    // SAFETY: Pod types are valid for every bit pattern, zeros included.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
    // SAFETY: as above.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
    // The hash map's cursor is a bucket index.
    let mut token_in = from;
    let mut token_out = 0u32;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first && from == 0 {
                0
            } else {
                ptr(&token_in)
            },
            out_batch: ptr(&raw mut token_out),
            keys: ptr(keys.as_mut_ptr()),
            values: ptr(values.as_mut_ptr()),
            count: u32::try_from(chunk).expect("batch fits u32"),
            map_fd: raw(map),
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: BatchAttr is the batch prefix; the kernel writes at most `count`
        // Pod keys and values into the live buffers, and a u32 cursor.
        let r = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let n = (attr.count as usize).min(chunk);
        let past = r.is_err() || token_out >= until;
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            each(k, v, past && until != u32::MAX);
        }
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        if past {
            return Ok(());
        }
        first = false;
        token_in = token_out;
    }
}

/// `BPF_MAP_UPDATE_ELEM` of one element (`flags`: `BPF_ANY`, `BPF_NOEXIST`,
/// `BPF_EXIST`): the path for maps whose kernel has no batch operations.
pub fn map_update_elem<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: raw(map),
        pad: 0,
        key: ptr(key as *const K),
        value: ptr(value as *const V),
        flags,
    };
    // SAFETY: ElemAttr; key and value are live Pod values of the map's sizes.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// `BPF_MAP_DELETE_ELEM` of one key (ENOENT if absent).
pub fn map_delete_elem<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: raw(map),
        pad: 0,
        key: ptr(key as *const K),
        value: 0,
        flags: 0,
    };
    // SAFETY: ElemAttr; key is a live Pod value of the map's key size.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) }.map(drop)
}

/// `BPF_MAP_DELETE_BATCH`: `keys` out of the map, in order. Returns how
/// many went, and the error that stopped the rest (ENOENT for a key that is
/// absent: `keys[n]`), as `map_update_batch` does.
pub fn map_delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> (usize, io::Result<()>) {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: ptr(keys.as_ptr()),
        values: 0,
        count: u32::try_from(keys.len()).expect("batch fits u32"),
        map_fd: raw(map),
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: BatchAttr is the batch prefix; `count` Pod keys are live (the
    // kernel reads keys only).
    let r = unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) }.map(drop);
    ((attr.count as usize).min(keys.len()), r)
}

/// Every key of a map, handed to `each` in the kernel's order, holding one
/// key at a time; `each` must not delete keys (a walk whose previous key
/// vanished starts again). At most `max` keys.
pub fn map_for_each_key<K: aya::Pod>(
    map: BorrowedFd<'_>,
    max: usize,
    mut each: impl FnMut(&K),
) -> io::Result<()> {
    let info = map_info(map)?;
    check_sizes(&info, size_of::<K>(), info.value_size as usize)?;
    // SAFETY: Pod types are valid for every bit pattern, zeros included.
    let mut prev: K = unsafe { std::mem::zeroed() };
    for n in 0..max {
        // SAFETY: as above.
        let mut next: K = unsafe { std::mem::zeroed() };
        let mut attr = ElemAttr {
            map_fd: raw(map),
            pad: 0,
            key: if n == 0 { 0 } else { ptr(&raw const prev) },
            value: ptr(&raw mut next),
            flags: 0,
        };
        // SAFETY: ElemAttr; the previous key (or none) is live, and the next
        // key's buffer holds the map's key size (checked above).
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => each(&next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        prev = next;
    }
    Ok(())
}

/// `BPF_MAP_DELETE_ELEM`; absent is not an error.
pub fn sockmap_remove(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: raw(map),
        pad: 0,
        key: ptr(&key),
        value: 0,
        flags: 0,
    };
    // SAFETY: ElemAttr; the key is live.
    match unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        // A SOCKMAP says EINVAL for an empty slot (and for an index out of
        // range): absent unless the slot does hold a socket.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match sockmap_cookie(map, key)? {
            None => Ok(()),
            Some(_) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Every key of a map of at most `max` entries, in the kernel's order. (A
/// hash map restarts its walk when the previous key vanished meanwhile; the
/// bound keeps that from looping.)
pub fn map_keys<K: aya::Pod>(map: BorrowedFd<'_>, max: usize) -> io::Result<Vec<K>> {
    let info = map_info(map)?;
    check_sizes(&info, size_of::<K>(), info.value_size as usize)?;
    let mut keys: Vec<K> = Vec::new();
    while keys.len() <= max {
        // SAFETY: Pod types are valid for every bit pattern, zeros included.
        let mut next: K = unsafe { std::mem::zeroed() };
        let mut attr = ElemAttr {
            map_fd: raw(map),
            pad: 0,
            key: keys.last().map_or(0, |p| ptr(p as *const K)),
            value: ptr(&raw mut next),
            flags: 0,
        };
        // SAFETY: ElemAttr; the previous key (or none) is live, and the next
        // key's buffer holds the map's key size (checked above).
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
    Ok(keys)
}

/// `BPF_MAP_LOOKUP_ELEM` of a map that is not per-CPU: the value, or `None`
/// when the key is absent.
pub fn map_lookup_elem<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let info = map_info(map)?;
    if [MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_SOCKMAP].contains(&info.map_type) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    check_sizes(&info, size_of::<K>(), size_of::<V>())?;
    // SAFETY: checked just above; per-CPU maps, which write more, refused.
    unsafe { lookup_elem(map, key) }
}

/// `BPF_MAP_LOOKUP_ELEM`: the value, or `None` when the key is absent.
///
/// # Safety
///
/// What the kernel writes for this map's lookup must be exactly
/// `size_of::<V>()` bytes (the caller checked the map's type and sizes).
unsafe fn lookup_elem<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    // SAFETY: Pod types are valid for every bit pattern, zeros included.
    let mut value: V = unsafe { std::mem::zeroed() };
    let mut attr = ElemAttr {
        map_fd: raw(map),
        pad: 0,
        key: ptr(key as *const K),
        value: ptr(&raw mut value),
        flags: 0,
    };
    // SAFETY: ElemAttr; the key is live and the value's buffer holds what
    // the kernel writes (the caller's contract).
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_CREATE` of a hash map with `BPF_F_NO_PREALLOC`: memory only for
/// the elements that exist. `name` is cut to the kernel's 15 bytes.
pub fn create_hash_no_prealloc<K: aya::Pod, V: aya::Pod>(
    name: &str,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut map_name = [0u8; 16];
    let n = name.len().min(15);
    map_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut attr = Attr {
        map_type: MAP_TYPE_HASH,
        key_size: u32::try_from(size_of::<K>()).expect("small key"),
        value_size: u32::try_from(size_of::<V>()).expect("small value"),
        max_entries,
        map_flags: BPF_F_NO_PREALLOC,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    // SAFETY: Attr is the BPF_MAP_CREATE prefix; no pointers.
    unsafe { bpf(BPF_MAP_CREATE, &mut attr) }.map(fd_from)
}

/// A hash map for a unit test, or `None` (and why, on stderr) where this
/// process may not create BPF maps.
#[cfg(test)]
pub(crate) fn test_hash<K: aya::Pod, V: aya::Pod>(name: &str, max_entries: u32) -> Option<OwnedFd> {
    match create_hash_no_prealloc::<K, V>(name, max_entries) {
        Ok(m) => Some(m),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
            eprintln!("skipped: this process cannot create BPF maps ({e})");
            None
        }
        Err(e) => panic!("BPF_MAP_CREATE: {e}"),
    }
}

/// Refuse (`EINVAL`) a map whose type is not in `types` or whose key or
/// value size differs from the Rust types' the kernel is about to write.
fn check_map(map: BorrowedFd<'_>, types: &[u32], key: usize, value: usize) -> io::Result<()> {
    let info = map_info(map)?;
    if !types.contains(&info.map_type) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    check_sizes(&info, key, value)
}

fn check_sizes(info: &MapInfo, key: usize, value: usize) -> io::Result<()> {
    if info.key_size as usize == key && info.value_size as usize == value {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A map of other element sizes than the Rust types is refused before
    /// the kernel could write past them; matching types round-trip.
    #[test]
    fn element_sizes_are_checked_before_the_kernel_writes() {
        let Some(map) = test_hash::<u64, u64>("sys_test", 4) else {
            return;
        };
        let fd = map.as_fd();
        map_update_elem(fd, &7u64, &42u64, 0).unwrap();
        assert_eq!(map_lookup_elem::<u64, u64>(fd, &7).unwrap(), Some(42));
        assert_eq!(map_lookup_elem::<u64, u64>(fd, &8).unwrap(), None);
        assert_eq!(map_keys::<u64>(fd, 4).unwrap(), vec![7]);
        let mut seen = Vec::new();
        map_lookup_batch::<u64, u64>(fd, 2, |k, v| seen.push((*k, *v))).unwrap();
        assert_eq!(seen, vec![(7, 42)]);

        let einval = |r: io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EINVAL);
        assert!(einval(map_lookup_elem::<u64, u32>(fd, &7).map(drop)));
        assert!(einval(map_lookup_elem::<u32, u64>(fd, &7).map(drop)));
        assert!(einval(map_keys::<u32>(fd, 4).map(drop)));
        assert!(einval(map_lookup_batch::<u64, u32>(fd, 2, |_, _| {})));
        assert!(einval(sockmap_cookie(fd, 0).map(drop)));
        let info = map_info(fd).unwrap();
        assert_eq!(
            (
                info.map_type,
                info.key_size,
                info.value_size,
                info.max_entries
            ),
            (MAP_TYPE_HASH, 8, 8, 4)
        );
        assert_eq!(info.map_flags & BPF_F_NO_PREALLOC, BPF_F_NO_PREALLOC);
    }
}
