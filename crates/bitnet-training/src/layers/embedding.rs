//! Token embedding: a row lookup, and its backward, a scatter-add into the table's gradient.

use rayon::prelude::*;

use crate::linalg::ROW_CHUNK;
use crate::real::Real;

/// `x[i] = table[ids[i]]` for `table` of `[vocab, hidden]`.
pub fn embedding_forward<T: Real>(table: &[T], ids: &[u32], hidden: usize, x: &mut [T]) {
    let _t = crate::profile::section("embedding_forward");
    x.par_chunks_mut(hidden * ROW_CHUNK).zip(ids.par_chunks(ROW_CHUNK)).for_each(|(xc, ic)| {
        for (row, &id) in xc.chunks_exact_mut(hidden).zip(ic) {
            let id = id as usize;
            row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
        }
    });
}

/// Columns of the table one task of the backward owns.
const COLUMNS: usize = 16;

/// `dtable[ids[i]] += dx[i]`, in token order (deterministic). Tasks split the columns, so every
/// element still sums its tokens in order, whatever the thread count.
pub fn embedding_backward<T: Real>(dx: &[T], ids: &[u32], hidden: usize, dtable: &mut [T]) {
    let _t = crate::profile::section("embedding_backward");
    let vocab = dtable.len() / hidden.max(1);
    let table = crate::linalg::SharedMut(dtable.as_mut_ptr());
    (0..hidden.div_ceil(COLUMNS)).into_par_iter().for_each(|task| {
        let (c0, c1) = (task * COLUMNS, ((task + 1) * COLUMNS).min(hidden));
        for (row, &id) in dx.chunks_exact(hidden).zip(ids) {
            let id = id as usize;
            assert!(id < vocab, "token id {id} outside the embedding table");
            // SAFETY: task `task` alone writes columns c0..c1 of every row, and `id < vocab`
            // keeps the row inside `dtable`.
            let out = unsafe { std::slice::from_raw_parts_mut(table.get().add(id * hidden + c0), c1 - c0) };
            for (d, &g) in out.iter_mut().zip(&row[c0..c1]) {
                *d += g;
            }
        }
    });
}
