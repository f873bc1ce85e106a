//! Token embedding: a row lookup, and its backward, a scatter-add into the table's gradient.

use crate::real::Real;

/// `x[i] = table[ids[i]]` for `table` of `[vocab, hidden]`.
pub fn embedding_forward<T: Real>(table: &[T], ids: &[u32], hidden: usize, x: &mut [T]) {
    for (row, &id) in x.chunks_exact_mut(hidden).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
    }
}

/// `dtable[ids[i]] += dx[i]`, in token order (deterministic).
pub fn embedding_backward<T: Real>(dx: &[T], ids: &[u32], hidden: usize, dtable: &mut [T]) {
    for (row, &id) in dx.chunks_exact(hidden).zip(ids) {
        let id = id as usize;
        for (d, &g) in dtable[id * hidden..(id + 1) * hidden].iter_mut().zip(row) {
            *d += g;
        }
    }
}
