//! The bytes of a checkpoint file: a read-only mapping of it, bytes compiled into the binary,
//! or bytes read into memory. Loaders share them ([`SharedBytes`]) with the weights that keep
//! pointing into them (an embedding table that only serves lookups), and hand a mapping's
//! pages back to the kernel once a tensor has been copied or repacked ([`ByteSource::release`]),
//! so that loading holds each weight once: the copy, not the copy and the mapped original.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use bitnet_quant::{ByteSource, SharedBytes};

use crate::ModelError;

/// The bytes of one checkpoint file.
pub enum Bytes {
    /// The file mapped read-only (and shared: the pages are the page cache's).
    Mapped(memmap2::Mmap),
    /// Bytes compiled into the binary.
    Static(&'static [u8]),
    /// Bytes read into memory.
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
            Bytes::Owned(v) => v,
        }
    }
}

impl Bytes {
    /// Maps a file read-only.
    pub fn map(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; a checkpoint changed under a running process is outside
        // what any mmap-based loader can defend against, and every read is bounds-checked.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Ok(Bytes::Mapped(map))
    }

    /// The bytes as a shared, reference-counted view.
    pub fn into_shared(self) -> SharedBytes {
        SharedBytes::new(Arc::new(self))
    }
}

impl ByteSource for Bytes {
    fn bytes(&self) -> &[u8] {
        self
    }

    /// A mapping drops the pages of `range` from the process (`MADV_DONTNEED`); they count
    /// against its resident memory again only when read again. Other bytes ignore the hint.
    fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Bytes::Mapped(map) = self {
            if range.start < range.end && range.end <= map.len() {
                // SAFETY: the mapping is a read-only, shared mapping of a file. For such a
                // mapping MADV_DONTNEED only unmaps the pages from this process: the next read
                // faults them in again from the page cache or the file, with the same
                // contents, so a slice borrowed from the map never sees a change. (The hint
                // is unsafe in general because a private or anonymous mapping would read back
                // zeros.) memmap2 widens the range to whole pages; a neighbouring tensor that
                // shares an edge page reads it in again the same way.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
                };
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    /// This process's resident pages of the file mapping that starts at `addr`, from
    /// /proc/self/smaps.
    fn resident_kib(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_map = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            match first.strip_suffix(':') {
                // A field of the current mapping.
                Some(field) => {
                    if in_map && field == "Rss" {
                        let kib = line.trim_start_matches("Rss:").trim().trim_end_matches("kB").trim();
                        return kib.parse().unwrap();
                    }
                }
                // A mapping's header: `start-end perms offset dev inode path`.
                None => {
                    let start = first.split('-').next().unwrap_or("");
                    in_map = usize::from_str_radix(start, 16) == Ok(addr);
                }
            }
        }
        panic!("no mapping at {addr:#x} in /proc/self/smaps")
    }

    #[test]
    fn released_pages_leave_the_process_and_read_back_the_same() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        file.write_all(&content).unwrap();
        file.flush().unwrap();
        let shared = Bytes::map(file.path()).unwrap().into_shared();
        let addr = shared.as_bytes().as_ptr() as usize;
        // Reading every page makes the whole mapping resident.
        let sum: u64 = shared.as_bytes().iter().step_by(4096).map(|&b| b as u64).sum();
        assert!(sum > 0);
        let before = resident_kib(addr);
        assert!(before >= 8 << 10, "{before} KiB resident after reading 8 MiB");
        // Releasing the first 6 MiB leaves at most the last 2 MiB (and an edge page).
        shared.slice(0..6 << 20).unwrap().release();
        let after = resident_kib(addr);
        assert!(after <= (2 << 10) + 4, "{after} KiB resident after releasing 6 of 8 MiB");
        // The bytes read the same afterwards, from the page cache.
        assert!(shared.as_bytes() == &content[..]);
        // Bytes in memory ignore the hint.
        let owned = Bytes::Owned(content.clone()).into_shared();
        owned.release();
        assert!(owned.as_bytes() == &content[..]);
    }
}
