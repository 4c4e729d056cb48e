//! Per-sequence state: the key/value cache of every attention layer.
//!
//! Layout per layer: `[position, n_kv_heads * head_dim]` f32, keys and values apart, grown as
//! tokens arrive (reserved up front to the context size when it is known). `truncate` cuts the
//! sequence back, which is exact for attention: a KV cache holds no information about later tokens.

/// Keys and values of one attention layer.
#[derive(Clone, Debug, Default)]
pub struct LayerKv {
    /// `[positions, kv_width]` keys (after RoPE).
    pub k: Vec<f32>,
    /// `[positions, kv_width]` values.
    pub v: Vec<f32>,
}

/// The KV cache of a whole model for one sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKv>,
    kv_width: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` layers with `kv_width = n_kv_heads * head_dim`.
    pub fn new(n_layers: usize, kv_width: usize, reserve_tokens: usize) -> KvCache {
        let layers = (0..n_layers)
            .map(|_| LayerKv {
                k: Vec::with_capacity(reserve_tokens * kv_width),
                v: Vec::with_capacity(reserve_tokens * kv_width),
            })
            .collect();
        KvCache {
            layers,
            kv_width,
            len: 0,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks `n` more tokens as held (after every layer appended them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Drops keys and values some layers appended in a forward pass that did not finish.
    pub(crate) fn drop_uncommitted(&mut self) {
        for l in &mut self.layers {
            l.k.truncate(self.len * self.kv_width);
            l.v.truncate(self.len * self.kv_width);
        }
    }

    /// Forgets every token after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for l in &mut self.layers {
                l.k.truncate(len * self.kv_width);
                l.v.truncate(len * self.kv_width);
            }
            self.len = len;
        }
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 4)
            .sum()
    }
}
