//! `perplexity --kl-divergence-base FILE [--kl-divergence]`: a model against itself gives zero
//! divergence, quantized conversions of one model diverge from its float original by amounts
//! consistent with what `score` shows, and a wrong or damaged base file is a clear error.
use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

const CTX: usize = 32;

fn text() -> String {
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        .repeat(3)
}

fn write_text(dir: &Path, name: &str, text: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, text).unwrap();
    f
}

fn ppl(model: &Path, file: &Path, extra: &[&str]) -> Output {
    let ctx = CTX.to_string();
    let mut args = vec![
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--ctx",
        &ctx,
    ];
    args.extend_from_slice(extra);
    moestream(&args)
}

fn write_base(model: &Path, file: &Path, base: &Path) -> Output {
    let o = ppl(
        model,
        file,
        &["--kl-divergence-base", base.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

fn compare(model: &Path, file: &Path, base: &Path) -> Output {
    ppl(
        model,
        file,
        &[
            "--kl-divergence-base",
            base.to_str().unwrap(),
            "--kl-divergence",
        ],
    )
}

/// The number after `label` and its colon in `out`.
fn stat(out: &str, label: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"));
    line.split_once(':')
        .unwrap()
        .1
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn final_ppl(out: &str) -> f64 {
    out.split("PPL = ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_model_against_itself_diverges_by_nothing() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "hf-f32");
    let f = write_text(t.path(), "text.txt", &text());
    let base = t.path().join("base.kld");
    let plain = ppl(&m, &f, &[]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let o = write_base(&m, &f, &base);
    // Writing the base changes nothing in the perplexity run itself.
    assert_eq!(final_ppl(&stdout(&o)), final_ppl(&stdout(&plain)));
    let n_chunks = text().len() / CTX;
    let positions = (n_chunks * (CTX - CTX / 2)) as u64;
    let size = std::fs::metadata(&base).unwrap().len();
    assert!(size > positions * (24 + 2 * 512), "{size} bytes");
    assert!(!t.path().join("base.kld.partial").exists());

    let o = compare(&m, &f, &base);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for label in [
        "Mean    KLD",
        "Maximum KLD",
        "99.9%   KLD",
        "99.0%   KLD",
        "Median  KLD",
    ] {
        let v = stat(&out, label);
        assert!((0.0..1e-6).contains(&v), "{label} {v}:\n{out}");
    }
    assert_eq!(stat(&out, "Same top p"), 100.0, "{out}");
    assert_eq!(stat(&out, "Mean    Δp"), 0.0, "{out}");
    assert_eq!(stat(&out, "Mean PPL(Q)"), stat(&out, "Mean PPL(base)"));
    assert!((stat(&out, "Mean PPL(Q)") - final_ppl(&out)).abs() < 1e-4);
    assert!(out.contains(&format!("[{positions} positions]")), "{out}");
}

fn fixture(dir: &Path, name: &str, tokenizer_from: &Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    copy_files(&src.join(name), &m);
    // The fixtures have no tokenizer; the synthetic byte-level one fits their 512-token vocabulary.
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_from.join(f), m.join(f)).unwrap();
    }
    m
}

#[test]
fn quantized_conversions_diverge_from_the_float_model() {
    // qwen3_moe_a in float32 is the base; mlx-lm's 8-bit and 4-bit conversions of it must show
    // a positive, finite KL, larger at 4 bits. Checked independently with `score` on the same
    // chunks: PPL of both and the mean Δp of the correct token are recomputed exactly, and the
    // KL is at least the divergence of the two-outcome split {correct token, any other}, which
    // can only be smaller (data-processing inequality).
    let t = tempfile::tempdir().unwrap();
    let tok = synth(t.path(), "qwen3_moe", "hf-f32");
    let base_model = fixture(t.path(), "qwen3_moe_a", &tok);
    let text = text();
    let f = write_text(t.path(), "text.txt", &text);
    let base = t.path().join("base.kld");
    write_base(&base_model, &f, &base);
    // Byte-level tokenizer, no BOS for qwen3: chunk c is bytes [c*CTX, (c+1)*CTX).
    let chunks: Vec<String> = text.as_bytes()[..text.len() / CTX * CTX]
        .chunks(CTX)
        .map(|c| {
            c.iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let scored = |m: &Path| -> Vec<f64> {
        chunks
            .iter()
            .flat_map(|c| score(m, c).1[CTX / 2 - 1..].to_vec())
            .collect()
    };
    let lp_base = scored(&base_model);
    let mut klds = vec![];
    for name in ["qwen3_moe_a_mlx8", "qwen3_moe_a_mlx4"] {
        let m = fixture(t.path(), name, &tok);
        let o = compare(&m, &f, &base);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let out = stdout(&o);
        let (kl, max) = (stat(&out, "Mean    KLD"), stat(&out, "Maximum KLD"));
        assert!(kl.is_finite() && kl > 1e-6, "{name}: KL {kl}\n{out}");
        assert!(
            max >= stat(&out, "99.9%   KLD")
                && stat(&out, "99.0%   KLD") >= stat(&out, "Median  KLD")
        );
        let lp = scored(&m);
        let n = lp.len() as f64;
        let ppl_of = |v: &[f64]| (-v.iter().sum::<f64>() / n).exp();
        let rel = |a: f64, b: f64| (a - b).abs() / b;
        assert!(rel(stat(&out, "Mean PPL(Q)"), ppl_of(&lp)) < 1e-6, "{out}");
        assert!(
            rel(stat(&out, "Mean PPL(base)"), ppl_of(&lp_base)) < 1e-6,
            "{out}"
        );
        let dp: f64 = lp
            .iter()
            .zip(&lp_base)
            .map(|(a, b)| a.exp() - b.exp())
            .sum::<f64>()
            / n;
        assert!(
            (stat(&out, "Mean    Δp") - 100.0 * dp).abs() < 2e-5,
            "Δp {dp}: {out}"
        );
        let binary = |p: f64, q: f64| {
            let t = |a: f64, b: f64| if a > 0.0 { a * (a / b).ln() } else { 0.0 };
            t(p, q) + t(1.0 - p, 1.0 - q)
        };
        let lower: Vec<f64> = lp_base
            .iter()
            .zip(&lp)
            .map(|(b, q)| binary(b.exp(), q.exp()))
            .collect();
        let lower_mean = lower.iter().sum::<f64>() / n;
        let lower_max = lower.iter().copied().fold(0.0, f64::max);
        assert!(
            kl + 1e-6 >= lower_mean,
            "{name}: KL {kl} < bound {lower_mean}"
        );
        assert!(
            max + 1e-6 >= lower_max,
            "{name}: max KL {max} < bound {lower_max}"
        );
        let same = stat(&out, "Same top p");
        assert!((0.0..=100.0).contains(&same), "{same}");
        klds.push(kl);
    }
    assert!(
        klds[1] > klds[0],
        "4-bit KL {} vs 8-bit {}",
        klds[1],
        klds[0]
    );
}

#[test]
fn a_base_file_from_other_tokens_or_settings_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "hf-f32");
    let f = write_text(t.path(), "text.txt", &text());
    let base = t.path().join("base.kld");
    write_base(&m, &f, &base);
    // Same length, one character changed in the second chunk.
    let mut other = text().into_bytes();
    other[CTX + 5] = b'#';
    let g = write_text(t.path(), "other.txt", std::str::from_utf8(&other).unwrap());
    let o = compare(&m, &g, &base);
    assert_clean_error(&o, &["base.kld", "does not match", "token 37", "chunk 2"]);
    // Too short a text for the base file's chunks.
    let short = write_text(t.path(), "short.txt", &text()[..3 * CTX]);
    assert_clean_error(&compare(&m, &short, &base), &["base.kld", "holds"]);
    // ... unless --chunks asks for no more than it has.
    let ok = ppl(
        &m,
        &short,
        &[
            "--kl-divergence-base",
            base.to_str().unwrap(),
            "--kl-divergence",
            "--chunks",
            "2",
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("[32 positions]"), "{}", stdout(&ok));
    // Another --ctx.
    let o = moestream(&[
        "perplexity",
        "--model",
        m.to_str().unwrap(),
        "--file",
        f.to_str().unwrap(),
        "--ctx",
        "16",
        "--kl-divergence-base",
        base.to_str().unwrap(),
        "--kl-divergence",
    ]);
    assert_clean_error(&o, &["base.kld", "--ctx 32"]);
    // --kl-divergence needs the file.
    let o = ppl(&m, &f, &["--kl-divergence"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--kl-divergence-base"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_missing_truncated_or_corrupt_base_file_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "hf-f32");
    let f = write_text(t.path(), "text.txt", &text());
    let base = t.path().join("base.kld");
    write_base(&m, &f, &base);
    let bytes = std::fs::read(&base).unwrap();
    let bad = t.path().join("bad.kld");
    let run = |b: &[u8]| {
        std::fs::write(&bad, b).unwrap();
        compare(&m, &f, &bad)
    };
    assert_clean_error(&run(&bytes[..bytes.len() - 100]), &["bad.kld", "truncated"]);
    assert_clean_error(&run(&bytes[..30]), &["bad.kld", "truncated"]);
    assert_clean_error(
        &run(&[]),
        &["bad.kld", "not a moestream KL-divergence base file"],
    );
    assert_clean_error(
        &run(&bytes[bytes.len() / 2..]),
        &["bad.kld", "not a moestream KL-divergence base file"],
    );
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 10] ^= 0x40;
    assert_clean_error(&run(&flipped), &["bad.kld", "corrupt", "position"]);
    let missing = t.path().join("missing.kld");
    assert_clean_error(&compare(&m, &f, &missing), &["missing.kld"]);
}
