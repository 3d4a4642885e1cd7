//! The `filter` array: a Bloom filter with one hash function over the keys
//! of the `entries` hash (see `ebpf/skactivate.h`). The program asks it
//! before each hash probe, and a key whose bit is clear costs an array read
//! instead of a hash lookup: most probes of a miss, and the probes of the
//! lengths a hit passes over on its way.
//!
//! The map is created `BPF_F_MMAPABLE` and written through a shared mapping,
//! each word with one aligned 8-byte store, so the program on another CPU
//! reads the old word or the new one. A word is never written without every
//! bit a present entry needs: bits are set before their entry enters the
//! hash, and only recomputing words from the index clears the bits of
//! entries gone. The header (word 0, log2 of the bits) is written last, and
//! the program does not test it: a new filter is filled before a program
//! that reads it runs beside any entry (`Dispatcher::swap_program`; a fresh
//! dispatcher has none).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

/// The filter map's pin name, and where a new one is pinned while filled.
pub(super) const FILTER: &str = "filter";
pub(super) const FILTER_PIN_NEW: &str = "filter-new";

/// Removed entries, past which (and past the entries present) the words are
/// recomputed: stale bits only cost false positives, so this is rare.
const STALE_MIN: usize = 4096;

/// The filter of an `entries` hash of `capacity` entries.
pub(super) struct Filter {
    /// The map, held for as long as its words are mapped.
    _map: MapData,
    /// The words, header first, shared with the kernel.
    words: NonNull<AtomicU64>,
    len: usize,
    map_len: usize,
    /// log2 of the number of filter bits.
    log2: u32,
    /// Entries removed since the words were last computed from the index.
    stale: usize,
}

// SAFETY: the mapping is owned by this value (unmapped only when it is
// dropped) and accessed only through atomics, from any thread.
unsafe impl Send for Filter {}

impl Drop for Filter {
    fn drop(&mut self) {
        // SAFETY: mapped in `open` with this length, never unmapped before.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.map_len) };
    }
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("log2", &self.log2)
            .field("words", &self.len)
            .finish()
    }
}

/// The words (header excluded) a filter of 2^`log2` bits needs for `keys`.
fn words_for(
    keys: impl Iterator<Item = aya::maps::lpm_trie::Key<BindingKey>>,
    log2: u32,
) -> Vec<u64> {
    let mut words = vec![0u64; 1 << (log2 - 6)];
    for key in keys {
        let bit = abi::filter_bit(&key, log2);
        words[(bit >> 6) as usize] |= 1 << (bit & 63);
    }
    words
}

impl Filter {
    /// Map the filter `map`, the companion of an `entries` hash of
    /// `capacity` entries (its size checked by the caller).
    pub(super) fn open(map: MapData, capacity: u32) -> Result<Filter> {
        let len = abi::filter_words(capacity) as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let map_len = (len * 8).next_multiple_of(page);
        // SAFETY: a new shared mapping of the map's fd; the kernel checks
        // that the map is mmapable and at least this long.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(sys_err("mmap (filter)")(io::Error::last_os_error()));
        }
        Ok(Filter {
            _map: map,
            words: NonNull::new(ptr.cast()).expect("mmap succeeded"),
            len,
            map_len,
            log2: abi::filter_log2(capacity),
            stale: 0,
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len);
        // SAFETY: in bounds of the mapping, 8-byte aligned (page-aligned
        // start), alive as long as `self`.
        unsafe { &*self.words.as_ptr().add(i) }
    }

    /// Whether the header is written.
    fn active(&self) -> bool {
        self.word(0).load(Ordering::Relaxed) != 0
    }

    /// Make the words exactly what `keys` need (a word is stored only where
    /// it differs), then the header. On a consistent filter this writes
    /// nothing: adopting does not rewrite the map.
    pub(super) fn fill(
        &mut self,
        keys: impl Iterator<Item = aya::maps::lpm_trie::Key<BindingKey>>,
    ) {
        let want = words_for(keys, self.log2);
        for (i, &w) in want.iter().enumerate() {
            let word = self.word(1 + i);
            if word.load(Ordering::Relaxed) != w {
                word.store(w, Ordering::Release);
            }
        }
        self.stale = 0;
        if !self.active() {
            self.word(0).store(u64::from(self.log2), Ordering::Release);
        }
    }

    /// Set the bits of `keys`, before they enter the hash.
    pub(super) fn add<'a>(
        &mut self,
        keys: impl Iterator<Item = &'a aya::maps::lpm_trie::Key<BindingKey>>,
    ) {
        for key in keys {
            let bit = abi::filter_bit(key, self.log2);
            self.word(1 + (bit >> 6) as usize)
                .fetch_or(1 << (bit & 63), Ordering::Release);
        }
    }

    /// `n` entries left the hash: once enough bits are stale, recompute the
    /// words from what is present (`present`, `entries` of them).
    pub(super) fn removed(
        &mut self,
        n: usize,
        entries: usize,
        present: impl Iterator<Item = aya::maps::lpm_trie::Key<BindingKey>>,
    ) {
        self.stale += n;
        if self.stale > STALE_MIN.max(entries) {
            self.fill(present);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of a key are the key's bytes as the program reads them.
    #[test]
    fn key_words_are_the_keys_bytes() {
        let key = abi::binding_key(Protocol::Tcp, &"192.0.2.0/24".parse().unwrap(), 8080);
        // SAFETY: `Key<BindingKey>` is plain bytes, 24 of them.
        let bytes: [u8; 24] = unsafe { std::mem::transmute_copy(&key) };
        let want: Vec<u64> = bytes
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(abi::filter_key_words(&key).to_vec(), want);
    }

    /// A filter sized as the program's sizes it spreads the keys of the
    /// bench's workloads, IPv4 and IPv6 (where only the address's last 32
    /// bits and the port differ): at full capacity about 1 − e^(−1/16) of
    /// its bits are set, as for keys drawn at random.
    #[test]
    fn bits_spread_over_the_filter() {
        let capacity = 1u32 << 16;
        let log2 = abi::filter_log2(capacity);
        let v6_base = u128::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0));
        for v6 in [false, true] {
            let keys = (0..capacity).map(|i| {
                let low = 0xc612_0000 | (i >> 4);
                let addr = if v6 {
                    IpAddr::V6(std::net::Ipv6Addr::from(v6_base | u128::from(low)))
                } else {
                    IpAddr::V4(std::net::Ipv4Addr::from(low))
                };
                abi::binding_key(Protocol::Tcp, &IpNet::from(addr), 8000 + (i & 15) as u16)
            });
            let words = words_for(keys, log2);
            let set: u32 = words.iter().map(|w| w.count_ones()).sum();
            let fraction = f64::from(set) / f64::from(1u32 << log2);
            let expected = 1.0 - (-1.0f64 / 16.0).exp();
            assert!(
                (fraction - expected).abs() < 0.01,
                "IPv6 {v6}: {fraction} of the bits set, expected about {expected}"
            );
        }
    }
}
