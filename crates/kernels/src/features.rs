//! Run-time choices of the kernels, made once and cached: the SIMD level the CPU supports
//! ([`simd_level`]) and the precision of the activations in products with quantized weights
//! ([`activation_precision`]).
//!
//! Binaries are built for baseline x86-64 (no `target-cpu=native`); the SIMD kernels are
//! `#[target_feature]` functions that may only be called after [`cpu_level`] has confirmed the
//! instruction sets they enable.
use std::sync::OnceLock;

/// The SIMD instruction sets a kernel may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable Rust, no intrinsics.
    Scalar,
    /// AVX2 + FMA + F16C (x86-64).
    Avx2,
    /// AVX-512F/BW (x86-64), on top of everything [`SimdLevel::Avx2`] needs.
    Avx512,
}

/// The best level this CPU supports, capped by `MOESTREAM_SIMD=scalar|avx2|avx512` when set.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = cpu_level();
        match std::env::var("MOESTREAM_SIMD").ok().as_deref() {
            Some("scalar") => SimdLevel::Scalar,
            Some("avx2") => best.min(SimdLevel::Avx2),
            _ => best,
        }
    })
}

/// Whether the AVX-512 level is in use ([`simd_level`]) and the CPU also has AVX-512 VNNI and VL,
/// which the int8 block kernels use for `vpdpbusd` (`matmul/ggml_blocks/int8/avx2.rs`, `vnni`).
pub fn avx512_vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| simd_level() >= SimdLevel::Avx512 && vnni_detected())
}

#[cfg(target_arch = "x86_64")]
fn vnni_detected() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni_detected() -> bool {
    false
}

/// The best level this CPU supports, ignoring `MOESTREAM_SIMD`. Every kernel of a level needs all
/// the features checked here: a result of [`SimdLevel::Avx512`] implies the AVX2 set as well.
pub fn cpu_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            return SimdLevel::Avx512;
        }
        if avx2 {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Scalar
}

/// How matrix products with quantized weights treat their activations.
///
/// [`Self::Int16`] applies to decode steps (one token) only; [`Self::Int8`] applies to decode
/// steps and prefills of llama.cpp block formats with an int8 kernel (Q4_K, Q5_K, Q6_K, Q8_0,
/// Q4_0), because their int8 kernels give each token the bits of its own one-token product
/// whatever the tokens beside it, and is [`Self::Int16`] for every other weight format. Float
/// weights always use f32 activations.
///
/// What counts as a decode step is the forward pass, not the product: inside a prefill pass an
/// expert chosen by a single token, or the last-token `lm_head`, is a one-row product too, and
/// computing it with int16 activations would make a prompt's log-probabilities depend on how
/// its tokens happened to be routed. Model code therefore asks [`ProductMode::for_pass`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationPrecision {
    /// f32 activations: the product is exact up to the order of f32 additions.
    F32,
    /// The activations are rounded to int16 per quantization group (at most 128 columns) and
    /// multiplied with the integer codes in integer arithmetic: on AVX2, 4-bit decode runs about
    /// 1.4 times as fast as [`Self::F32`] with weights from memory (up to twice in cache), with
    /// an error of ~2e-6 of `Σ|w·x|` (up to ~5e-5 where activations have outliers); see the
    /// `matmul` module docs.
    Int16,
    /// llama.cpp block formats: every token's activations rounded to int8 per 32 columns, in
    /// decode and prefill (`matmul/ggml_blocks/int8.rs`: the method of llama.cpp's q8
    /// activations, an error 258 times that of int16); other weights as [`Self::Int16`].
    Int8,
}

/// How the products of one forward pass treat their tokens.
///
/// A decode step (one token) and a prefill (many) compute differently: a prefill multiplies
/// tiles of tokens at once with f32 activations (int8 for block formats at
/// [`ActivationPrecision::Int8`]), a decode step uses the one-token kernels with the decode
/// [`ActivationPrecision`]. Speculative verification is a pass of several tokens whose logits
/// must equal, bit for bit, those of decoding the tokens one at a time (so that greedy output
/// with a draft is the output without); it uses [`ProductMode::Decode`] for all its tokens,
/// which runs every token through the one-token kernels while each block of weights is reused
/// by all tokens from cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductMode {
    /// Tiles of tokens at once: f32 activations, except that at [`ActivationPrecision::Int8`]
    /// products of block formats with an int8 kernel round every token's row to int8, with the
    /// bits of that token's decode product. Prompt processing and scoring.
    Prefill(ActivationPrecision),
    /// Every token as a one-token product with this activation precision: the same bits for
    /// a token whether it is alone in the pass or not.
    Decode(ActivationPrecision),
}

impl ProductMode {
    /// The mode for products inside a forward pass over `pass_tokens` tokens: decode with
    /// [`activation_precision`] for one token, prefill (with the same precision, which matters
    /// for int8 only) for several.
    ///
    /// What counts is the forward pass, not the product: inside a prefill an expert chosen by a
    /// single token, or the last-token `lm_head`, is a one-row product too, and computing it as
    /// a decode product would make a prompt's log-probabilities depend on how its tokens
    /// happened to be routed.
    pub fn for_pass(pass_tokens: usize) -> ProductMode {
        if pass_tokens == 1 {
            ProductMode::decode()
        } else {
            ProductMode::prefill()
        }
    }

    /// Decode products at the process's precision ([`activation_precision`]).
    pub fn decode() -> ProductMode {
        ProductMode::Decode(activation_precision())
    }

    /// Prefill products at the process's precision ([`activation_precision`]).
    pub fn prefill() -> ProductMode {
        ProductMode::Prefill(activation_precision())
    }
}

impl std::str::FromStr for ActivationPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int8" => Ok(ActivationPrecision::Int8),
            "int16" => Ok(ActivationPrecision::Int16),
            "f32" => Ok(ActivationPrecision::F32),
            _ => Err(format!("expected int8, int16 or f32, not {s:?}")),
        }
    }
}

static PRECISION: OnceLock<ActivationPrecision> = OnceLock::new();

/// Whether the environment sets `MOESTREAM_EXACT_MATMUL` to anything but `0` or the empty
/// string, which forces [`ActivationPrecision::F32`].
fn exact_forced() -> bool {
    !matches!(
        std::env::var("MOESTREAM_EXACT_MATMUL").ok().as_deref(),
        None | Some("") | Some("0")
    )
}

/// Chooses the process's decode precision ([`activation_precision`]) before the first product;
/// `MOESTREAM_EXACT_MATMUL` still forces f32. Returns the precision in effect, which is the
/// earlier choice when one was already made (the setting is read once, like the SIMD level).
pub fn set_activation_precision(wanted: ActivationPrecision) -> ActivationPrecision {
    *PRECISION.get_or_init(|| {
        if exact_forced() {
            ActivationPrecision::F32
        } else {
            wanted
        }
    })
}

/// The precision of products with quantized weights: what [`set_activation_precision`] chose,
/// else [`ActivationPrecision::Int8`]; [`ActivationPrecision::F32`] whenever the environment
/// sets `MOESTREAM_EXACT_MATMUL` to anything but `0` or the empty string.
pub fn activation_precision() -> ActivationPrecision {
    set_activation_precision(ActivationPrecision::Int8)
}
