//! Training data: the validation split, the byte-level BPE tokenizer trained here, token files
//! (tokenized once, memory-mapped), and the seeded window sampler.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use bitnet_models::temp_file::TempFile;
use memmap2::Mmap;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::rng::Rng;

pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";
/// Ids of the special tokens (the trainer puts them first).
pub const BOS_ID: u32 = 0;
pub const EOS_ID: u32 = 1;

/// Splits text into (train, validation): the validation split is the last 5 % of the bytes,
/// starting at the first line break at or after the 95 % mark (or the last one before it).
pub fn split_train_val(text: &str) -> (&str, &str) {
    let mark = text.len() * 95 / 100;
    let bytes = text.as_bytes();
    // the first line start at or after the mark
    let from = mark.saturating_sub(1);
    let cut = match bytes[from..].iter().position(|&b| b == b'\n') {
        Some(p) => from + p + 1,
        None => match bytes[..mark].iter().rposition(|&b| b == b'\n') {
            Some(p) => p + 1,
            None => (mark..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len()),
        },
    };
    text.split_at(cut)
}

/// Sections of text between runs of two or more blank lines. Each is tokenized with a leading
/// BOS, so the model learns BOS as "the start of a piece of text", which is how prompts begin.
pub fn sections(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(p) = text[search..].find("\n\n\n") {
        let at = search + p;
        let mut end = at;
        while end < text.len() && text.as_bytes()[end] == b'\n' {
            end += 1;
        }
        if !text[start..end].trim().is_empty() {
            out.push(&text[start..end]);
        }
        start = end;
        search = end;
    }
    if !text[start..].trim().is_empty() {
        out.push(&text[start..]);
    }
    out
}

/// About `max_bytes` of `text` for training the tokenizer: 64 pieces spread evenly over it,
/// each cut at line breaks (all of it when it is small enough).
pub fn tokenizer_sample(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let pieces = 64;
    let piece = max_bytes / pieces;
    let mut out = String::with_capacity(max_bytes + pieces * 100);
    for i in 0..pieces {
        let mut start = text.len() / pieces * i;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let start = text[start..].find('\n').map_or(text.len(), |p| start + p + 1);
        let mut end = (start + piece).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let end = text[end..].find('\n').map_or(text.len(), |p| end + p + 1);
        out.push_str(&text[start..end]);
    }
    out
}

/// Trains a byte-level BPE tokenizer (GPT-2 / LLaMA-3 style pre-tokenizer) on `text` with
/// `vocab_size` tokens, the first two being BOS and EOS; `encode` prepends BOS.
/// `vocab_size = 258` gives the plain byte-level (character-like) tokenizer with no merges.
pub fn train_tokenizer(text: &str, vocab_size: usize) -> Result<Tokenizer> {
    if vocab_size < 258 {
        bail!("--vocab {vocab_size} is too small: a byte-level tokenizer needs 256 bytes + BOS + EOS = 258");
    }
    if vocab_size > u32::MAX as usize {
        bail!("--vocab {vocab_size} is too large");
    }
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let lines = text.split_inclusive('\n');
    let mut trainer = tokenizers::models::TrainerWrapper::from(trainer);
    tok.train(&mut trainer, lines).map_err(|e| anyhow::anyhow!("training the tokenizer failed: {e}"))?;
    if tok.token_to_id(BOS) != Some(BOS_ID) || tok.token_to_id(EOS) != Some(EOS_ID) {
        bail!("tokenizer trainer did not put BOS/EOS at ids 0/1");
    }
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS} $B")))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .special_tokens(vec![(BOS, BOS_ID)])
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.with_post_processor(Some(template));
    Ok(tok)
}

/// Encodes text as BOS-led sections into one token stream.
pub fn encode_text(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let secs: Vec<String> = sections(text).into_iter().map(str::to_owned).collect();
    let encs = tok.encode_batch(secs, true).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
    Ok(encs.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
}

const MAGIC: &[u8; 8] = b"BNTOKS01";
const HEADER: usize = 16;

/// Writes tokens as `MAGIC | u32 width (2 or 4) | u32 0 | tokens, little-endian`, through a
/// temporary file and a rename.
pub fn write_token_file(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let width: u32 = if vocab_size <= u16::MAX as usize + 1 { 2 } else { 4 };
    let tmp_path = bitnet_models::temp_file::beside(path);
    let (tmp, file) = TempFile::create(tmp_path.clone(), |p| File::create(p))
        .with_context(|| format!("creating {}", tmp_path.display()))?;
    let write = || -> std::io::Result<()> {
        let mut f = BufWriter::new(file);
        f.write_all(MAGIC)?;
        f.write_all(&width.to_le_bytes())?;
        f.write_all(&0u32.to_le_bytes())?;
        for &t in tokens {
            if width == 2 {
                f.write_all(&(t as u16).to_le_bytes())?;
            } else {
                f.write_all(&t.to_le_bytes())?;
            }
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().with_context(|| format!("writing {}", tmp_path.display()))?;
    tmp.persist(path).with_context(|| format!("renaming {} to {}", tmp_path.display(), path.display()))?;
    Ok(())
}

/// A memory-mapped token file.
pub struct TokenFile {
    map: Mmap,
    width: usize,
    len: usize,
}

impl TokenFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("opening token file {}", path.display()))?;
        // SAFETY: the file is ours and not modified while mapped.
        let map = unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            bail!("{} is not a token file (bad header)", path.display());
        }
        let width = u32::from_le_bytes(map[8..12].try_into().unwrap()) as usize;
        if (width != 2 && width != 4) || !(map.len() - HEADER).is_multiple_of(width) {
            bail!("{} has a bad token width or a truncated body", path.display());
        }
        let len = (map.len() - HEADER) / width;
        Ok(Self { map, width, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER + i * self.width;
        if self.width == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[o..o + 4].try_into().unwrap())
        }
    }

    /// Appends tokens `[start, start + n)` to `out`.
    pub fn extend_window(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        out.extend((start..start + n).map(|i| self.get(i)));
    }

    /// The largest id in the file.
    pub fn max_id(&self) -> u32 {
        (0..self.len).map(|i| self.get(i)).max().unwrap_or(0)
    }
}

/// Draws training batches: `batch` windows of `seq + 1` tokens at uniform random offsets.
/// Its state is the generator's four words, saved in checkpoints.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub rng: Rng,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng::new(seed, 0xDA7A) }
    }

    pub fn next_batch(&mut self, data: &TokenFile, batch: usize, seq: usize) -> Vec<u32> {
        let span = (data.len() - seq - 1) as u64 + 1;
        let mut out = Vec::with_capacity(batch * (seq + 1));
        for _ in 0..batch {
            let start = self.rng.below(span) as usize;
            data.extend_window(start, seq + 1, &mut out);
        }
        out
    }
}

/// Validation windows: consecutive, non-overlapping `seq + 1`-token windows from the start of
/// the split (each window's last token is the next one's first), at most `max_tokens` targets.
pub fn validation_windows(data: &TokenFile, seq: usize, max_tokens: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut targets = 0;
    while start + seq < data.len() && targets + seq <= max_tokens.max(seq) {
        data.extend_window(start, seq + 1, &mut out);
        start += seq;
        targets += seq;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cuts_at_a_line_break_near_95_percent() {
        let text: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
        let (train, val) = split_train_val(&text);
        assert_eq!(train.len() + val.len(), text.len());
        assert!(train.ends_with('\n'));
        assert!(val.starts_with("line 095"), "{val:?}");
        let (t, v) = split_train_val("no line breaks at all in this text");
        assert_eq!(t.len() + v.len(), 34);
        assert!(!v.is_empty());
    }

    #[test]
    fn sections_split_on_two_blank_lines() {
        let s = sections("a\n\nb\n\n\n\nc\nd\n\n\ne");
        assert_eq!(s, vec!["a\n\nb\n\n\n\n", "c\nd\n\n\n", "e"]);
    }

    #[test]
    fn tokenizer_round_trips_and_token_file_reads_back() {
        let text = "The quick brown fox jumps over the lazy dog.\n".repeat(50);
        let tok = train_tokenizer(&text, 300).unwrap();
        let ids = encode_text(&tok, &text).unwrap();
        assert_eq!(ids[0], BOS_ID);
        assert!(ids.len() < text.len());
        let back = tok.decode(&ids, true).unwrap();
        assert_eq!(back, text);
        let dir = std::env::temp_dir().join(format!("bitnet-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.tokens");
        write_token_file(&p, &ids, 300).unwrap();
        let f = TokenFile::open(&p).unwrap();
        assert_eq!(f.len(), ids.len());
        assert!((0..ids.len()).all(|i| f.get(i) == ids[i]));
        let w = validation_windows(&f, 8, 16);
        assert_eq!(w.len(), 18);
        assert_eq!(w[8], w[9]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
