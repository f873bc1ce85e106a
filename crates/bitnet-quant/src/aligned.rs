//! A byte buffer whose start is aligned to a 64-byte cache line.
//!
//! Packed weight blocks and activation rows are multiples of 64 bytes, so with an aligned start
//! every SIMD load of a block stays inside one cache line.
//!
//! Buffers of 2 MiB and more (weight matrices) are anonymous mappings on 2 MiB boundaries,
//! advised as transparent huge pages on Linux: a decoded token streams every weight once, and
//! with 4 KiB pages the hardware prefetchers stop at every page edge and each page costs a
//! TLB walk. The advice covers the whole huge pages of the buffer; its last partial one stays in
//! 4 KiB pages, so no buffer holds memory it does not use. Where the kernel declines the
//! advice, the mapping keeps 4 KiB pages and works the same. `BITNET_HUGE_PAGES=off` keeps every buffer on the heap (to measure the difference).

/// One cache line; the unit of allocation.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A huge page, and the size from which a buffer is mapped rather than allocated.
const HUGE_PAGE: usize = 2 << 20;

enum Storage {
    Lines(Vec<Line>),
    /// An anonymous mapping (zero-filled by the kernel); the buffer starts `offset` bytes in,
    /// on a huge-page boundary.
    Mapped {
        map: memmap2::MmapMut,
        offset: usize,
    },
}

/// `len` bytes, zero-initialised, starting on a 64-byte boundary.
pub(crate) struct AlignedBytes {
    storage: Storage,
    len: usize,
}

impl AlignedBytes {
    pub(crate) fn zeroed(len: usize) -> Self {
        let storage = if len >= HUGE_PAGE && huge_pages_wanted() {
            Self::mapped(len).unwrap_or_else(|| Storage::Lines(vec![Line([0; 64]); len.div_ceil(64)]))
        } else {
            Storage::Lines(vec![Line([0; 64]); len.div_ceil(64)])
        };
        Self { storage, len }
    }

    /// A mapping of `len` bytes on a huge-page boundary, advised as huge pages before its first
    /// touch; `None` if the system refuses the mapping (the caller falls back to the heap).
    fn mapped(len: usize) -> Option<Storage> {
        let map = memmap2::MmapMut::map_anon(len.checked_add(HUGE_PAGE)?).ok()?;
        let offset = map.as_ptr().align_offset(HUGE_PAGE);
        #[cfg(target_os = "linux")]
        {
            // Advice only: a kernel without transparent huge pages says no and nothing changes.
            // Only the whole huge pages inside the buffer: the tail keeps 4 KiB pages, since a
            // huge page there would hold up to 2 MiB that nothing uses (across the matrices of
            // 2B-4T, about 150 MB of resident memory).
            let whole = len / HUGE_PAGE * HUGE_PAGE;
            if whole > 0 {
                let _ = map.advise_range(memmap2::Advice::HugePage, offset, whole);
            }
        }
        Some(Storage::Mapped { map, offset })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match &self.storage {
            // SAFETY: `lines` holds `len.div_ceil(64) * 64 >= len` initialised bytes and `Line`
            // is plain bytes with no padding.
            Storage::Lines(lines) => unsafe {
                std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), self.len)
            },
            Storage::Mapped { map, offset } => &map[*offset..*offset + self.len],
        }
    }

    pub(crate) fn as_bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.storage {
            // SAFETY: as in `as_bytes`, and `&mut self` makes the borrow unique.
            Storage::Lines(lines) => unsafe {
                std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), len)
            },
            Storage::Mapped { map, offset } => &mut map[*offset..*offset + len],
        }
    }

    pub(crate) fn as_i8(&self) -> &[i8] {
        // SAFETY: i8 and u8 have the same size, alignment and validity.
        unsafe { std::slice::from_raw_parts(self.as_bytes().as_ptr().cast::<i8>(), self.len) }
    }

    pub(crate) fn as_i8_mut(&mut self) -> &mut [i8] {
        let len = self.len;
        // SAFETY: i8 and u8 have the same size, alignment and validity; the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.as_bytes_mut().as_mut_ptr().cast::<i8>(), len) }
    }
}

fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var("BITNET_HUGE_PAGES").map_or(true, |v| v != "off"))
}

impl Clone for AlignedBytes {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len);
        copy.as_bytes_mut().copy_from_slice(self.as_bytes());
        copy
    }
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_mapped_buffers_are_aligned_zeroed_and_clone() {
        for len in [0, 1, 64, 1000, HUGE_PAGE, HUGE_PAGE * 3 + 17] {
            let mut b = AlignedBytes::zeroed(len);
            assert_eq!(b.as_bytes().len(), len);
            assert_eq!(b.as_bytes().as_ptr() as usize % 64, 0);
            assert!(b.as_bytes().iter().all(|&v| v == 0));
            if len >= HUGE_PAGE && huge_pages_wanted() {
                assert!(matches!(b.storage, Storage::Mapped { .. }));
                assert_eq!(b.as_bytes().as_ptr() as usize % HUGE_PAGE, 0);
            }
            if let Some(last) = b.as_bytes_mut().last_mut() {
                *last = 7;
            }
            let c = b.clone();
            assert_eq!(c.as_bytes(), b.as_bytes());
            assert_eq!(c.as_i8().len(), len);
        }
    }
}
