//! The decoder (BitNet 2B-4T and the llama-1.58 variant): parameters, the forward that keeps
//! what the backward needs, and the backward, layer by layer in the reverse order of the forward.

use bitnet_models::{Activation, ModelConfig};
use rayon::prelude::*;

use crate::layers::attention::{attention_backward, attention_forward, AttentionShape, QkvLayout};
use crate::layers::bitlinear::{
    bitlinear_backward_in, bitlinear_forward_in, norm_quantize_input_in, quantize_input_in, Backward,
    Precision, QuantizedInput, WeightGroup,
};
use crate::layers::cross_entropy::{
    add_transposed, head_backward_t, head_forward, head_forward_t, softmax_cross_entropy,
    softmax_cross_entropy_grad, transpose_head,
};
use crate::layers::embedding::{embedding_backward, embedding_forward};
use crate::layers::gate::{gate_backward, gate_forward};
use crate::layers::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::layers::rope::{rope_backward, rope_forward, HeadsView, RopeTable};
use crate::linalg::{add_into, Scratch};
use crate::real::Real;
use crate::rng::Rng;

/// A named parameter tensor (row-major; linear weights are `[out, in]` as in PyTorch).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

/// All parameters (or all gradients, or an optimizer moment) in the order of the [`Layout`].
#[derive(Clone, Debug, PartialEq)]
pub struct Params<T> {
    pub tensors: Vec<Tensor<T>>,
}

impl<T: Real> Params<T> {
    /// Zeros of the same names and shapes.
    pub fn zeros_like<U: Real>(other: &Params<U>) -> Self {
        Self {
            tensors: other
                .tensors
                .iter()
                .map(|t| Tensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data: vec![T::ZERO; t.data.len()],
                })
                .collect(),
        }
    }
    pub fn fill_zero(&mut self) {
        for t in &mut self.tensors {
            t.data.fill(T::ZERO);
        }
    }
    /// Number of scalars.
    pub fn count(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
    /// Takes tensors out by index so that several can be borrowed mutably at once; put them
    /// back with [`Params::put`].
    fn take(&mut self, idx: &[usize]) -> Vec<Vec<T>> {
        idx.iter().map(|&i| std::mem::take(&mut self.tensors[i].data)).collect()
    }
    fn put(&mut self, idx: &[usize], data: Vec<Vec<T>>) {
        for (&i, d) in idx.iter().zip(data) {
            self.tensors[i].data = d;
        }
    }
}

/// Indices of one decoder layer's tensors in [`Params::tensors`].
#[derive(Clone, Debug)]
pub struct LayerSlots {
    pub input_norm: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub attn_sub_norm: Option<usize>,
    pub o: usize,
    pub post_norm: usize,
    pub gate: usize,
    pub up: usize,
    pub ffn_sub_norm: Option<usize>,
    pub down: usize,
}

/// Where every tensor of the model is, and its name and shape.
#[derive(Clone, Debug)]
pub struct Layout {
    pub embed: usize,
    pub layers: Vec<LayerSlots>,
    pub final_norm: usize,
    /// Present only when the head is not tied to the embedding.
    pub lm_head: Option<usize>,
    pub entries: Vec<(String, Vec<usize>)>,
}

/// What kind of tensor a parameter is, for initialization and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Embedding,
    Norm,
    Linear,
}

impl Layout {
    /// The tensors of a config, named as in Hugging Face checkpoints.
    pub fn new(c: &ModelConfig) -> Self {
        let mut entries: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| {
            entries.push((name, shape));
            entries.len() - 1
        };
        let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let embed = add("model.embed_tokens.weight".into(), vec![c.vocab_size, h]);
        let mut layers = Vec::new();
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}.");
            let input_norm = add(format!("{p}input_layernorm.weight"), vec![h]);
            let q_ = add(format!("{p}self_attn.q_proj.weight"), vec![q, h]);
            let k_ = add(format!("{p}self_attn.k_proj.weight"), vec![kv, h]);
            let v_ = add(format!("{p}self_attn.v_proj.weight"), vec![kv, h]);
            let attn_sub_norm =
                c.sub_norms.then(|| add(format!("{p}self_attn.attn_sub_norm.weight"), vec![q]));
            let o = add(format!("{p}self_attn.o_proj.weight"), vec![h, q]);
            let post_norm = add(format!("{p}post_attention_layernorm.weight"), vec![h]);
            let gate = add(format!("{p}mlp.gate_proj.weight"), vec![i, h]);
            let up = add(format!("{p}mlp.up_proj.weight"), vec![i, h]);
            let ffn_sub_norm = c.sub_norms.then(|| add(format!("{p}mlp.ffn_sub_norm.weight"), vec![i]));
            let down = add(format!("{p}mlp.down_proj.weight"), vec![h, i]);
            layers.push(LayerSlots {
                input_norm,
                q: q_,
                k: k_,
                v: v_,
                attn_sub_norm,
                o,
                post_norm,
                gate,
                up,
                ffn_sub_norm,
                down,
            });
        }
        let final_norm = add("model.norm.weight".into(), vec![h]);
        let lm_head = (!c.tie_word_embeddings).then(|| add("lm_head.weight".into(), vec![c.vocab_size, h]));
        Self { embed, layers, final_norm, lm_head, entries }
    }

    pub fn kind(&self, index: usize) -> ParamKind {
        let name = &self.entries[index].0;
        if name.ends_with("norm.weight") {
            ParamKind::Norm
        } else if index == self.embed || Some(index) == self.lm_head {
            ParamKind::Embedding
        } else {
            ParamKind::Linear
        }
    }

    /// The index of the output head's matrix (the embedding when tied).
    pub fn head(&self) -> usize {
        self.lm_head.unwrap_or(self.embed)
    }
}

/// One layer's quantized weights, made once per optimizer step.
#[derive(Clone, Debug)]
pub struct PreparedLayer<T> {
    pub qkv: WeightGroup<T>,
    pub o: WeightGroup<T>,
    pub gate_up: WeightGroup<T>,
    pub down: WeightGroup<T>,
}

/// The weights the forward multiplies by: the quantized linears of every layer.
#[derive(Clone, Debug)]
pub struct Prepared<T> {
    pub layers: Vec<PreparedLayer<T>>,
}

/// Everything one layer's forward keeps for its backward.
struct LayerCache<T> {
    x_in: Vec<T>,
    rstd_in: Vec<T>,
    h_in: QuantizedInput<T>,
    /// q and k after RoPE, and v.
    qkv: Vec<T>,
    probs: Vec<T>,
    attn: Vec<T>,
    rstd_attn_sub: Vec<T>,
    o_in: QuantizedInput<T>,
    x_mid: Vec<T>,
    rstd_post: Vec<T>,
    h_post: QuantizedInput<T>,
    gate_up: Vec<T>,
    mlp: Vec<T>,
    rstd_ffn_sub: Vec<T>,
    down_in: QuantizedInput<T>,
}

impl<T: Real> LayerCache<T> {
    /// Gives every buffer back to `scratch`.
    fn recycle(self, scratch: &Scratch<T>) {
        let Self {
            x_in,
            rstd_in,
            h_in,
            qkv,
            probs,
            attn,
            rstd_attn_sub,
            o_in,
            x_mid,
            rstd_post,
            h_post,
            gate_up,
            mlp,
            rstd_ffn_sub,
            down_in,
        } = self;
        for v in
            [x_in, rstd_in, qkv, probs, attn, rstd_attn_sub, x_mid, rstd_post, gate_up, mlp, rstd_ffn_sub]
        {
            scratch.recycle(v);
        }
        for q in [h_in, o_in, h_post, down_in] {
            q.recycle(scratch);
        }
    }
}

/// The model: config, precision, parameters.
#[derive(Clone, Debug)]
pub struct Model<T> {
    pub config: ModelConfig,
    pub precision: Precision,
    /// How the BitLinear backward multiplies ([`Backward::F32`] unless set).
    pub backward: Backward,
    pub layout: Layout,
    pub params: Params<T>,
    rope: RopeTable<T>,
    /// Activation and gradient buffers recycled from step to step.
    scratch: Scratch<T>,
}

/// Standard deviation of the initial linear and embedding weights.
pub const INIT_STD: f64 = 0.02;

impl<T: Real> Model<T> {
    /// A freshly initialized model: linears and embedding `N(0, 0.02²)`, norm gains 1.
    pub fn init(config: ModelConfig, precision: Precision, seed: u64) -> Self {
        let layout = Layout::new(&config);
        let mut rng = Rng::new(seed, 0x1417);
        let tensors = layout
            .entries
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n: usize = shape.iter().product();
                let data = match layout.kind(i) {
                    ParamKind::Norm => vec![T::ONE; n],
                    _ => (0..n).map(|_| T::from_f64(rng.normal() * INIT_STD)).collect(),
                };
                Tensor { name: name.clone(), shape: shape.clone(), data }
            })
            .collect();
        Self::from_params(config, precision, Params { tensors })
    }

    /// A model over given parameters (their names and shapes must follow [`Layout::new`]).
    pub fn from_params(config: ModelConfig, precision: Precision, params: Params<T>) -> Self {
        let layout = Layout::new(&config);
        assert_eq!(layout.entries.len(), params.tensors.len(), "parameter count does not fit the config");
        for ((name, shape), t) in layout.entries.iter().zip(&params.tensors) {
            assert!(name == &t.name && shape == &t.shape, "parameter {} does not fit the config", t.name);
        }
        let rope = RopeTable::new(config.head_dim, config.max_position_embeddings, config.rope_theta);
        Self { config, precision, backward: Backward::F32, layout, params, rope, scratch: Scratch::default() }
    }

    /// Backward of an optional sub-norm (tensor `norm`) whose input was `x`: the gradient at
    /// its input, `d_out` itself (no copy) when the layer has none.
    fn sub_norm_backward(
        &self,
        norm: Option<usize>,
        x: &[T],
        rstd: &[T],
        d_out: Vec<T>,
        grads: &mut Params<T>,
    ) -> Vec<T> {
        let Some(n) = norm else { return d_out };
        let mut d = self.scratch.dirty(d_out.len());
        rmsnorm_backward(x, self.tensor(n), rstd, &d_out, &mut d, false, &mut grads.tensors[n].data);
        self.scratch.recycle(d_out);
        d
    }

    fn tensor(&self, i: usize) -> &[T] {
        &self.params.tensors[i].data
    }

    /// Quantizes the latent linears (once per optimizer step; reused by every micro-batch).
    /// The sixteen-odd groups are independent, so they are made in parallel.
    pub fn prepare(&self) -> Prepared<T> {
        let c = &self.config;
        let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let p = self.precision;
        let layers = self
            .layout
            .layers
            .par_iter()
            .map(|s| {
                let group = |tensors: &[usize], outs: &[usize], in_features: usize| {
                    let w: Vec<&[T]> = tensors.iter().map(|&t| self.tensor(t)).collect();
                    WeightGroup::quantize_for(&w, outs, in_features, p, self.backward)
                };
                let ((qkv, o), (gate_up, down)) = rayon::join(
                    || rayon::join(|| group(&[s.q, s.k, s.v], &[q, kv, kv], h), || group(&[s.o], &[h], q)),
                    || rayon::join(|| group(&[s.gate, s.up], &[i, i], h), || group(&[s.down], &[h], i)),
                );
                PreparedLayer { qkv, o, gate_up, down }
            })
            .collect();
        Prepared { layers }
    }

    fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        let c = &self.config;
        AttentionShape { batch, seq, n_heads: c.num_heads, n_kv_heads: c.num_kv_heads, head_dim: c.head_dim }
    }

    fn qkv_layout(&self) -> QkvLayout {
        let (q, kv) = (self.config.q_dim(), self.config.kv_dim());
        QkvLayout { ld: q + 2 * kv, q: 0, k: q, v: q + kv }
    }

    /// The q heads and the k heads, which sit side by side at the start of a fused q/k/v row
    /// (`qkv_layout`): RoPE rotates them in one pass.
    fn rotated_heads(&self) -> HeadsView {
        let lay = self.qkv_layout();
        debug_assert_eq!(lay.k, lay.q + self.config.q_dim());
        HeadsView { ld: lay.ld, offset: lay.q, n_heads: self.config.num_heads + self.config.num_kv_heads }
    }

    fn eps(&self) -> T {
        T::from_f64(self.config.rms_norm_eps as f64)
    }

    /// One decoder layer on the residual stream `x` (`[batch·seq, hidden]`), in place.
    fn layer_forward(
        &self,
        l: usize,
        w: &PreparedLayer<T>,
        x: &mut [T],
        batch: usize,
        seq: usize,
    ) -> LayerCache<T> {
        let _t = crate::profile::section("layer_forward (all)");
        let c = &self.config;
        let s = &self.layout.layers[l];
        let rows = batch * seq;
        let (h, i, qd) = (c.hidden_size, c.intermediate_size, c.q_dim());
        let eps = self.eps();
        let (p, bw) = (self.precision, self.backward);

        // attention block: x + o_proj(sub_norm(Attn(RoPE(qkv(norm(x))))))
        let x_in = self.scratch.copy_of(x);
        let mut rstd_in = self.scratch.dirty(rows);
        let h_in = norm_quantize_input_in(
            x,
            self.tensor(s.input_norm),
            eps,
            rows,
            p,
            bw,
            &mut rstd_in,
            &self.scratch,
        );
        let lay = self.qkv_layout();
        let mut qkv = self.scratch.dirty(rows * lay.ld);
        bitlinear_forward_in(&h_in, &w.qkv, &mut qkv, &self.scratch);
        rope_forward(&mut qkv, self.rotated_heads(), seq, &self.rope);
        let shape = self.attention_shape(batch, seq);
        let mut probs = self.scratch.dirty(shape.probs_len());
        let mut attn = self.scratch.dirty(rows * qd);
        attention_forward(&qkv, lay, shape, &mut probs, &mut attn);
        let mut rstd_attn_sub = Vec::new();
        let o_in = match s.attn_sub_norm {
            Some(sn) => {
                rstd_attn_sub = self.scratch.dirty(rows);
                norm_quantize_input_in(
                    &attn,
                    self.tensor(sn),
                    eps,
                    rows,
                    p,
                    bw,
                    &mut rstd_attn_sub,
                    &self.scratch,
                )
            }
            None => quantize_input_in(&attn, rows, qd, p, bw, &self.scratch),
        };
        let mut branch = self.scratch.dirty(rows * h);
        bitlinear_forward_in(&o_in, &w.o, &mut branch, &self.scratch);
        add_into(x, &branch);

        // MLP block: x + down(sub_norm(act(gate(norm(x))) ⊙ up(norm(x))))
        let x_mid = self.scratch.copy_of(x);
        let mut rstd_post = self.scratch.dirty(rows);
        let h_post = norm_quantize_input_in(
            x,
            self.tensor(s.post_norm),
            eps,
            rows,
            p,
            bw,
            &mut rstd_post,
            &self.scratch,
        );
        let mut gate_up = self.scratch.dirty(rows * 2 * i);
        bitlinear_forward_in(&h_post, &w.gate_up, &mut gate_up, &self.scratch);
        let mut mlp = self.scratch.dirty(rows * i);
        gate_forward(c.activation, &gate_up, i, &mut mlp);
        let mut rstd_ffn_sub = Vec::new();
        let down_in = match s.ffn_sub_norm {
            Some(sn) => {
                rstd_ffn_sub = self.scratch.dirty(rows);
                norm_quantize_input_in(
                    &mlp,
                    self.tensor(sn),
                    eps,
                    rows,
                    p,
                    bw,
                    &mut rstd_ffn_sub,
                    &self.scratch,
                )
            }
            None => quantize_input_in(&mlp, rows, i, p, bw, &self.scratch),
        };
        bitlinear_forward_in(&down_in, &w.down, &mut branch, &self.scratch);
        add_into(x, &branch);
        self.scratch.recycle(branch);

        LayerCache {
            x_in,
            rstd_in,
            h_in,
            qkv,
            probs,
            attn,
            rstd_attn_sub,
            o_in,
            x_mid,
            rstd_post,
            h_post,
            gate_up,
            mlp,
            rstd_ffn_sub,
            down_in,
        }
    }

    /// Backward of one layer: `dx` holds the gradient of the layer's output and leaves holding
    /// the gradient of its input.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        w: &PreparedLayer<T>,
        cache: &LayerCache<T>,
        dx: &mut [T],
        batch: usize,
        seq: usize,
        grads: &mut Params<T>,
    ) {
        let _t = crate::profile::section("layer_backward (all)");
        let c = &self.config;
        let s = &self.layout.layers[l];
        let rows = batch * seq;
        let (h, i, qd) = (c.hidden_size, c.intermediate_size, c.q_dim());

        // MLP block, last op first.
        let mut d_down_in = self.scratch.dirty(rows * i);
        let mut g = grads.take(&[s.down]);
        bitlinear_backward_in(
            &cache.down_in,
            &w.down,
            dx,
            Some(&mut d_down_in),
            &mut [&mut g[0]],
            &self.scratch,
        );
        grads.put(&[s.down], g);
        let d_mlp = self.sub_norm_backward(s.ffn_sub_norm, &cache.mlp, &cache.rstd_ffn_sub, d_down_in, grads);
        let mut d_gate_up = self.scratch.dirty(rows * 2 * i);
        gate_backward(c.activation, &cache.gate_up, &d_mlp, i, &mut d_gate_up);
        let mut d_normed = self.scratch.dirty(rows * h);
        let mut g = grads.take(&[s.gate, s.up]);
        {
            let (a, b) = g.split_at_mut(1);
            bitlinear_backward_in(
                &cache.h_post,
                &w.gate_up,
                &d_gate_up,
                Some(&mut d_normed),
                &mut [&mut a[0], &mut b[0]],
                &self.scratch,
            );
        }
        grads.put(&[s.gate, s.up], g);
        rmsnorm_backward(
            &cache.x_mid,
            self.tensor(s.post_norm),
            &cache.rstd_post,
            &d_normed,
            dx,
            true,
            &mut grads.tensors[s.post_norm].data,
        );

        // Attention block.
        let mut d_o_in = self.scratch.dirty(rows * qd);
        let mut g = grads.take(&[s.o]);
        bitlinear_backward_in(&cache.o_in, &w.o, dx, Some(&mut d_o_in), &mut [&mut g[0]], &self.scratch);
        grads.put(&[s.o], g);
        let d_attn =
            self.sub_norm_backward(s.attn_sub_norm, &cache.attn, &cache.rstd_attn_sub, d_o_in, grads);
        let lay = self.qkv_layout();
        // attention_backward writes every element.
        let mut d_qkv = self.scratch.dirty(rows * lay.ld);
        attention_backward(
            &cache.qkv,
            lay,
            self.attention_shape(batch, seq),
            &cache.probs,
            &d_attn,
            &mut d_qkv,
        );
        rope_backward(&mut d_qkv, self.rotated_heads(), seq, &self.rope);
        let mut g = grads.take(&[s.q, s.k, s.v]);
        {
            let (a, rest) = g.split_at_mut(1);
            let (b, cc) = rest.split_at_mut(1);
            bitlinear_backward_in(
                &cache.h_in,
                &w.qkv,
                &d_qkv,
                Some(&mut d_normed),
                &mut [&mut a[0], &mut b[0], &mut cc[0]],
                &self.scratch,
            );
        }
        grads.put(&[s.q, s.k, s.v], g);
        rmsnorm_backward(
            &cache.x_in,
            self.tensor(s.input_norm),
            &cache.rstd_in,
            &d_normed,
            dx,
            true,
            &mut grads.tensors[s.input_norm].data,
        );
        for v in [d_mlp, d_gate_up, d_normed, d_attn, d_qkv] {
            self.scratch.recycle(v);
        }
    }

    /// Embedding, every layer and the final norm: returns the normed last hidden states
    /// `[batch·seq, hidden]`, with the caches when `keep` (for a backward).
    #[allow(clippy::type_complexity)]
    fn trunk_forward(
        &self,
        w: &Prepared<T>,
        ids: &[u32],
        batch: usize,
        seq: usize,
        keep: bool,
    ) -> (Vec<T>, Vec<T>, Vec<T>, Vec<LayerCache<T>>) {
        let h = self.config.hidden_size;
        let rows = batch * seq;
        assert_eq!(ids.len(), rows);
        let mut x = self.scratch.dirty(rows * h);
        embedding_forward(self.tensor(self.layout.embed), ids, h, &mut x);
        let mut caches = Vec::new();
        for (l, lw) in w.layers.iter().enumerate() {
            let cache = self.layer_forward(l, lw, &mut x, batch, seq);
            if keep {
                caches.push(cache);
            } else {
                cache.recycle(&self.scratch);
            }
        }
        let mut normed = self.scratch.dirty(rows * h);
        let mut rstd = self.scratch.dirty(rows);
        rmsnorm_forward(&x, self.tensor(self.layout.final_norm), self.eps(), &mut normed, &mut rstd);
        (x, normed, rstd, caches)
    }

    /// Splits `batch` windows of `seq + 1` tokens into inputs and next-token targets.
    fn inputs_and_targets(tokens: &[u32], batch: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
        assert_eq!(tokens.len(), batch * (seq + 1), "expected batch windows of seq + 1 tokens");
        let mut ids = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for w in tokens.chunks_exact(seq + 1) {
            ids.extend_from_slice(&w[..seq]);
            targets.extend_from_slice(&w[1..]);
        }
        (ids, targets)
    }

    /// Mean next-token cross-entropy of `batch` windows of `seq + 1` tokens (no gradients).
    pub fn loss(&self, w: &Prepared<T>, tokens: &[u32], batch: usize, seq: usize) -> f64 {
        let (ids, targets) = Self::inputs_and_targets(tokens, batch, seq);
        let (x, normed, rstd, _) = self.trunk_forward(w, &ids, batch, seq, false);
        self.scratch.recycle(x);
        self.scratch.recycle(rstd);
        let (v, h, rows) = (self.config.vocab_size, self.config.hidden_size, ids.len());
        let chunk = head_chunk_rows(v);
        let mut logits = self.scratch.dirty(chunk.min(rows) * v);
        let mut loss_sum = 0.0;
        for r0 in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - r0);
            let l = &mut logits[..n * v];
            head_forward(&normed[r0 * h..(r0 + n) * h], self.tensor(self.layout.head()), n, h, v, l);
            loss_sum += softmax_cross_entropy(l, &targets[r0..r0 + n], v);
        }
        self.scratch.recycle(logits);
        self.scratch.recycle(normed);
        loss_sum / rows as f64
    }

    /// The head and the mean cross-entropy over `normed` (`[rows, hidden]`), and their backward:
    /// returns the SUM of the rows' losses, writes `d_normed`, adds into the head's gradient.
    /// A chunk of `chunk` rows at a time: the `[rows, vocab]` probabilities would otherwise be the
    /// largest buffer of a step, and a chunk stays in cache from the softmax to the two products
    /// of the backward.
    #[allow(clippy::too_many_arguments)]
    fn head_loss_and_backward(
        &self,
        normed: &[T],
        targets: &[u32],
        grad_scale: T,
        chunk: usize,
        d_normed: &mut [T],
        d_head: &mut [T],
    ) -> f64 {
        let (v, h, rows) = (self.config.vocab_size, self.config.hidden_size, targets.len());
        let head = self.tensor(self.layout.head());
        // The head and its gradient in `[hidden, vocab]` form, which the products read faster.
        let mut head_t = self.scratch.dirty(v * h);
        transpose_head(head, v, h, &mut head_t);
        let mut d_head_t = self.scratch.dirty(v * h);
        let mut probs = self.scratch.dirty(chunk.min(rows) * v);
        let mut loss_sum = 0.0;
        for r0 in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - r0);
            let (x, p, t) = (&normed[r0 * h..(r0 + n) * h], &mut probs[..n * v], &targets[r0..r0 + n]);
            head_forward_t(x, &head_t, n, h, v, p);
            loss_sum += softmax_cross_entropy_grad(p, t, v, grad_scale);
            let dx = &mut d_normed[r0 * h..(r0 + n) * h];
            head_backward_t(x, head, p, n, h, v, dx, &mut d_head_t, r0 > 0);
        }
        if rows > 0 {
            add_transposed(d_head, &d_head_t, v, h);
        }
        for buf in [probs, head_t, d_head_t] {
            self.scratch.recycle(buf);
        }
        loss_sum
    }

    /// Mean cross-entropy of the windows and its gradient: ADDS `grad_scale · ∂loss/∂θ` into
    /// `grads` (so micro-batches of one step accumulate with `grad_scale = 1/accum`).
    pub fn loss_and_grads(
        &self,
        w: &Prepared<T>,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        grads: &mut Params<T>,
        grad_scale: f64,
    ) -> f64 {
        let (ids, targets) = Self::inputs_and_targets(tokens, batch, seq);
        let rows = ids.len();
        let h = self.config.hidden_size;
        let (x_last, normed, rstd, caches) = self.trunk_forward(w, &ids, batch, seq, true);
        let head = self.layout.head();
        let mut d_normed = self.scratch.dirty(rows * h);
        let mut g = grads.take(&[head]);
        let scale = T::from_f64(grad_scale / rows as f64);
        let chunk = head_chunk_rows(self.config.vocab_size);
        let loss = self.head_loss_and_backward(&normed, &targets, scale, chunk, &mut d_normed, &mut g[0]);
        let loss = loss / rows as f64;
        grads.put(&[head], g);
        let mut dx = self.scratch.dirty(rows * h);
        let fnorm = self.layout.final_norm;
        rmsnorm_backward(
            &x_last,
            self.tensor(fnorm),
            &rstd,
            &d_normed,
            &mut dx,
            false,
            &mut grads.tensors[fnorm].data,
        );
        for (l, cache) in caches.into_iter().enumerate().rev() {
            self.layer_backward(l, &w.layers[l], &cache, &mut dx, batch, seq, grads);
            cache.recycle(&self.scratch);
        }
        embedding_backward(&dx, &ids, h, &mut grads.tensors[self.layout.embed].data);
        for v in [x_last, normed, rstd, d_normed, dx] {
            self.scratch.recycle(v);
        }
        loss
    }

    /// The int8 codes (held as floats) of every BitLinear input, per layer, in the order
    /// [q/k/v input, o_proj input, gate/up input, down_proj input] (for the gradient tests;
    /// empty under the 16-bit backward, which keeps only the int8 codes).
    pub fn activation_codes(
        &self,
        w: &Prepared<T>,
        tokens: &[u32],
        batch: usize,
        seq: usize,
    ) -> Vec<[Vec<T>; 4]> {
        let (ids, _) = Self::inputs_and_targets(tokens, batch, seq);
        let (_, _, _, caches) = self.trunk_forward(w, &ids, batch, seq, true);
        caches.into_iter().map(|c| [c.h_in.codes, c.o_in.codes, c.h_post.codes, c.down_in.codes]).collect()
    }

    /// Logits `[ids.len(), vocab]` of one sequence.
    pub fn logits(&self, w: &Prepared<T>, ids: &[u32]) -> Vec<T> {
        let (v, h) = (self.config.vocab_size, self.config.hidden_size);
        let (_, normed, _, _) = self.trunk_forward(w, ids, 1, ids.len(), false);
        let mut logits = vec![T::ZERO; ids.len() * v];
        head_forward(&normed, self.tensor(self.layout.head()), ids.len(), h, v, &mut logits);
        logits
    }

    /// Logits of the last position only (for sampling).
    pub fn last_logits(&self, w: &Prepared<T>, ids: &[u32]) -> Vec<T> {
        let (v, h) = (self.config.vocab_size, self.config.hidden_size);
        let (_, normed, _, _) = self.trunk_forward(w, ids, 1, ids.len(), false);
        let mut logits = vec![T::ZERO; v];
        head_forward(&normed[(ids.len() - 1) * h..], self.tensor(self.layout.head()), 1, h, v, &mut logits);
        logits
    }

    /// The activation of the gated MLP (for reports).
    pub fn activation(&self) -> Activation {
        self.config.activation
    }
}

/// Rows per chunk of the head and its loss: about 2 M floats of probabilities (8 MB in f32),
/// a multiple of 16 rows, at least 16.
fn head_chunk_rows(vocab: usize) -> usize {
    ((2 << 20) / vocab.max(1)).max(16) / 16 * 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cross_entropy::head_backward;
    use crate::rng::Rng;
    use bitnet_models::{Architecture, QuantForm};

    /// The head taken in chunks of 16 rows (a ragged last one) gives the loss and gradients of
    /// the head over all rows at once, and of the plain (untransposed) head functions, up to
    /// the order of the float sums.
    #[test]
    fn chunked_head_equals_the_whole_head() {
        let cfg = ModelConfig {
            architecture: Architecture::BitNet,
            vocab_size: 29,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: Default::default(),
            max_position_embeddings: 32,
            tie_word_embeddings: true,
            activation: Activation::Relu2,
            sub_norms: true,
            quant_form: QuantForm::PackedMultiply,
            bitlinear_input_norm: None,
            bos_token_id: None,
            eos_token_ids: vec![],
            query_pre_attn_scalar: None,
            sliding: None,
        };
        let model = Model::<f64>::init(cfg, Precision::Ternary, 5);
        let (batch, seq) = (3, 15); // 45 rows: chunks of 16, 16, 13
        let mut rng = Rng::new(6, 0);
        let tokens: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(29) as u32).collect();
        let w = model.prepare();
        let (ids, targets) = Model::<f64>::inputs_and_targets(&tokens, batch, seq);
        let (_, normed, _, _) = model.trunk_forward(&w, &ids, batch, seq, false);
        let rows = batch * seq;
        // The head's gradient is added to what it holds (the embedding's share, say).
        let d_head_before: Vec<f64> = (0..29 * 16).map(|_| rng.normal()).collect();
        let run = |chunk: usize| {
            let mut d_normed = vec![f64::NAN; rows * 16];
            let mut d_head = d_head_before.clone();
            let loss =
                model.head_loss_and_backward(&normed, &targets, 0.5, chunk, &mut d_normed, &mut d_head);
            (loss, d_normed, d_head)
        };
        let (whole_loss, whole_dx, whole_dh) = run(rows);
        let (chunked_loss, chunked_dx, chunked_dh) = run(16);
        assert!((whole_loss - chunked_loss).abs() <= 1e-12 * whole_loss.abs());
        let mean = model.loss(&w, &tokens, batch, seq);
        assert!((whole_loss / rows as f64 - mean).abs() <= 1e-12 * mean.abs());
        // The layer functions the finite-difference tests check, on the head as stored.
        let head = model.tensor(model.layout.head());
        let mut dlogits = vec![0.0; rows * 29];
        head_forward(&normed, head, rows, 16, 29, &mut dlogits);
        let ref_loss = softmax_cross_entropy_grad(&mut dlogits, &targets, 29, 0.5);
        let (mut ref_dx, mut ref_dh) = (vec![f64::NAN; rows * 16], d_head_before.clone());
        head_backward(&normed, head, &dlogits, rows, 16, 29, &mut ref_dx, &mut ref_dh);
        assert!((whole_loss - ref_loss).abs() <= 1e-12 * ref_loss.abs());
        for (name, a, b) in [
            ("d_normed", &whole_dx, &chunked_dx),
            ("d_head", &whole_dh, &chunked_dh),
            ("d_normed (plain head)", &ref_dx, &chunked_dx),
            ("d_head (plain head)", &ref_dh, &chunked_dh),
        ] {
            let max = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(max > 0.0, "{name} is zero");
            for (x, y) in a.iter().zip(b.iter()) {
                assert!((x - y).abs() <= 1e-12 * max, "{name}: {x} vs {y}");
            }
        }
    }
}
