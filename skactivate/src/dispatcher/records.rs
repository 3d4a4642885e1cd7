//! Unit records: what the daemon knows of a registered unit beyond its map
//! entries (where its values came from, its sockets' addresses, when it
//! registered), kept with the pinned state so that a restart changes nothing
//! visible.
//!
//! On bpffs only BPF objects can be pinned, so the records live in a map of
//! their own that no program uses: `records`, a `BPF_MAP_TYPE_HASH` created
//! `BPF_F_NO_PREALLOC` (memory only for the records that exist). The
//! dispatcher stores opaque bytes; their meaning is the caller's.
//!
//! A record is split into chunks: key `{slot, chunk}`, value `{len, data}`.
//! Chunk 0 starts with a header: the record's total length, a generation and
//! the unit's name. A record is replaced by writing it under a new slot and
//! then deleting the old one, so a crash in between leaves two whole records
//! (the newer generation wins) or one, never a torn one that is believed: a
//! record whose chunks do not add up is dropped when read.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::{Dispatcher, DispatcherError, Result, sys};

/// The pin's name in the dispatcher's directory.
pub const RECORDS_PIN: &str = "records";
/// Chunks in all. With the sizes below a record of one socket unit takes one
/// chunk; 512 chunks hold about 220 KiB of records. The bucket array the
/// kernel allocates up front is 16 bytes per entry (8 KiB).
pub const MAX_CHUNKS: u32 = 512;
/// A chunk's payload. Key (8) + value (448) + the kernel's element header
/// (48) fit one 512-byte allocation.
const CHUNK_DATA: usize = 444;
/// Chunks of one record at most.
const MAX_RECORD_CHUNKS: u32 = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    slot: u32,
    chunk: u32,
}

// SAFETY: two u32, no padding; any bit pattern is valid.
unsafe impl aya::Pod for Key {}

#[repr(C)]
#[derive(Clone, Copy)]
struct Chunk {
    len: u32,
    data: [u8; CHUNK_DATA],
}

// SAFETY: a u32 and bytes, 448 bytes with no padding; any bit pattern is valid.
unsafe impl aya::Pod for Chunk {}
const _: () = assert!(size_of::<Chunk>() == 4 + CHUNK_DATA);

/// Header of chunk 0: total length of header + name + payload, generation,
/// name length; then the name, then the payload.
const HEADER: usize = 4 + 8 + 2;

/// Why a record could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the record of {unit} is {len} bytes, more than {max} bytes a record may have")]
    TooLarge {
        unit: String,
        len: usize,
        max: usize,
    },
    #[error("the records map is full ({MAX_CHUNKS} chunks)")]
    Full,
    #[error("unit name {0:?} is too long for a record")]
    UnitName(String),
    #[error("{path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

fn record_err(path: &Path) -> impl FnOnce(io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_owned(),
        source,
    }
}

fn create_map() -> io::Result<OwnedFd> {
    sys::create_hash_no_prealloc::<Key, Chunk>(RECORDS_PIN, MAX_CHUNKS)
}

fn lookup(map: BorrowedFd<'_>, key: &Key) -> io::Result<Option<Chunk>> {
    sys::map_lookup_elem(map, key)
}

fn update(map: BorrowedFd<'_>, key: &Key, value: &Chunk) -> io::Result<()> {
    sys::map_update_elem(map, key, value, 0)
}

fn delete(map: BorrowedFd<'_>, key: &Key) -> io::Result<()> {
    match sys::map_delete_elem(map, key) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// Bounded: the map holds at most MAX_CHUNKS keys.
fn keys(map: BorrowedFd<'_>) -> io::Result<Vec<Key>> {
    sys::map_keys(map, MAX_CHUNKS as usize)
}

/// The records map of one dispatcher and what it holds: unit → (slot,
/// generation, chunks).
pub struct Records {
    map: OwnedFd,
    slots: HashMap<String, (u32, u64, u32)>,
    used: u32,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("units", &self.slots.len())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DispatcherError + '_ {
    move |source| DispatcherError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Records {
    /// Open the records pinned in `dir`, or create and pin them (state left
    /// by a build that had none gets them here).
    pub fn open(dir: &Path) -> Result<Records> {
        let path = dir.join(RECORDS_PIN);
        let map = match sys::obj_get(&path) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let fd = create_map().map_err(|source| DispatcherError::Syscall {
                    call: "BPF_MAP_CREATE (records)",
                    source,
                })?;
                match sys::obj_pin(fd.as_fd(), &path) {
                    Ok(()) => fd,
                    // Pinned by someone else meanwhile: use theirs.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        sys::obj_get(&path).map_err(io_err(&path))?
                    }
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut records = Records {
            map,
            slots: HashMap::new(),
            used: 0,
        };
        records.load().map_err(io_err(&path))?;
        Ok(records)
    }

    /// Read every record; drop torn ones and all but the newest of a unit.
    fn load(&mut self) -> io::Result<()> {
        let fd = self.map.as_fd();
        let mut by_slot: BTreeMap<u32, Vec<Key>> = BTreeMap::new();
        let all = keys(fd)?;
        self.used = all.len() as u32;
        for k in all {
            by_slot.entry(k.slot).or_default().push(k);
        }
        let mut stale: Vec<u32> = Vec::new();
        for (slot, chunks) in &by_slot {
            match self.read_slot(*slot, chunks.len() as u32)? {
                Some((unit, generation, _)) => {
                    let n = chunks.len() as u32;
                    match self.slots.get(&unit) {
                        Some(&(_, g, _)) if g >= generation => stale.push(*slot),
                        Some(&(old, ..)) => {
                            stale.push(old);
                            self.slots.insert(unit, (*slot, generation, n));
                        }
                        None => {
                            self.slots.insert(unit, (*slot, generation, n));
                        }
                    }
                }
                None => stale.push(*slot),
            }
        }
        for slot in stale {
            for k in by_slot.get(&slot).into_iter().flatten() {
                delete(fd, k)?;
                self.used -= 1;
            }
        }
        Ok(())
    }

    /// A whole record from its chunks: (unit, generation, payload); `None`
    /// if its chunks do not add up.
    fn read_slot(&self, slot: u32, chunks: u32) -> io::Result<Option<(String, u64, Vec<u8>)>> {
        let fd = self.map.as_fd();
        let mut blob = Vec::new();
        for chunk in 0..chunks.min(MAX_RECORD_CHUNKS) {
            let Some(c) = lookup(fd, &Key { slot, chunk })? else {
                return Ok(None);
            };
            let len = (c.len as usize).min(CHUNK_DATA);
            blob.extend_from_slice(&c.data[..len]);
        }
        if blob.len() < HEADER {
            return Ok(None);
        }
        let total = u32::from_ne_bytes(blob[0..4].try_into().expect("4 bytes")) as usize;
        let generation = u64::from_ne_bytes(blob[4..12].try_into().expect("8 bytes"));
        let name_len = u16::from_ne_bytes(blob[12..14].try_into().expect("2 bytes")) as usize;
        if total != blob.len() || HEADER + name_len > total {
            return Ok(None);
        }
        let Ok(unit) = String::from_utf8(blob[HEADER..HEADER + name_len].to_vec()) else {
            return Ok(None);
        };
        Ok(Some((unit, generation, blob[HEADER + name_len..].to_vec())))
    }

    fn free_slot(&self) -> u32 {
        let mut used: Vec<u32> = self.slots.values().map(|&(s, ..)| s).collect();
        used.sort_unstable();
        let mut slot = 0;
        for s in used {
            if s == slot {
                slot += 1;
            } else if s > slot {
                break;
            }
        }
        slot
    }

    fn delete_slot(&mut self, slot: u32, chunks: u32) -> io::Result<()> {
        for chunk in 0..chunks {
            delete(self.map.as_fd(), &Key { slot, chunk })?;
            self.used = self.used.saturating_sub(1);
        }
        Ok(())
    }
}

impl Dispatcher {
    /// Keep `record` as `unit`'s, replacing what it had. On error the old
    /// record stays.
    pub fn put_unit_record(&mut self, unit: &str, record: &[u8]) -> Result<(), RecordError> {
        let r = &mut self.records;
        let name = unit.as_bytes();
        let name_len =
            u16::try_from(name.len()).map_err(|_| RecordError::UnitName(unit.to_owned()))?;
        let total = HEADER + name.len() + record.len();
        let max = CHUNK_DATA * MAX_RECORD_CHUNKS as usize;
        if total > max {
            return Err(RecordError::TooLarge {
                unit: unit.to_owned(),
                len: record.len(),
                max: max - HEADER - name.len(),
            });
        }
        let chunks = total.div_ceil(CHUNK_DATA) as u32;
        let old = r.slots.get(unit).copied();
        // The new record is written before the old one goes.
        if r.used + chunks > MAX_CHUNKS {
            return Err(RecordError::Full);
        }
        let generation = old.map_or(1, |(_, g, _)| g + 1);
        let mut blob = Vec::with_capacity(total);
        blob.extend_from_slice(&(total as u32).to_ne_bytes());
        blob.extend_from_slice(&generation.to_ne_bytes());
        blob.extend_from_slice(&name_len.to_ne_bytes());
        blob.extend_from_slice(name);
        blob.extend_from_slice(record);
        let slot = r.free_slot();
        let path = self.dir.join(RECORDS_PIN);
        for (chunk, data) in blob.chunks(CHUNK_DATA).enumerate() {
            let mut c = Chunk {
                len: data.len() as u32,
                data: [0; CHUNK_DATA],
            };
            c.data[..data.len()].copy_from_slice(data);
            let key = Key {
                slot,
                chunk: chunk as u32,
            };
            if let Err(e) = update(r.map.as_fd(), &key, &c) {
                // Undo the part written; the old record stays.
                let _ = r.delete_slot(slot, chunk as u32);
                return Err(if e.raw_os_error() == Some(libc::E2BIG) {
                    RecordError::Full
                } else {
                    record_err(&path)(e)
                });
            }
            r.used += 1;
        }
        r.slots.insert(unit.to_owned(), (slot, generation, chunks));
        if let Some((old_slot, _, n)) = old {
            r.delete_slot(old_slot, n).map_err(record_err(&path))?;
        }
        Ok(())
    }

    /// Forget `unit`'s record (nothing happens if it has none).
    pub fn remove_unit_record(&mut self, unit: &str) -> Result<(), RecordError> {
        let path = self.dir.join(RECORDS_PIN);
        if let Some((slot, _, n)) = self.records.slots.remove(unit) {
            self.records
                .delete_slot(slot, n)
                .map_err(record_err(&path))?;
        }
        Ok(())
    }

    /// Every unit's record, by unit name.
    pub fn unit_records(&self) -> Result<Vec<(String, Vec<u8>)>, RecordError> {
        let path = self.dir.join(RECORDS_PIN);
        let mut out = Vec::new();
        let mut slots: Vec<_> = self.records.slots.iter().collect();
        slots.sort();
        for (unit, &(slot, _, n)) in slots {
            if let Some((name, _, payload)) =
                self.records.read_slot(slot, n).map_err(record_err(&path))?
                && &name == unit
            {
                out.push((name, payload));
            }
        }
        Ok(out)
    }

    /// Chunks the records take now (for tests: nothing stale is left).
    pub fn unit_record_chunks(&self) -> Result<usize, RecordError> {
        let path = self.dir.join(RECORDS_PIN);
        keys(self.records.map.as_fd())
            .map(|k| k.len())
            .map_err(record_err(&path))
    }
}
