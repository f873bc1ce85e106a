//! The paged KV cache's bookkeeping: a pool of fixed-size blocks, a block table per sequence,
//! and prefix sharing.
//!
//! Keys and values live in a backend's store (`Backend::KvStore`), `[blocks × BLOCK_TOKENS,
//! kv_dim]` per layer. This module decides which block holds which tokens; it never touches the
//! data. A block has a reference count: the sequences whose table holds it. A *full* block whose
//! tokens are final can be *registered* under its prefix (the tokens of every block before it
//! and its own), so that a later sequence starting with the same tokens (a system prompt, the
//! turns of a chat) takes the block instead of computing it again. A registered block that no
//! sequence holds stays cached until the pool needs it, oldest first.

use std::collections::{BTreeMap, HashMap};

/// Tokens per block. The attention kernel walks keys one block at a time.
pub const BLOCK_TOKENS: usize = 32;

/// The element type of cached keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Exact: the transformers parity tests hold as they are.
    #[default]
    F32,
    /// Half the memory; keys and values rounded to bfloat16.
    Bf16,
    /// Half the memory; keys and values rounded to IEEE half (range ±65504).
    F16,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::Bf16 | KvType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::Bf16 => "bf16",
            KvType::F16 => "f16",
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvType::F32),
            "bf16" => Ok(KvType::Bf16),
            "f16" => Ok(KvType::F16),
            _ => Err(format!("unknown KV type {s:?}: expected f32, bf16 or f16")),
        }
    }
}

/// Counts of the pool's blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    pub total: usize,
    /// Held by at least one sequence.
    pub used: usize,
    /// Held by no sequence but kept for prefix sharing (reclaimed when needed).
    pub cached: usize,
    /// Neither held nor cached.
    pub free: usize,
    /// The most blocks ever held at once.
    pub peak_used: usize,
}

/// The identity of a registered block: the block before it in its sequence (with that block's
/// generation, so that a child of a reclaimed and refilled parent never matches) and its tokens.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PrefixKey {
    parent: Option<(u32, u64)>,
    tokens: [u32; BLOCK_TOKENS],
}

/// Which blocks are free, held or cached.
pub struct BlockPool {
    refcount: Vec<u32>,
    /// Blocks neither held nor registered.
    free: Vec<u32>,
    /// Registered blocks by prefix, and the key each registered block was filed under.
    prefix: HashMap<PrefixKey, u32>,
    key_of: Vec<Option<PrefixKey>>,
    /// Registered blocks that no sequence holds, by when they were released (oldest first).
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    /// How many times each block was allocated: its contents change with every allocation.
    generation: Vec<u64>,
    clock: u64,
    used: usize,
    peak_used: usize,
}

impl BlockPool {
    pub fn new(blocks: usize) -> Self {
        Self {
            refcount: vec![0; blocks],
            // Popped from the end: block 0 goes first.
            free: (0..blocks as u32).rev().collect(),
            prefix: HashMap::new(),
            key_of: vec![None; blocks],
            idle: BTreeMap::new(),
            idle_since: vec![0; blocks],
            generation: vec![0; blocks],
            clock: 0,
            used: 0,
            peak_used: 0,
        }
    }

    pub fn stats(&self) -> KvStats {
        KvStats {
            total: self.refcount.len(),
            used: self.used,
            cached: self.idle.len(),
            free: self.free.len(),
            peak_used: self.peak_used,
        }
    }

    /// Blocks a new allocation could take (free, or cached and reclaimable).
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// A block for one holder: a free one, else the longest-idle cached one (forgotten by the
    /// prefix cache). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                if let Some(key) = self.key_of[b as usize].take() {
                    self.prefix.remove(&key);
                }
                b
            }
        };
        self.refcount[block as usize] = 1;
        self.generation[block as usize] += 1;
        self.note_held();
        Some(block)
    }

    fn note_held(&mut self) {
        self.used += 1;
        self.peak_used = self.peak_used.max(self.used);
    }

    /// One more holder of `block`.
    fn retain(&mut self, block: u32) {
        let b = block as usize;
        if self.refcount[b] == 0 {
            self.idle.remove(&self.idle_since[b]);
            self.note_held();
        }
        self.refcount[b] += 1;
    }

    /// One holder fewer. A block nobody holds is cached if registered, free otherwise.
    pub fn release(&mut self, block: u32) {
        let b = block as usize;
        debug_assert!(self.refcount[b] > 0, "block {block} released more often than held");
        if self.refcount[b] == 0 {
            return;
        }
        self.refcount[b] -= 1;
        if self.refcount[b] == 0 {
            self.used -= 1;
            if self.key_of[b].is_some() {
                self.clock += 1;
                self.idle_since[b] = self.clock;
                self.idle.insert(self.clock, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Registers a held, full block: `tokens` are its tokens, `parent` the block before it in the
    /// sequence (`None` for the first). A prefix already registered keeps its block.
    pub fn register(&mut self, block: u32, parent: Option<u32>, tokens: &[u32]) {
        let b = block as usize;
        if self.key_of[b].is_some() || tokens.len() != BLOCK_TOKENS {
            return;
        }
        let parent = parent.map(|p| (p, self.generation[p as usize]));
        let key = PrefixKey { parent, tokens: tokens.try_into().expect("a block's worth of tokens") };
        if let std::collections::hash_map::Entry::Vacant(e) = self.prefix.entry(key.clone()) {
            e.insert(block);
            self.key_of[b] = Some(key);
        }
    }

    /// The registered blocks that hold the longest prefix of `tokens` made of whole blocks,
    /// each retained for the caller.
    pub fn take_prefix(&mut self, tokens: &[u32]) -> Vec<u32> {
        let mut blocks = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(BLOCK_TOKENS) {
            let key = PrefixKey { parent, tokens: chunk.try_into().expect("chunks_exact") };
            let Some(&block) = self.prefix.get(&key) else { break };
            self.retain(block);
            blocks.push(block);
            parent = Some((block, self.generation[block as usize]));
        }
        blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_of(start: u32) -> Vec<u32> {
        (start..start + BLOCK_TOKENS as u32).collect()
    }

    #[test]
    fn blocks_are_counted_freed_and_shared() {
        let mut pool = BlockPool::new(3);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        assert_eq!(pool.stats(), KvStats { total: 3, used: 2, cached: 0, free: 1, peak_used: 2 });
        pool.register(a, None, &block_of(0));
        pool.register(b, Some(a), &block_of(100));
        pool.release(a);
        pool.release(b);
        assert_eq!(pool.stats(), KvStats { total: 3, used: 0, cached: 2, free: 1, peak_used: 2 });
        // The same two blocks of tokens, then a different third: both blocks are found again.
        let mut tokens = block_of(0);
        tokens.extend(block_of(100));
        tokens.extend(block_of(7));
        assert_eq!(pool.take_prefix(&tokens), vec![a, b]);
        assert_eq!(pool.stats().used, 2);
        // A different first block shares nothing, even if the second matches.
        let mut other = block_of(1);
        other.extend(block_of(100));
        assert!(pool.take_prefix(&other).is_empty());
        pool.release(a);
        pool.release(b);
        // Out of free blocks, the longest-idle cached block is reclaimed and forgotten.
        let c = pool.allocate().unwrap();
        assert!(c != a && c != b);
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.take_prefix(&tokens), Vec::<u32>::new());
        // `b` is still filed under its old parent, but `a` has been refilled: registering `a`
        // again under the old tokens must not revive `b`'s stale keys and values.
        pool.register(a, None, &block_of(0));
        assert_eq!(pool.take_prefix(&tokens), vec![a]);
        pool.release(a);
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.stats(), KvStats { total: 3, used: 3, cached: 0, free: 0, peak_used: 3 });
    }
}
