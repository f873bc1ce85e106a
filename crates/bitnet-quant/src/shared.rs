//! Bytes that belong to something else, shared by reference count: the read-only file mapping
//! a model was loaded from, or bytes compiled into the binary.
//!
//! A matrix kept as stored (an embedding table that only serves lookups) can point into the
//! checkpoint instead of copying it, and a loader that has made its own copy of a tensor (a
//! repacked ternary matrix, a quantized head) can hand the mapping's pages back to the kernel
//! ([`SharedBytes::release`]): the process then holds each weight once, not once mapped and
//! once repacked. Released pages stay valid; a later read maps them in again from the file.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// Where shared bytes live.
pub trait ByteSource: Send + Sync {
    /// All the bytes. Every call returns the same slice (the same address and length).
    fn bytes(&self) -> &[u8];

    /// The pages holding `range` are not needed now. A file mapping drops them from the
    /// process (the next read maps them in again, from the page cache or the file); memory
    /// that is not a file mapping ignores the hint.
    fn release(&self, range: Range<usize>) {
        let _ = range;
    }
}

/// A byte range of a [`ByteSource`], kept alive by a reference count; cloning it is cheap.
#[derive(Clone)]
pub struct SharedBytes {
    source: Arc<dyn ByteSource>,
    start: usize,
    len: usize,
}

impl SharedBytes {
    /// All the bytes of `source`.
    pub fn new(source: Arc<dyn ByteSource>) -> Self {
        let len = source.bytes().len();
        Self { source, start: 0, len }
    }

    /// The sub-range `range` (relative to this view), or `None` if it does not lie inside it.
    pub fn slice(&self, range: Range<usize>) -> Option<Self> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        Some(Self { source: self.source.clone(), start: self.start + range.start, len: range.len() })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.source.bytes()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hands the pages of `range` (relative to this view, clamped to it) back to the source:
    /// see [`ByteSource::release`].
    pub fn release_range(&self, range: Range<usize>) {
        let end = range.end.min(self.len);
        if range.start < end {
            self.source.release(self.start + range.start..self.start + end);
        }
    }

    /// Hands all the pages of this view back to the source.
    pub fn release(&self) {
        self.release_range(0..self.len);
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBytes({} bytes at {})", self.len, self.start)
    }
}

/// Bytes in memory (a `Vec`, or a `&'static` slice) as a source: the release hint does nothing.
impl ByteSource for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl ByteSource for &'static [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the ranges it is asked to release.
    struct Recorder {
        bytes: Vec<u8>,
        released: Mutex<Vec<Range<usize>>>,
    }

    impl ByteSource for Recorder {
        fn bytes(&self) -> &[u8] {
            &self.bytes
        }
        fn release(&self, range: Range<usize>) {
            self.released.lock().unwrap().push(range);
        }
    }

    #[test]
    fn slices_read_and_release_their_own_range_of_the_source() {
        let source = Arc::new(Recorder { bytes: (0..100).collect(), released: Mutex::new(Vec::new()) });
        let all = SharedBytes::new(source.clone());
        assert_eq!(all.len(), 100);
        let mid = all.slice(10..60).unwrap();
        assert_eq!(mid.as_bytes(), &(10..60).collect::<Vec<u8>>()[..]);
        let inner = mid.slice(5..15).unwrap();
        assert_eq!(inner.as_bytes(), &(15..25).collect::<Vec<u8>>()[..]);
        assert!(mid.slice(40..51).is_none(), "past the end of the view");
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = mid.slice(9..8);
        assert!(backwards.is_none());
        inner.release();
        mid.release_range(40..1000); // clamped to the view
        mid.release_range(20..20); // empty: not passed on
        assert_eq!(*source.released.lock().unwrap(), vec![15..25, 50..60]);
        // Releasing is a hint: the bytes read the same afterwards.
        assert_eq!(inner.as_bytes(), &(15..25).collect::<Vec<u8>>()[..]);
    }
}
