//! The `filter` array (see `ebpf/skactivate.h`): a Bloom filter with one
//! hash function over the keys of the `entries` hash; and the `cache`
//! array beside it, which holds most of its entries. The program asks the
//! filter before each hash probe, and a key whose bit is clear costs an
//! array read instead of a hash lookup: most probes of a miss, and the
//! probes of the lengths a hit passes over on its way. A key whose bit is
//! set is looked for in its cache buckets next, and only then in the hash:
//! a cached hit costs three array reads.
//!
//! Both maps are created `BPF_F_MMAPABLE` and written through a shared
//! mapping, each word with one aligned 8-byte store, so the program on
//! another CPU reads the old word or the new one. A filter word is never
//! written without every bit a present entry needs: bits are set before
//! their entry enters the hash, and only recomputing words from the index
//! clears the bits of entries gone. A cache slot is filled after its entry
//! enters the hash and emptied before it leaves, and the program trusts a
//! slot only where its tag, written last, carries the hash of the key it
//! probes. The headers are written last, and the program does not test
//! them: new maps are filled before a program that reads them runs beside
//! any entry (`Dispatcher::swap_program`; a fresh dispatcher has none).

use std::borrow::Borrow;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use super::*;

/// The filter map's pin name, and where a new one is pinned while filled.
pub(super) const FILTER: &str = "filter";
pub(super) const FILTER_PIN_NEW: &str = "filter-new";
/// The same for the cache map.
pub(super) const CACHE: &str = "cache";
pub(super) const CACHE_PIN_NEW: &str = "cache-new";

/// Removed entries, past which (and past the entries present) the words are
/// recomputed: stale bits only cost false positives, so this is rare.
const STALE_MIN: usize = 4096;

/// Words of a cache line: a bucket.
const LINE: usize = abi::CACHE_LINE_WORDS as usize;
/// Words of a cache slot: the key's three, then the tag.
const SLOT_WORDS: usize = 4;
/// From how many buckets on (as bits: 4 MiB of cache) `Filter::cache_many`
/// writes in the cache's order.
const GROUPED_CACHE_LOG2: u32 = 16;
/// Keys `Filter::cache_many` orders at a time.
const CACHE_STEP: usize = 1 << 16;
/// How many keys ahead `Filter::cache_many` asks for the lines it will read.
const PREFETCH_AHEAD: usize = 8;

/// Ask the CPU to bring the line of `word` into its cache: a hint, which
/// reads nothing and cannot fault.
fn prefetch(word: &AtomicU64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; the address is a live reference's.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(word.as_ptr().cast::<i8>().cast_const());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = word;
}

type Key = aya::maps::lpm_trie::Key<BindingKey>;

/// An mmapable array map's words, mapped shared while they are written.
///
/// A shared mapping of a BPF array counts every page of it in the
/// process's resident set (the kernel maps them all at once), though the
/// memory is the map's: 34 MiB for the filter and cache of a hash of 2^20
/// entries. So the words are mapped only while a change is written
/// (`map`, `unmap`), and the daemon's footprint is what it holds itself.
struct Words {
    /// The map, held for as long as the value lives.
    map: MapData,
    /// The mapping, while mapped.
    ptr: Option<NonNull<AtomicU64>>,
    len: usize,
    map_len: usize,
    what: &'static str,
}

// SAFETY: the mapping is owned by this value (unmapped only by `unmap` or
// when it is dropped) and accessed only through atomics, from any thread.
unsafe impl Send for Words {}

impl Drop for Words {
    fn drop(&mut self) {
        self.unmap();
    }
}

impl Words {
    /// The `len` words of `map` (its size checked by the caller), not
    /// mapped yet.
    fn new(map: MapData, len: usize, what: &'static str) -> Words {
        Words {
            map,
            ptr: None,
            len,
            map_len: (len * 8).next_multiple_of(page_size()),
            what,
        }
    }

    /// A new shared mapping of the first `len` bytes of the map.
    fn mmap(&self, len: usize) -> Result<NonNull<AtomicU64>> {
        // SAFETY: a new shared mapping of the map's fd; the kernel checks
        // that the map is mmapable and at least this long.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(sys_err(self.what)(io::Error::last_os_error()));
        }
        Ok(NonNull::new(ptr.cast()).expect("mmap succeeded"))
    }

    /// Map the words, unless they are.
    fn map(&mut self) -> Result<()> {
        if self.ptr.is_none() {
            self.ptr = Some(self.mmap(self.map_len)?);
        }
        Ok(())
    }

    /// Word 0, read through a mapping of its page only where the words are
    /// not mapped.
    fn first(&self) -> Result<u64> {
        if self.ptr.is_some() {
            return Ok(self.word(0).load(Ordering::Acquire));
        }
        let page = page_size();
        let ptr = self.mmap(page)?;
        // SAFETY: the first word of the page just mapped, 8-byte aligned.
        let first = unsafe { ptr.as_ref() }.load(Ordering::Acquire);
        // SAFETY: mapped above with this length; no reference outlives it.
        unsafe { libc::munmap(ptr.as_ptr().cast(), page) };
        Ok(first)
    }

    /// Unmap the words, if they are mapped.
    fn unmap(&mut self) {
        if let Some(ptr) = self.ptr.take() {
            // SAFETY: mapped in `map` with this length, not unmapped since;
            // no reference into it outlives the `&self` it was taken from.
            unsafe { libc::munmap(ptr.as_ptr().cast(), self.map_len) };
        }
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len);
        let ptr = self.ptr.expect("words mapped before they are used");
        // SAFETY: in bounds of the mapping, 8-byte aligned (page-aligned
        // start), mapped as long as `self` is borrowed (`unmap` takes
        // `&mut self`).
        unsafe { &*ptr.as_ptr().add(i) }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// The filter and cache of an `entries` hash of `capacity` entries.
pub(super) struct Filter {
    /// The filter's words, header first.
    words: Words,
    /// The cache's words, header line first.
    cache: Words,
    /// log2 of the number of filter bits.
    log2: u32,
    /// log2 of the cache's buckets.
    cache_log2: u32,
    /// Entries removed since the words were last computed from the index.
    stale: usize,
    /// The cache was made empty (all zeros) by this process, which has
    /// filled slots only from its index since: there is no slot to check
    /// against the index (see `sync_cache`).
    cache_new: bool,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("log2", &self.log2)
            .field("words", &self.words.len)
            .field("cache_log2", &self.cache_log2)
            .finish()
    }
}

/// The words (header excluded) a filter of 2^`log2` bits needs for `keys`.
fn words_for(keys: impl Iterator<Item = Key>, log2: u32) -> Vec<u64> {
    let mut words = vec![0u64; 1 << (log2 - 6)];
    for key in keys {
        let bit = abi::filter_bit(abi::key_hash(&key), log2);
        words[(bit >> 6) as usize] |= 1 << (bit & 63);
    }
    words
}

impl Filter {
    /// The filter `map`, mapped, and the cache `cache` of `cache_buckets`
    /// buckets, not yet (see `map`): the companions of an `entries` hash
    /// of `capacity` entries (their sizes checked by the caller).
    pub(super) fn open(
        map: MapData,
        cache: MapData,
        (capacity, cache_buckets): (u32, u32),
    ) -> Result<Filter> {
        debug_assert!(abi::cache_buckets_fit(cache_buckets, capacity));
        let mut words = Words::new(map, abi::filter_words(capacity) as usize, "mmap (filter)");
        words.map()?;
        let cache = Words::new(cache, (1 + cache_buckets as usize) * LINE, "mmap (cache)");
        Ok(Filter {
            words,
            cache,
            log2: abi::filter_log2(capacity),
            cache_log2: cache_buckets.trailing_zeros(),
            stale: 0,
            cache_new: false,
        })
    }

    /// As `open`, for a filter and cache just created (`pinned::stage`),
    /// all zeros.
    pub(super) fn open_new(map: MapData, cache: MapData, sizes: (u32, u32)) -> Result<Filter> {
        let mut f = Self::open(map, cache, sizes)?;
        f.cache_new = true;
        Ok(f)
    }

    /// The cache's buckets.
    pub(super) fn cache_buckets(&self) -> u32 {
        1 << self.cache_log2
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        self.words.word(i)
    }

    fn slot_word(&self, i: usize) -> &AtomicU64 {
        self.cache.word(i)
    }

    /// Map the filter and the cache for writing, unless they are.
    pub(super) fn map(&mut self) -> Result<()> {
        self.words.map()?;
        self.cache.map()
    }

    /// Unmap them: a change is written.
    pub(super) fn unmap(&mut self) {
        self.words.unmap();
        self.cache.unmap();
    }

    /// Whether the cache's header is written: the cache has been made to
    /// agree with the hash once, and its writers keep it so. Read without
    /// mapping the whole cache (32 MiB at 2^20 entries).
    pub(super) fn cache_active(&self) -> Result<bool> {
        Ok(self.cache.first()? != 0)
    }

    /// Whether the header is written.
    fn active(&self) -> bool {
        self.word(0).load(Ordering::Relaxed) != 0
    }

    /// Make the words exactly what `keys` need (a word is stored only where
    /// it differs), then the header. On a consistent filter this writes
    /// nothing: adopting does not rewrite the map.
    pub(super) fn fill(&mut self, keys: impl Iterator<Item = Key>) {
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
    pub(super) fn add<'a>(&mut self, keys: impl Iterator<Item = &'a Key>) {
        for key in keys {
            let bit = abi::filter_bit(abi::key_hash(key), self.log2);
            self.word(1 + (bit >> 6) as usize)
                .fetch_or(1 << (bit & 63), Ordering::Release);
        }
    }

    /// `n` entries left the hash: once enough bits are stale, recompute the
    /// words from what is present (`present`, `entries` of them).
    pub(super) fn removed(&mut self, n: usize, entries: usize, present: impl Iterator<Item = Key>) {
        self.stale += n;
        if self.stale > STALE_MIN.max(entries) {
            self.fill(present);
        }
    }
    /// The first words of the two cache buckets of a key of hash `hash`.
    fn buckets(&self, hash: u64) -> [usize; 2] {
        let first = hash >> (64 - self.cache_log2);
        let mask = (1u64 << self.cache_log2) - 1;
        [first, first ^ abi::cache_other(hash, mask)].map(|b| LINE + b as usize * LINE)
    }

    /// The slots (their first words) of a bucket.
    fn slots(bucket: usize) -> impl Iterator<Item = usize> {
        (bucket..bucket + LINE).step_by(SLOT_WORDS)
    }

    /// The slot (its first word) of `words` in its buckets, if cached.
    fn find(&self, hash: u64, words: &[u64; 3]) -> Option<usize> {
        self.buckets(hash)
            .into_iter()
            .flat_map(Self::slots)
            .find(|&s| {
                let tag = self.slot_word(s + 3).load(Ordering::Acquire);
                tag & abi::CACHE_TAG_DEST != 0
                    && (tag ^ hash) >> 16 == 0
                    && (0..3).all(|i| self.slot_word(s + i).load(Ordering::Relaxed) == words[i])
            })
    }

    /// Cache each of `keys`, now in the hash with its destination (see
    /// `cache_words`): in the order of
    /// their first buckets where the cache is larger than the CPU's caches,
    /// so that they are written front to back, not a cache miss or two
    /// each. Where buckets run full, which keys find room depends on the
    /// order; any is right (a key not cached is found in the hash).
    pub(super) fn cache_many<K: Borrow<Key>>(&mut self, keys: impl Iterator<Item = (K, u32)>) {
        let mut keys = keys.map(|(key, id)| {
            let key = key.borrow();
            (abi::key_hash(key), abi::filter_key_words(key), id)
        });
        loop {
            // A step at a time (2.5 MiB), however many there are.
            let step: Vec<(u64, [u64; 3], u32)> = keys.by_ref().take(CACHE_STEP).collect();
            if step.is_empty() {
                return;
            }
            let step = if self.cache_log2 >= GROUPED_CACHE_LOG2 {
                let shift = 64 - self.cache_log2;
                index::grouped(step, self.cache_log2, |(hash, ..)| hash >> shift)
            } else {
                step
            };
            for (i, &(hash, words, id)) in step.iter().enumerate() {
                // The buckets of a key a few steps on are asked for now:
                // the second bucket of each key is anywhere in the cache.
                if let Some(&(ahead, ..)) = step.get(i + PREFETCH_AHEAD) {
                    for b in self.buckets(ahead) {
                        prefetch(self.slot_word(b));
                    }
                }
                self.cache_words(hash, words, id);
            }
        }
    }

    /// Cache the key of `hash` and `words` with destination `id`, unless it
    /// is there or both its buckets are full: in an empty slot of the
    /// emptier bucket, the first on a tie.
    fn cache_words(&mut self, hash: u64, words: [u64; 3], id: u32) {
        if self.find(hash, &words).is_some() {
            return;
        }
        // Per bucket: its first empty slot, and how many it has.
        let [first, second] = self.buckets(hash).map(|b| {
            let mut free =
                Self::slots(b).filter(|&s| self.slot_word(s + 3).load(Ordering::Relaxed) == 0);
            let slot = free.next();
            (slot, slot.map_or(0, |_| 1 + free.count()))
        });
        let pick = if first.1 >= second.1 {
            first.0
        } else {
            second.0
        };
        let Some(s) = pick else { return };
        for (i, &w) in words.iter().enumerate() {
            self.slot_word(s + i).store(w, Ordering::Relaxed);
        }
        let tag = hash & !abi::CACHE_TAG_DEST | (u64::from(id) + 1);
        self.slot_word(s + 3).store(tag, Ordering::Release);
    }

    /// Take `keys` out of the cache, before they leave the hash.
    pub(super) fn uncache<'a>(&mut self, keys: impl Iterator<Item = &'a Key>) {
        for key in keys {
            if let Some(s) = self.find(abi::key_hash(key), &abi::filter_key_words(key)) {
                self.slot_word(s + 3).store(0, Ordering::Release);
            }
        }
        // The tags are empty before any later store lands in their slots.
        fence(Ordering::SeqCst);
    }

    /// Make the cache agree with the index (`get`: an entry's destination
    /// there): a slot holding what the index does not is emptied, and an
    /// entry is cached where its bucket has room. On a cache that agrees,
    /// as one this process kept, this writes nothing; a new one's slots,
    /// all empty, are not read (32 MiB at the most).
    pub(super) fn sync_cache(
        &mut self,
        get: impl Fn(&Key) -> Option<u32>,
        entries: impl Iterator<Item = (Key, u32)>,
    ) {
        let check = if std::mem::take(&mut self.cache_new) {
            0..0
        } else {
            LINE..self.cache.len
        };
        for s in check.step_by(SLOT_WORDS) {
            let tag = self.slot_word(s + 3).load(Ordering::Relaxed);
            if tag == 0 {
                continue;
            }
            let words = [0, 1, 2].map(|i| self.slot_word(s + i).load(Ordering::Relaxed));
            let key = abi::key_from_words(&words);
            let hash = abi::key_hash(&key);
            let right = tag & abi::CACHE_TAG_DEST != 0
                && (tag ^ hash) >> 16 == 0
                && self.buckets(hash).contains(&(s - s % LINE))
                && get(&key).map(|id| u64::from(id) + 1) == Some(tag & abi::CACHE_TAG_DEST);
            if !right {
                self.slot_word(s + 3).store(0, Ordering::Release);
            }
        }
        fence(Ordering::SeqCst);
        self.cache_many(entries);
        if self.slot_word(0).load(Ordering::Relaxed) == 0 {
            self.slot_word(1)
                .store((1 << self.cache_log2) - 1, Ordering::Relaxed);
            self.slot_word(0)
                .store(u64::from(64 - self.cache_log2), Ordering::Release);
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
