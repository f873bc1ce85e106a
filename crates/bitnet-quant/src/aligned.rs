//! A byte buffer whose start is aligned to a 64-byte cache line.
//!
//! Packed weight blocks and activation rows are multiples of 64 bytes, so with an aligned start
//! every SIMD load of a block stays inside one cache line.

/// One cache line; the unit of allocation.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// `len` bytes, zero-initialised, starting on a 64-byte boundary.
#[derive(Clone)]
pub(crate) struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    pub(crate) fn zeroed(len: usize) -> Self {
        Self { lines: vec![Line([0; 64]); len.div_ceil(64)], len }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        // SAFETY: `lines` holds `len.div_ceil(64) * 64 >= len` initialised bytes and `Line` is
        // plain bytes with no padding.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    pub(crate) fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
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

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}
