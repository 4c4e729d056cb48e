//! KL divergence between a base model's next-token distributions and the current model's,
//! llama-perplexity's `--kl-divergence-base FILE` / `--kl-divergence` mode.
//!
//! Why: perplexity alone hides most of what a cheaper configuration costs, because it only looks
//! at the probability of the one token that happened to follow. The KL divergence KL(P‖Q) of the
//! current model's distribution Q from the base model's P, over the whole vocabulary, at every
//! position perplexity scores, measures how far the model's behaviour moved. It is the number to
//! watch when trading quality for speed or memory: the runtime expert `--top-k` override (fewer
//! experts per token than the model was trained with) and quantization (an MLX 4-bit conversion
//! against the float checkpoint, or 4-bit against 8-bit).
//!
//! Workflow: `moestream perplexity --model BASE --file T --kl-divergence-base F` writes F; then
//! `moestream perplexity --model OTHER --file T --kl-divergence-base F --kl-divergence` reads it
//! and prints mean KL (± standard error), maximum / 99.9% / 99% / median / minimum KL, how often
//! both models put the same token on top, the mean change Δp of the correct token's probability,
//! and both perplexities.
//!
//! The statistics live here as pure functions ([`kl_divergence`], [`Position`], [`KlStats`]) so
//! an in-process comparison (two configurations of one loaded model) can use them without a file.
//!
//! # File format (version 1, all numbers little-endian)
//!
//! ```text
//! offset  size  field
//! 0       8     magic "MSKLBASE"
//! 8       4     u32 version (1)
//! 12      4     u32 vocab: vocabulary size V
//! 16      4     u32 ctx: tokens per chunk (--ctx)
//! 20      4     u32 chunks: number of chunks
//! 24      4     u32 first: index, within a chunk, of the first scored (predicted) token (ctx/2)
//! 28      4     u32 model_len: bytes of the base model's name that follows
//! 32      8     u64 positions = chunks * (ctx - first)
//! 40      ...   base model name (UTF-8, informational)
//!         ...   chunks * ctx u32 token ids, as evaluated (BOS substituted), to detect a different
//!               text or tokenizer
//!         ...   `positions` rows, in order, each 24 + 2V bytes:
//!                 u32 top: the base model's most likely token (first index of the maximum logit)
//!                 f32 step: quantization step, nats
//!                 f64 token_logprob: exact ln p of the token that followed (for PPL and Δp)
//!                 u64 checksum of the row's other bytes (header fields and codes)
//!                 V x u16 codes: code[i] = round((max_logit - logit[i]) / step), at most 65535
//! ```
//!
//! # Precision
//!
//! Each row stores log-probabilities relative to the top token, linearly quantized to 16 bits:
//! `step = min(range, 30) / 65535` nats, where `range` is the row's max − min logit, so every
//! log-probability within 30 nats of the top one is stored to within `step / 2 ≤ 2.3e-4` nats
//! (relative error of the probability ≤ 2.3e-4); those further down are clamped to 30 nats below
//! the top (e^-30 ≈ 9e-14 each: ≤ 1.4e-8 of mass in all for a 151,936-token vocabulary). The top
//! token's entry is exact and the correct token's log-probability is stored exactly (f64), so
//! PPL(base) and Δp carry no quantization error. On reading, each row is renormalized in f64;
//! then the KL error is second order for the base against itself (KL(decoded‖exact) ≤ step²/8 ≈
//! 3e-8; ≤ 4e-9 measured), and against another model Q it is at most (step/2)·E_P|ln(P/Q) − KL|,
//! well under 1e-4 for the divergences this measures (≤ 4e-7 measured in the unit tests, on
//! 32,000-token rows with KL from 5e-4 to 0.13). KL itself is
//! computed in f64 over the full vocabulary: KL(P‖Q) = Σ p·(ln p − ln q). A file costs 2V + 24
//! bytes per scored position (≈ 304 KB for V = 151,936), like llama.cpp's.
use anyhow::{bail, Context, Result};
use moestream_kernels::ops::log_softmax_at;
use rayon::prelude::*;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MSKLBASE";
const VERSION: u32 = 1;
/// Bytes before the model name.
const FIXED_HEADER: usize = 40;
/// Bytes of a row before its codes.
const ROW_HEADER: usize = 24;
/// Log-probabilities further than this many nats below the top token's are clamped to it.
const RANGE_CAP: f64 = 30.0;
const MAX_CODE: f64 = 65535.0;
/// Longest model name kept in the header.
const MAX_MODEL_LEN: usize = 4096;

/// KL(P‖Q) in nats, P from `base`, Q from `other`: rows of log-probabilities or logits over the
/// same vocabulary (each is normalized here, in f64, so either works). Entries of `base` at -inf
/// (probability 0) contribute nothing; an entry of `other` at -inf where P is positive makes the
/// result infinite. Clamped at 0 against rounding.
pub fn kl_divergence(base: &[f32], other: &[f32]) -> f64 {
    debug_assert_eq!(base.len(), other.len());
    let max = |r: &[f32]| r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let (mb, mo) = (max(base), max(other));
    // KL = Σ p (b - o) - lse(b) + lse(o), with p = e^(b - mb) / sb: one exp per entry of each row.
    let (mut sb, mut so, mut t) = (0f64, 0f64, 0f64);
    for (&b, &o) in base.iter().zip(other) {
        let (b, o) = (b as f64, o as f64);
        let eb = (b - mb).exp();
        so += (o - mo).exp();
        if eb > 0.0 {
            sb += eb;
            t += eb * (b - o);
        }
    }
    let kl = t / sb - (mb + sb.ln()) + (mo + so.ln());
    if kl.is_nan() {
        kl
    } else {
        kl.max(0.0)
    }
}

/// Index of the largest entry (the first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// One scored position compared.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Position {
    /// KL(base‖current), nats.
    pub kld: f64,
    /// ln p_base(correct token).
    pub base_logprob: f64,
    /// ln p_current(correct token).
    pub logprob: f64,
    /// Whether both put the same token on top.
    pub same_top: bool,
}

impl Position {
    /// Compares two rows (log-probabilities or logits) at a position whose correct next token is
    /// `token`.
    pub fn from_rows(base: &[f32], other: &[f32], token: usize) -> Position {
        Position {
            kld: kl_divergence(base, other),
            base_logprob: log_softmax_at(base, token),
            logprob: log_softmax_at(other, token),
            same_top: argmax(base) == argmax(other),
        }
    }
}

/// Running sums over compared positions; [`KlStats::summary`] gives llama-perplexity's figures.
#[derive(Default)]
pub struct KlStats {
    klds: Vec<f64>,
    kld: (f64, f64),
    nll: (f64, f64),
    nll_base: (f64, f64),
    /// ln(p_base / p) = nll - nll_base.
    ln_ratio: (f64, f64),
    dp: (f64, f64),
    same_top: usize,
}

/// Summary statistics of a comparison (`_err`: standard error of the mean).
#[derive(Clone, Debug)]
pub struct KlSummary {
    pub positions: usize,
    pub ppl: f64,
    pub ppl_err: f64,
    pub ppl_base: f64,
    pub ppl_base_err: f64,
    /// Mean of ln(PPL(current)/PPL(base)) per position.
    pub ln_ppl_ratio: f64,
    pub ln_ppl_ratio_err: f64,
    pub kld_mean: f64,
    pub kld_err: f64,
    pub kld_max: f64,
    pub kld_p999: f64,
    pub kld_p99: f64,
    pub kld_median: f64,
    pub kld_min: f64,
    /// Fraction of positions where both models' most likely token is the same.
    pub same_top: f64,
    pub same_top_err: f64,
    /// Mean of p_current(correct) - p_base(correct).
    pub dp_mean: f64,
    pub dp_err: f64,
    pub dp_rms: f64,
}

fn add2(s: &mut (f64, f64), x: f64) {
    s.0 += x;
    s.1 += x * x;
}

/// Mean and standard error of the mean from (Σx, Σx², n).
fn mean_err(s: (f64, f64), n: usize) -> (f64, f64) {
    let nf = n as f64;
    let mean = s.0 / nf;
    let var = (s.1 / nf - mean * mean).max(0.0);
    (mean, (var / (nf - 1.0).max(1.0)).sqrt())
}

/// The `q` quantile (0..=1) of sorted `v`, linearly interpolated.
fn quantile(v: &[f64], q: f64) -> f64 {
    let x = q * (v.len() - 1) as f64;
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
}

impl KlStats {
    pub fn add(&mut self, p: Position) {
        self.klds.push(p.kld);
        add2(&mut self.kld, p.kld);
        add2(&mut self.nll, -p.logprob);
        add2(&mut self.nll_base, -p.base_logprob);
        add2(&mut self.ln_ratio, p.base_logprob - p.logprob);
        add2(&mut self.dp, p.logprob.exp() - p.base_logprob.exp());
        self.same_top += p.same_top as usize;
    }

    /// None before any position was added.
    pub fn summary(&self) -> Option<KlSummary> {
        let n = self.klds.len();
        if n == 0 {
            return None;
        }
        let mut sorted = self.klds.clone();
        sorted.sort_by(f64::total_cmp);
        let (kld_mean, kld_err) = mean_err(self.kld, n);
        let (nll, nll_err) = mean_err(self.nll, n);
        let (nll_base, nll_base_err) = mean_err(self.nll_base, n);
        let (ln_ppl_ratio, ln_ppl_ratio_err) = mean_err(self.ln_ratio, n);
        let (dp_mean, dp_err) = mean_err(self.dp, n);
        let same_top = self.same_top as f64 / n as f64;
        Some(KlSummary {
            positions: n,
            ppl: nll.exp(),
            ppl_err: nll.exp() * nll_err,
            ppl_base: nll_base.exp(),
            ppl_base_err: nll_base.exp() * nll_base_err,
            ln_ppl_ratio,
            ln_ppl_ratio_err,
            kld_mean,
            kld_err,
            kld_max: sorted[n - 1],
            kld_p999: quantile(&sorted, 0.999),
            kld_p99: quantile(&sorted, 0.99),
            kld_median: quantile(&sorted, 0.5),
            kld_min: sorted[0],
            same_top,
            same_top_err: (same_top * (1.0 - same_top) / ((n as f64) - 1.0).max(1.0)).sqrt(),
            dp_mean,
            dp_err,
            dp_rms: (self.dp.1 / n as f64).sqrt(),
        })
    }
}

impl KlSummary {
    /// The readable block (llama-perplexity's layout).
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "====== Perplexity statistics ======")?;
        writeln!(
            out,
            "Mean PPL(Q)                   : {:10.6} ± {:.6}",
            self.ppl, self.ppl_err
        )?;
        writeln!(
            out,
            "Mean PPL(base)                : {:10.6} ± {:.6}",
            self.ppl_base, self.ppl_base_err
        )?;
        writeln!(
            out,
            "Mean ln(PPL(Q)/PPL(base))     : {:10.6} ± {:.6}",
            self.ln_ppl_ratio, self.ln_ppl_ratio_err
        )?;
        writeln!(out)?;
        writeln!(out, "====== KL divergence statistics ======")?;
        writeln!(
            out,
            "Mean    KLD: {:12.8} ± {:.8}",
            self.kld_mean, self.kld_err
        )?;
        writeln!(out, "Maximum KLD: {:12.8}", self.kld_max)?;
        writeln!(out, "99.9%   KLD: {:12.8}", self.kld_p999)?;
        writeln!(out, "99.0%   KLD: {:12.8}", self.kld_p99)?;
        writeln!(out, "Median  KLD: {:12.8}", self.kld_median)?;
        writeln!(out, "Minimum KLD: {:12.8}", self.kld_min)?;
        writeln!(out)?;
        writeln!(out, "====== Token probability statistics ======")?;
        writeln!(
            out,
            "Mean    Δp: {:9.5} ± {:.5} %",
            100.0 * self.dp_mean,
            100.0 * self.dp_err
        )?;
        writeln!(out, "RMS     Δp: {:9.5} %", 100.0 * self.dp_rms)?;
        writeln!(
            out,
            "Same top p: {:9.5} ± {:.5} %",
            100.0 * self.same_top,
            100.0 * self.same_top_err
        )?;
        writeln!(out, "[{} positions]", self.positions)
    }
}

/// What a base file holds besides its rows.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseHeader {
    pub vocab: usize,
    pub ctx: usize,
    pub chunks: usize,
    /// First scored token index within a chunk.
    pub first: usize,
    /// The base model (informational).
    pub model: String,
    /// The evaluated tokens, `chunks * ctx`.
    pub tokens: Vec<u32>,
}

impl BaseHeader {
    fn positions(&self) -> u64 {
        self.chunks as u64 * (self.ctx - self.first) as u64
    }
    fn row_bytes(&self) -> usize {
        ROW_HEADER + 2 * self.vocab
    }
}

/// A 64-bit FNV-1a-style hash over 8-byte words (zero-padded tail).
fn checksum(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        let mut words = p.chunks_exact(8);
        for w in &mut words {
            h = (h ^ u64::from_le_bytes(w.try_into().unwrap_or_default()))
                .wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        h = (h ^ u64::from_le_bytes(tail) ^ p.len() as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Encodes one logits row into `out` (`ROW_HEADER + 2V` bytes), `token` being the correct next
/// token.
fn encode_row(logits: &[f32], token: usize, out: &mut [u8]) {
    let top = argmax(logits);
    let m = logits[top] as f64;
    let gap = |x: f32| m - x as f64;
    let range = logits
        .iter()
        .map(|&x| gap(x))
        .filter(|g| !g.is_nan())
        .fold(0f64, f64::max)
        .min(RANGE_CAP);
    let step = (range / MAX_CODE) as f32;
    let (head, codes) = out.split_at_mut(ROW_HEADER);
    for (c, &x) in codes.chunks_exact_mut(2).zip(logits) {
        let g = gap(x);
        let q = if step == 0.0 {
            0.0
        } else if g <= RANGE_CAP {
            (g / step as f64).round().min(MAX_CODE)
        } else {
            MAX_CODE // far below the top, -inf or NaN
        };
        c.copy_from_slice(&(q as u16).to_le_bytes());
    }
    head[0..4].copy_from_slice(&(top as u32).to_le_bytes());
    head[4..8].copy_from_slice(&step.to_le_bytes());
    head[8..16].copy_from_slice(&log_softmax_at(logits, token).to_le_bytes());
    let sum = checksum(&[&head[..16], codes]);
    head[16..24].copy_from_slice(&sum.to_le_bytes());
}

/// A decoded row: log-probabilities relative to the top token (unnormalized), and the stored
/// exact figures.
struct DecodedRow {
    logprobs: Vec<f32>,
    top: usize,
    token_logprob: f64,
}

/// Decodes and validates a row; `Err` says what is wrong with it.
fn decode_row(raw: &[u8], vocab: usize) -> std::result::Result<DecodedRow, String> {
    let (head, codes) = raw.split_at(ROW_HEADER);
    let word = |a: usize| u32::from_le_bytes([head[a], head[a + 1], head[a + 2], head[a + 3]]);
    let top = word(0) as usize;
    let step = f32::from_bits(word(4));
    let token_logprob = f64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    let sum = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
    if sum != checksum(&[&head[..16], codes]) {
        return Err("checksum mismatch".into());
    }
    let max_step = (RANGE_CAP / MAX_CODE) as f32 * 1.000_001;
    if top >= vocab
        || !(0.0..=max_step).contains(&step)
        || token_logprob.is_nan()
        || token_logprob > 1e-9
        || codes[2 * top..2 * top + 2] != [0, 0]
    {
        return Err(format!(
            "impossible values (top token {top}, step {step}, token log-probability {token_logprob})"
        ));
    }
    let logprobs = codes
        .chunks_exact(2)
        .map(|c| -(u16::from_le_bytes([c[0], c[1]]) as f32) * step)
        .collect();
    Ok(DecodedRow {
        logprobs,
        top,
        token_logprob,
    })
}

/// Writes a base file: [`BaseWriter::create`], rows in order, [`BaseWriter::finish`]. The file
/// is written under a temporary name (`FILE.partial`, removed if the run fails) and renamed when
/// complete.
pub struct BaseWriter {
    path: PathBuf,
    tmp: PathBuf,
    /// None once finished.
    w: Option<BufWriter<File>>,
    header: BaseHeader,
    rows_left: u64,
    bytes: u64,
    /// Renamed into place.
    done: bool,
}

impl BaseWriter {
    pub fn create(path: &Path, header: BaseHeader) -> Result<BaseWriter> {
        if header.first == 0 || header.first >= header.ctx {
            bail!(
                "scored range starts at {} of a {}-token chunk",
                header.first,
                header.ctx
            );
        }
        if header.tokens.len() != header.chunks * header.ctx {
            bail!(
                "{} tokens for {} chunks of {}",
                header.tokens.len(),
                header.chunks,
                header.ctx
            );
        }
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        let tmp = PathBuf::from(name);
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut model = header.model.clone();
        if model.len() > MAX_MODEL_LEN {
            let mut end = MAX_MODEL_LEN;
            while !model.is_char_boundary(end) {
                end -= 1;
            }
            model.truncate(end);
        }
        let u32_of = |x: usize, what: &str| -> Result<[u8; 4]> {
            Ok(u32::try_from(x)
                .with_context(|| format!("{what} {x} does not fit the file format"))?
                .to_le_bytes())
        };
        let mut head = Vec::with_capacity(FIXED_HEADER + model.len() + 4 * header.tokens.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&u32_of(header.vocab, "vocabulary size")?);
        head.extend_from_slice(&u32_of(header.ctx, "context")?);
        head.extend_from_slice(&u32_of(header.chunks, "chunk count")?);
        head.extend_from_slice(&u32_of(header.first, "first scored token")?);
        head.extend_from_slice(&u32_of(model.len(), "model name length")?);
        head.extend_from_slice(&header.positions().to_le_bytes());
        head.extend_from_slice(model.as_bytes());
        for t in &header.tokens {
            head.extend_from_slice(&t.to_le_bytes());
        }
        w.write_all(&head)
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(BaseWriter {
            path: path.to_path_buf(),
            tmp,
            w: Some(w),
            rows_left: header.positions(),
            bytes: head.len() as u64,
            done: false,
            header,
        })
    }

    /// Appends the rows of consecutive scored positions: logits rows and the tokens that
    /// followed. Rows are encoded in parallel.
    pub fn write_rows(&mut self, rows: &[&[f32]], tokens: &[u32]) -> Result<()> {
        if rows.len() as u64 > self.rows_left || rows.len() != tokens.len() {
            bail!("more rows than the base file was sized for");
        }
        let (v, rb) = (self.header.vocab, self.header.row_bytes());
        let mut buf = vec![0u8; rows.len() * rb];
        buf.par_chunks_mut(rb)
            .zip(rows.par_iter().zip(tokens))
            .try_for_each(|(out, (row, &t))| {
                if row.len() != v || t as usize >= v {
                    return Err(anyhow::anyhow!(
                        "a logits row does not match the vocabulary"
                    ));
                }
                encode_row(row, t as usize, out);
                Ok(())
            })?;
        self.w
            .as_mut()
            .context("the base file is already complete")?
            .write_all(&buf)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        self.rows_left -= rows.len() as u64;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Completes the file; returns its path and size in bytes.
    pub fn finish(mut self) -> Result<(PathBuf, u64)> {
        if self.rows_left != 0 {
            bail!(
                "{}: {} rows were never written",
                self.tmp.display(),
                self.rows_left
            );
        }
        if let Some(mut w) = self.w.take() {
            w.flush()
                .with_context(|| format!("writing {}", self.tmp.display()))?;
        }
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.path.display())
        })?;
        self.done = true;
        Ok((self.path.clone(), self.bytes))
    }
}

impl Drop for BaseWriter {
    /// An unfinished file (the run failed) is removed.
    fn drop(&mut self) {
        if !self.done {
            drop(self.w.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads a base file, validating it: [`BaseReader::open`], [`BaseReader::check`],
/// [`BaseReader::check_tokens`], then [`BaseReader::compare`] over the positions in order.
pub struct BaseReader {
    path: PathBuf,
    r: BufReader<File>,
    pub header: BaseHeader,
    rows_read: u64,
}

fn not_a_base_file(path: &Path, why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: not a moestream KL-divergence base file ({why}); write one with \
         `moestream perplexity --model BASE --file TEXT --kl-divergence-base FILE`",
        path.display()
    )
}

impl BaseReader {
    pub fn open(path: &Path) -> Result<BaseReader> {
        let file = File::open(path)
            .with_context(|| format!("opening the KL-divergence base file {}", path.display()))?;
        let size = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut fixed = [0u8; FIXED_HEADER];
        if size < FIXED_HEADER as u64 {
            if size >= 8 && read_prefix(&mut r, 8)? == MAGIC {
                bail!(
                    "{}: KL-divergence base file truncated: {size} bytes, shorter than its header",
                    path.display()
                );
            }
            return Err(not_a_base_file(path, "too short"));
        }
        r.read_exact(&mut fixed)
            .with_context(|| format!("reading {}", path.display()))?;
        if &fixed[..8] != MAGIC {
            return Err(not_a_base_file(path, "wrong magic bytes"));
        }
        let u32_at = |a: usize| {
            u32::from_le_bytes([fixed[a], fixed[a + 1], fixed[a + 2], fixed[a + 3]]) as usize
        };
        let version = u32_at(8);
        if version != VERSION as usize {
            bail!(
                "{}: KL-divergence base file version {version}; this build reads version {VERSION}",
                path.display()
            );
        }
        let (vocab, ctx, chunks, first, model_len) =
            (u32_at(12), u32_at(16), u32_at(20), u32_at(24), u32_at(28));
        let positions = u64::from_le_bytes(fixed[32..40].try_into().unwrap_or_default());
        let corrupt = |why: String| {
            anyhow::anyhow!("{}: corrupt KL-divergence base file: {why}", path.display())
        };
        if vocab == 0 || ctx < 2 || chunks == 0 || first == 0 || first >= ctx {
            return Err(corrupt(format!(
                "vocabulary {vocab}, ctx {ctx}, chunks {chunks}, first scored token {first}"
            )));
        }
        if model_len > MAX_MODEL_LEN {
            return Err(corrupt(format!("model name of {model_len} bytes")));
        }
        if positions != chunks as u64 * (ctx - first) as u64 {
            return Err(corrupt(format!(
                "{positions} positions for {chunks} chunks of {ctx} scored from {first}"
            )));
        }
        // Expected size, in u128 so corrupt counts cannot overflow.
        let n_tokens = chunks as u128 * ctx as u128;
        let want = FIXED_HEADER as u128
            + model_len as u128
            + 4 * n_tokens
            + positions as u128 * (ROW_HEADER as u128 + 2 * vocab as u128);
        if (size as u128) < want {
            bail!(
                "{}: KL-divergence base file truncated: {size} bytes, its header promises {want} \
                 ({positions} positions of a {vocab}-token vocabulary)",
                path.display()
            );
        }
        if (size as u128) > want {
            return Err(corrupt(format!(
                "{size} bytes, {} more than its header accounts for",
                size as u128 - want
            )));
        }
        let model = read_prefix(&mut r, model_len)
            .with_context(|| format!("reading {}", path.display()))?;
        let model =
            String::from_utf8(model).map_err(|_| corrupt("the model name is not UTF-8".into()))?;
        let raw = read_prefix(&mut r, 4 * n_tokens as usize)
            .with_context(|| format!("reading {}", path.display()))?;
        let tokens: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(corrupt(format!(
                "token id {t} outside its vocabulary of {vocab}"
            )));
        }
        Ok(BaseReader {
            path: path.to_path_buf(),
            r,
            header: BaseHeader {
                vocab,
                ctx,
                chunks,
                first,
                model,
                tokens,
            },
            rows_read: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that a run with this vocabulary and `--ctx` scores the base file's positions.
    pub fn check(&self, vocab: usize, ctx: usize, first: usize) -> Result<()> {
        let h = &self.header;
        let p = self.path.display();
        if vocab != h.vocab {
            bail!(
                "{p}: the base model has a vocabulary of {} tokens, this model {vocab}: \
                 KL divergence needs the same tokenizer",
                h.vocab
            );
        }
        if ctx != h.ctx || first != h.first {
            bail!(
                "{p}: the base file was computed with --ctx {}; this run has --ctx {ctx} \
                 (pass --ctx {})",
                h.ctx,
                h.ctx
            );
        }
        Ok(())
    }

    /// Checks that `tokens` (the run's chunks, BOS substituted, concatenated; at most the
    /// file's) are the ones the base file was computed from.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let (h, ctx) = (&self.header, self.header.ctx);
        let p = self.path.display();
        if tokens.len() > h.tokens.len() {
            bail!(
                "{p}: this run evaluates {} chunks; the base file holds {}",
                tokens.len() / ctx,
                h.chunks
            );
        }
        if let Some(i) = tokens.iter().zip(&h.tokens).position(|(a, b)| a != b) {
            bail!(
                "{p}: the text does not match the base file: token {i} (chunk {}, position {}) \
                 is {} here and {} in the base file (a different text file or tokenizer?)",
                i / ctx + 1,
                i % ctx,
                tokens[i],
                h.tokens[i]
            );
        }
        Ok(())
    }

    /// Reads the next `rows.len()` positions and compares them with the current model's logits
    /// `rows` (correct next tokens `tokens`). Rows are decoded and compared in parallel.
    pub fn compare(&mut self, rows: &[&[f32]], tokens: &[u32]) -> Result<Vec<Position>> {
        let (v, rb) = (self.header.vocab, self.header.row_bytes());
        if self.rows_read + rows.len() as u64 > self.header.positions() {
            bail!(
                "{}: this run scores more positions than the base file holds ({})",
                self.path.display(),
                self.header.positions()
            );
        }
        let mut raw = vec![0u8; rows.len() * rb];
        self.r.read_exact(&mut raw).with_context(|| {
            format!(
                "{}: KL-divergence base file truncated or unreadable at position {}",
                self.path.display(),
                self.rows_read
            )
        })?;
        let start = self.rows_read;
        let path = &self.path;
        let out = raw
            .par_chunks(rb)
            .zip(rows.par_iter().zip(tokens))
            .enumerate()
            .map(|(k, (raw, (row, &t)))| {
                let base = decode_row(raw, v).map_err(|why| {
                    anyhow::anyhow!(
                        "{}: corrupt KL-divergence base file: position {}: {why}",
                        path.display(),
                        start + k as u64
                    )
                })?;
                if row.len() != v || t as usize >= v {
                    bail!("a logits row does not match the vocabulary");
                }
                let mut p = Position::from_rows(&base.logprobs, row, t as usize);
                // The stored figures are exact; the decoded row's are within a step.
                p.base_logprob = base.token_logprob;
                p.same_top = base.top == argmax(row);
                Ok(p)
            })
            .collect::<Result<Vec<Position>>>()?;
        self.rows_read += rows.len() as u64;
        Ok(out)
    }
}

fn read_prefix(r: &mut impl Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// What `perplexity` does with the scored rows in a KL-divergence mode.
pub enum KlMode {
    /// `--kl-divergence-base FILE`: write the base file.
    Write(BaseWriter),
    /// `--kl-divergence`: compare with it.
    Compare(BaseReader, KlStats),
}

impl KlMode {
    /// Takes the logits rows of consecutive scored positions and the tokens that followed.
    pub fn visit(&mut self, rows: &[&[f32]], tokens: &[u32]) -> Result<()> {
        match self {
            KlMode::Write(w) => w.write_rows(rows, tokens),
            KlMode::Compare(r, stats) => {
                for p in r.compare(rows, tokens)? {
                    stats.add(p);
                }
                Ok(())
            }
        }
    }

    /// After the last chunk: completes the file, or prints the comparison on stdout.
    pub fn finish(self) -> Result<()> {
        match self {
            KlMode::Write(w) => {
                let (path, bytes) = w.finish()?;
                eprintln!(
                    "[wrote the base distributions to {} ({})]",
                    path.display(),
                    crate::loaded::human_bytes(bytes)
                );
            }
            KlMode::Compare(r, stats) => {
                let s = stats.summary().context("no positions were compared")?;
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "\nKL divergence against {} (base model {}, {} of its {} positions)\n",
                    r.path.display(),
                    r.header.model,
                    s.positions,
                    r.header.positions()
                )?;
                s.print(&mut out)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64* uniform in [0, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Roughly normal (sum of 4 uniforms).
        fn normal(&mut self) -> f64 {
            ((0..4).map(|_| self.next()).sum::<f64>() - 2.0) * 3f64.sqrt()
        }
    }

    fn logits(rng: &mut Rng, v: usize, scale: f64) -> Vec<f32> {
        (0..v).map(|_| (scale * rng.normal()) as f32).collect()
    }

    /// Reference KL of two probability vectors, directly from the definition.
    fn kl_ref(p: &[f64], q: &[f64]) -> f64 {
        p.iter()
            .zip(q)
            .filter(|(p, _)| **p > 0.0)
            .map(|(p, q)| p * (p.ln() - q.ln()))
            .sum()
    }

    fn ln(v: &[f64]) -> Vec<f32> {
        v.iter().map(|x| x.ln() as f32).collect()
    }

    #[test]
    fn kl_of_two_element_distributions_by_hand() {
        // P = (1/2, 1/2), Q = (9/10, 1/10): 1/2 ln(5/9) + 1/2 ln 5 = ln(5/3).
        let kl = kl_divergence(&ln(&[0.5, 0.5]), &ln(&[0.9, 0.1]));
        assert!((kl - (5f64 / 3.0).ln()).abs() < 1e-7, "{kl}");
        // P = (1/4, 3/4), Q = (1/2, 1/2): 1/4 ln(1/2) + 3/4 ln(3/2).
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        let kl = kl_divergence(&ln(&[0.25, 0.75]), &ln(&[0.5, 0.5]));
        assert!((kl - want).abs() < 1e-7, "{kl} vs {want}");
        // Logits work as well as log-probabilities (each row is normalized): shift both.
        let kl2 = kl_divergence(&[3.0, 3.0 + 3f32.ln()], &[-7.0, -7.0]);
        assert!((kl2 - want).abs() < 1e-7, "{kl2} vs {want}");
        // Not symmetric: KL(Q‖P) = 1/2 ln 2 + 1/2 ln(2/3).
        let back = kl_divergence(&ln(&[0.5, 0.5]), &ln(&[0.25, 0.75]));
        assert!((back - (0.5 * 2f64.ln() + 0.5 * (2f64 / 3.0).ln())).abs() < 1e-7);
    }

    #[test]
    fn kl_edge_cases() {
        let row = [0.3f32, -1.0, 2.0, -5.5];
        assert_eq!(kl_divergence(&row, &row), 0.0);
        // Zero-probability base entries contribute nothing; a zero in Q where P > 0 is infinite.
        let ninf = f32::NEG_INFINITY;
        let kl = kl_divergence(&[0.0, ninf], &[0.0, -1.0]);
        assert!((kl - (1.0 + (-1f64).exp()).ln()).abs() < 1e-7, "{kl}");
        assert_eq!(kl_divergence(&[0.0, 0.0], &[0.0, ninf]), f64::INFINITY);
    }

    #[test]
    fn kl_matches_the_definition_on_random_rows() {
        let mut rng = Rng(7);
        for v in [3, 100, 5000] {
            let a = logits(&mut rng, v, 2.0);
            let b: Vec<f32> = a.iter().map(|&x| x + 0.3 * rng.normal() as f32).collect();
            let probs = |r: &[f32]| {
                let m = r.iter().copied().fold(f32::MIN, f32::max) as f64;
                let e: Vec<f64> = r.iter().map(|&x| (x as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|x| x / s).collect::<Vec<f64>>()
            };
            let want = kl_ref(&probs(&a), &probs(&b));
            let got = kl_divergence(&a, &b);
            assert!((got - want).abs() < 1e-12 + 1e-9 * want, "{got} vs {want}");
        }
    }

    #[test]
    fn encoding_round_trip_precision() {
        let mut rng = Rng(42);
        let v = 32000;
        let rb = ROW_HEADER + 2 * v;
        let mut worst_self = 0f64;
        let mut worst_other = 0f64;
        for (k, scale) in [1.0, 3.0, 6.0, 0.1].into_iter().enumerate() {
            let mut row = logits(&mut rng, v, scale);
            row[17] = 4.0 * scale as f32; // the top token (the others are within 3.5 scale)
            let token = 1000 + k;
            let mut buf = vec![0u8; rb];
            encode_row(&row, token, &mut buf);
            let d = decode_row(&buf, v).unwrap();
            assert_eq!(d.top, 17);
            assert_eq!(d.token_logprob, log_softmax_at(&row, token));
            // Every log-probability within half a step of the truth (relative to the top).
            let step = f32::from_le_bytes(buf[4..8].try_into().unwrap()) as f64;
            assert!(step <= RANGE_CAP / MAX_CODE * 1.000_001);
            for (&x, &y) in row.iter().zip(&d.logprobs) {
                let exact = x as f64 - row[17] as f64;
                if exact >= -RANGE_CAP {
                    assert!(
                        (y as f64 - exact).abs() <= step / 2.0 + 1e-5,
                        "{y} vs {exact}, step {step}"
                    );
                } else {
                    assert!((y as f64 + RANGE_CAP).abs() < 1e-4, "{y}");
                }
            }
            // The base against itself: second order in the step.
            let self_kl = kl_divergence(&d.logprobs, &row);
            worst_self = worst_self.max(self_kl);
            // Against a perturbed model: the decoded base gives the exact base's KL.
            for noise in [0.05, 0.5] {
                let q: Vec<f32> = row
                    .iter()
                    .map(|&x| x + (noise * rng.normal()) as f32)
                    .collect();
                let (exact, decoded) = (kl_divergence(&row, &q), kl_divergence(&d.logprobs, &q));
                assert!(exact > 0.0, "{exact}");
                worst_other = worst_other.max((decoded - exact).abs());
            }
        }
        // Bound step²/8 ≈ 2.6e-8 (measured: 4e-9); against KLs of 5e-4..0.13: 4e-7 measured.
        assert!(worst_self < 2.7e-8, "KL(decoded‖exact) = {worst_self}");
        assert!(
            worst_other < 2e-6,
            "KL error against another model {worst_other}"
        );
    }

    #[test]
    fn a_corrupt_row_is_detected() {
        let v = 50;
        let row: Vec<f32> = (0..v).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let mut buf = vec![0u8; ROW_HEADER + 2 * v];
        encode_row(&row, 3, &mut buf);
        assert!(decode_row(&buf, v).is_ok());
        for at in [0, 5, 9, 30, ROW_HEADER + 2 * v - 1] {
            let mut bad = buf.clone();
            bad[at] ^= 0x10;
            assert!(decode_row(&bad, v).is_err(), "byte {at}");
        }
    }

    #[test]
    fn summary_statistics_by_hand() {
        let mut s = KlStats::default();
        assert!(s.summary().is_none());
        for (k, same) in [(0.0, true), (3.0, false), (1.0, true), (2.0, true)] {
            s.add(Position {
                kld: k,
                base_logprob: 0.5f64.ln(),
                logprob: 0.25f64.ln(),
                same_top: same,
            });
        }
        let m = s.summary().unwrap();
        assert_eq!(m.positions, 4);
        assert!((m.kld_mean - 1.5).abs() < 1e-12);
        // Population variance 1.25, standard error sqrt(1.25 / 3).
        assert!((m.kld_err - (1.25f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!((m.kld_max, m.kld_min), (3.0, 0.0));
        assert!((m.kld_median - 1.5).abs() < 1e-12);
        assert!((m.kld_p99 - 2.97).abs() < 1e-12);
        assert!((m.kld_p999 - 2.997).abs() < 1e-12);
        assert!((m.same_top - 0.75).abs() < 1e-12);
        assert!((m.dp_mean + 0.25).abs() < 1e-12 && m.dp_err < 1e-12);
        assert!((m.dp_rms - 0.25).abs() < 1e-12);
        assert!((m.ppl - 4.0).abs() < 1e-9 && (m.ppl_base - 2.0).abs() < 1e-9);
        assert!((m.ln_ppl_ratio - 2f64.ln()).abs() < 1e-12);
    }

    fn header(vocab: usize, ctx: usize, chunks: usize) -> BaseHeader {
        BaseHeader {
            vocab,
            ctx,
            chunks,
            first: ctx / 2,
            model: "test-model".into(),
            tokens: (0..chunks * ctx).map(|i| (i % vocab) as u32).collect(),
        }
    }

    /// Writes a small base file; returns it with its rows and their tokens.
    fn write_file(dir: &Path) -> (PathBuf, Vec<Vec<f32>>, Vec<u32>) {
        let (v, ctx, chunks) = (40, 8, 2);
        let h = header(v, ctx, chunks);
        let mut rng = Rng(3);
        let n = chunks * (ctx - ctx / 2);
        let rows: Vec<Vec<f32>> = (0..n).map(|_| logits(&mut rng, v, 2.0)).collect();
        let toks: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let path = dir.join("base.kld");
        let mut w = BaseWriter::create(&path, h).unwrap();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        w.write_rows(&refs[..3], &toks[..3]).unwrap();
        w.write_rows(&refs[3..], &toks[3..]).unwrap();
        let (p, bytes) = w.finish().unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), bytes);
        (p, rows, toks)
    }

    #[test]
    fn file_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let (path, rows, toks) = write_file(t.path());
        let mut r = BaseReader::open(&path).unwrap();
        assert_eq!(r.header, header(40, 8, 2));
        r.check(40, 8, 4).unwrap();
        r.check_tokens(&r.header.tokens.clone()).unwrap();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let ps = r.compare(&refs, &toks).unwrap();
        for (p, (row, &t)) in ps.iter().zip(rows.iter().zip(&toks)) {
            assert!(p.kld < 1e-7, "{}", p.kld);
            assert!(p.same_top);
            assert_eq!(p.base_logprob, p.logprob);
            assert_eq!(p.logprob, log_softmax_at(row, t as usize));
        }
        assert!(r.compare(&refs[..1], &toks[..1]).is_err(), "past the end");
    }

    #[test]
    fn an_unfinished_file_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("base.kld");
        let mut w = BaseWriter::create(&path, header(40, 8, 2)).unwrap();
        let row = vec![0f32; 40];
        w.write_rows(&[&row], &[1]).unwrap();
        assert!(t.path().join("base.kld.partial").exists());
        let e = format!("{:#}", w.finish().err().unwrap());
        assert!(e.contains("7 rows were never written"), "{e}");
        assert!(std::fs::read_dir(t.path()).unwrap().next().is_none());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let t = tempfile::tempdir().unwrap();
        let (path, rows, toks) = write_file(t.path());
        let bytes = std::fs::read(&path).unwrap();
        let err = |b: &[u8]| {
            let p = t.path().join("bad.kld");
            std::fs::write(&p, b).unwrap();
            format!("{:#}", BaseReader::open(&p).err().expect("must fail"))
        };
        assert!(err(&bytes[..bytes.len() - 1]).contains("truncated"));
        assert!(err(&bytes[..20]).contains("truncated"));
        assert!(err(b"hello").contains("not a moestream KL-divergence base file"));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(err(&b).contains("wrong magic"));
        let mut b = bytes.clone();
        b[8] = 9;
        assert!(err(&b).contains("version 9"));
        let mut b = bytes.clone();
        b.push(0);
        assert!(err(&b).contains("more than its header"));
        let missing = BaseReader::open(&t.path().join("nope.kld")).err().unwrap();
        assert!(format!("{missing:#}").contains("nope.kld"));
        // A flipped bit in a row: caught by its checksum when read.
        let mut b = bytes.clone();
        let n = b.len();
        b[n - 5] ^= 1;
        let p = t.path().join("flip.kld");
        std::fs::write(&p, &b).unwrap();
        let mut r = BaseReader::open(&p).unwrap();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let e = format!("{:#}", r.compare(&refs, &toks).err().unwrap());
        assert!(e.contains("corrupt") && e.contains("position 7"), "{e}");
        // Mismatches with the run.
        let r = BaseReader::open(&path).unwrap();
        let mut other = r.header.tokens.clone();
        other[11] += 1;
        let e = format!("{:#}", r.check_tokens(&other).err().unwrap());
        assert!(
            e.contains("does not match") && e.contains("token 11"),
            "{e}"
        );
        assert!(format!("{:#}", r.check(41, 8, 4).err().unwrap()).contains("vocabulary"));
        assert!(format!("{:#}", r.check(40, 16, 8).err().unwrap()).contains("--ctx 8"));
    }
}
