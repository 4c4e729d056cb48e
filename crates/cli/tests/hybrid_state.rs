//! Sequence state of hybrid (Gated DeltaNet) models: checkpoint, restore, replay and failed
//! passes must leave exactly the state an uninterrupted run has. Runs on fresh random models
//! of the three hybrid architectures (`synth --preset tiny`, float and MLX 4-bit): 8 layers,
//! value heads = 2 x key heads, head_dim != hidden/heads, prompts past one 64-token chunk.
use crate::common::*;
use moestream_engine::models::{Logits, Model};
use moestream_engine::store::{StoreOptions, StreamMode};
use moestream_kernels::ops::log_softmax_at;
use std::path::PathBuf;

fn hybrid_models(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for arch in ["qwen3_next", "qwen3_5", "qwen3_5_moe"] {
        for format in ["hf-f32", "mlx4"] {
            v.push(synth(dir, arch, format));
        }
    }
    v
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % 500)
        .collect()
}

/// Log-probability of `next` after each step, feeding `steps` one token at a time.
fn step_logprobs(
    m: &Model,
    cache: &mut moestream_engine::cache::SequenceCache,
    steps: &[u32],
) -> Vec<f64> {
    let mut out = Vec::new();
    for w in steps.windows(2) {
        let logits = m.forward(&w[..1], cache, Logits::Last).expect("forward");
        out.push(log_softmax_at(&logits, w[1] as usize));
    }
    out
}

#[test]
fn restore_and_replay_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in hybrid_models(tmp.path()) {
        let m = Model::load(&dir).expect("load");
        let prompt = tokens(70, 1);
        let cont = tokens(20, 2);
        // Uninterrupted: prompt, then 20 single-token steps.
        let mut a = m.new_cache(128);
        m.forward(&prompt, &mut a, Logits::Last).expect("prefill");
        let want = step_logprobs(&m, &mut a, &cont);

        // Interrupted: 5 steps, checkpoint, 7 steps of other tokens, restore, replay.
        let mut b = m.new_cache(128);
        m.forward(&prompt, &mut b, Logits::Last).expect("prefill");
        let first = step_logprobs(&m, &mut b, &cont[..6]);
        assert_eq!(first, want[..5], "{}", dir.display());
        let cp = b.checkpoint();
        let detour = tokens(8, 3);
        step_logprobs(&m, &mut b, &detour);
        assert_eq!(b.len(), 70 + 5 + 7);
        assert!(!b.truncate(70 + 5), "a recurrent state cannot be cut");
        b.restore(&cp).expect("restore");
        assert_eq!(b.len(), 75);
        let replayed = step_logprobs(&m, &mut b, &cont[5..]);
        assert_eq!(
            replayed,
            want[5..],
            "{}: restore then replay",
            dir.display()
        );

        // Model::rewind: back to 72 tokens through the checkpoint at 70, replaying 2 tokens in
        // one (chunked) pass, then on step by step. The same computation without the detour:
        // prompt, the 2 tokens as one pass, steps. Bit for bit equal.
        let mut d = m.new_cache(128);
        m.forward(&prompt, &mut d, Logits::Last).expect("prefill");
        m.forward(&cont[..2], &mut d, Logits::Last).expect("pair");
        let want_pair = step_logprobs(&m, &mut d, &cont[1..]);
        let mut c = m.new_cache(128);
        m.forward(&prompt, &mut c, Logits::Last).expect("prefill");
        let cp70 = c.checkpoint();
        step_logprobs(&m, &mut c, &cont[..8]);
        let known: Vec<u32> = prompt.iter().chain(&cont[..7]).copied().collect();
        m.rewind(&mut c, 72, &known, Some(&cp70)).expect("rewind");
        assert_eq!(c.len(), 72);
        let after = step_logprobs(&m, &mut c, &cont[1..]);
        assert_eq!(after, want_pair, "{}: rewind", dir.display());
        assert!(m.rewind(&mut c, 71, &known, None).is_err(), "no checkpoint");
    }
}

#[test]
fn a_failed_streamed_pass_leaves_the_recurrent_state_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in hybrid_models(tmp.path()) {
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
        if !cfg.contains("num_experts") {
            continue;
        }
        let resident = Model::load_with(
            &dir,
            &StoreOptions {
                stream: StreamMode::Off,
                ..StoreOptions::default()
            },
        )
        .expect("load");
        let prompt = tokens(70, 4);
        let mut c = resident.new_cache(128);
        resident
            .forward(&prompt, &mut c, Logits::Last)
            .expect("prefill");
        let want = resident.forward(&[9], &mut c, Logits::Last).expect("step");
        // The 3rd read after load fails: inside the prefill, after some linear layers ran.
        let streamed = Model::load_with(
            &dir,
            &StoreOptions {
                stream: StreamMode::On,
                fail_read: Some(3),
                cache: moestream_engine::store::CacheSize::Bytes(0),
                ..StoreOptions::default()
            },
        )
        .expect("load");
        let mut s = streamed.new_cache(128);
        assert!(streamed.forward(&prompt, &mut s, Logits::Last).is_err());
        assert_eq!(s.len(), 0);
        streamed
            .forward(&prompt, &mut s, Logits::Last)
            .expect("prefill");
        let got = streamed.forward(&[9], &mut s, Logits::Last).expect("step");
        assert_eq!(got, want, "{}", dir.display());
    }
}

fn score_json(model: &std::path::Path, extra: &[&str]) -> Vec<f64> {
    score_json_env(model, extra, false)
}

/// `exact`: f32 activations in decode too (MOESTREAM_EXACT_MATMUL=1).
fn score_json_env(model: &std::path::Path, extra: &[&str], exact: bool) -> Vec<f64> {
    let tokens: Vec<String> = (0..100u32)
        .map(|i| ((i * 53 + 7) % 500).to_string())
        .collect();
    let tokens = tokens.join(" ");
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &tokens,
    ];
    args.extend_from_slice(extra);
    let o = std::process::Command::new(crate::common::bin())
        .args(&args)
        .env("MOESTREAM_EXACT_MATMUL", if exact { "1" } else { "0" })
        .output()
        .expect("run moestream");
    assert!(
        o.status.success(),
        "score {extra:?}: {}",
        crate::common::stderr(&o)
    );
    crate::common::score_logprobs(&o)
}

/// Streamed equals mapped bit for bit; single-token decode steps (the recurrent form) equal the
/// chunked prefill up to f32 rounding. Exact f32 activations here: MLX decode's int16 activations
/// alone move these random hybrids' log-probs by up to ~1e-2.
#[test]
fn hybrid_models_stream_exactly_and_decode_like_they_prefill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in hybrid_models(tmp.path()) {
        let mapped = score_json(&dir, &["--stream-experts", "off"]);
        for v in [
            &[][..],
            &["--expert-cache", "0", "--io-backend", "threads"][..],
        ] {
            let mut args = vec!["--stream-experts", "on"];
            args.extend_from_slice(v);
            assert_eq!(mapped, score_json(&dir, &args), "{} {v:?}", dir.display());
        }
        let prefill = score_json_env(&dir, &["--stream-experts", "off"], true);
        let stepped = score_json_env(&dir, &["--stream-experts", "off", "--ubatch", "1"], true);
        let worst = prefill
            .iter()
            .zip(&stepped)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-4,
            "{}: decode vs prefill {worst:e}",
            dir.display()
        );
    }
}

#[test]
fn mtp_head_is_loaded_when_present_and_never_touches_the_trunk() {
    // Released Qwen3.5 / Qwen3-Next checkpoints ship an `mtp.*` head (synth writes one in the HF
    // formats, per-expert experts as the released MoE ones); mlx-lm's conversions drop it.
    let t = tempfile::tempdir().unwrap();
    for (arch, experts, tensors) in [("qwen3_5_moe", 8, 41), ("qwen3_5", 0, 15)] {
        let with = synth(t.path(), arch, "hf-f32");
        let o = moestream(&["inspect", "--model", with.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["mtp"]["layers"], 1, "{arch}: {}", v["mtp"]);
        assert_eq!(v["mtp"]["experts_per_layer"], experts, "{arch}");
        assert_eq!(v["mtp"]["tensors"].as_array().unwrap().len(), tensors);
        assert!(v["mtp"]["bytes"].as_u64().unwrap() > 0);

        // Without the head: same log-probabilities, and inspect says there is none.
        let without = t.path().join(format!("{arch}-no-mtp"));
        std::fs::create_dir(&without).unwrap();
        copy_files(&with, &without);
        let weights = without.join("model.safetensors");
        rewrite_safetensors(&weights, |name, d, s, b| {
            (!name.starts_with("mtp.")).then_some((d, s, b))
        });
        let ids: Vec<String> = tokens(20, 3).iter().map(u32::to_string).collect();
        assert_eq!(
            score(&with, &ids.join(" ")).1,
            score(&without, &ids.join(" ")).1,
            "{arch}"
        );
        let o = moestream(&["inspect", "--model", without.to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert!(v["mtp"].is_null(), "{arch}: {}", v["mtp"]);

        // A partial head is an error that names what is missing.
        let partial = t.path().join(format!("{arch}-partial-mtp"));
        std::fs::create_dir(&partial).unwrap();
        copy_files(&with, &partial);
        rewrite_safetensors(&partial.join("model.safetensors"), |name, d, s, b| {
            (name != "mtp.layers.0.self_attn.k_proj.weight").then_some((d, s, b))
        });
        let o = moestream(&["inspect", "--model", partial.to_str().unwrap()]);
        assert_clean_error(&o, &["mtp.layers.0.self_attn.k_proj"]);
    }
}

/// `run --mtp ...` on `model`: the generated tokens and (proposed, accepted) drafts.
fn mtp_run(model: &std::path::Path, extra: &[&str]) -> (String, u64, u64) {
    let mut args = vec!["--temperature", "0"];
    args.extend_from_slice(extra);
    let v = run_json(model, 40, &args);
    let s = &v["speculation"];
    (
        v["generated_tokens"].to_string(),
        s["proposed"].as_u64().unwrap_or(0),
        s["accepted"].as_u64().unwrap_or(0),
    )
}

#[test]
fn mtp_self_speculation_gives_the_tokens_of_plain_decoding() {
    let t = tempfile::tempdir().unwrap();
    for arch in ["qwen3_5", "qwen3_5_moe"] {
        let m = synth(t.path(), arch, "hf-f32");
        let plain = mtp_run(&m, &[]).0;
        // The random head: nearly every draft rejected, its cache cut back every round.
        for k in ["1", "3"] {
            let (tokens, proposed, _) = mtp_run(
                &m,
                &["--mtp", "--fixed-draft-length", "--num-draft-tokens", k],
            );
            assert_eq!(
                tokens, plain,
                "{arch}: --mtp with {k} drafts changed the tokens"
            );
            assert!(proposed > 0, "{arch}: the MTP head proposed nothing");
        }
        // Streamed experts: the same.
        let (tokens, _, _) = mtp_run(&m, &["--mtp", "--stream-experts", "on"]);
        assert_eq!(
            tokens, plain,
            "{arch}: --mtp while streaming changed the tokens"
        );
    }

    // A head that agrees: with tied embeddings a random trunk repeats its input token; a head
    // whose fc passes the token's embedding through (fc = [I | 0], its layer's outputs zeroed,
    // unit norms) predicts that same token again, so most drafts are accepted and the accepted
    // path (the trunk's states of kept drafts, the head's cache cut after them) is exercised.
    let tied = t.path().join("tied");
    std::fs::create_dir(&tied).unwrap();
    let m = synth(&tied, "qwen3_5", "hf-f32");
    let config = m.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
    c["tie_word_embeddings"] = serde_json::json!(true);
    if c.get("text_config").is_some() {
        c["text_config"]["tie_word_embeddings"] = serde_json::json!(true);
    }
    std::fs::write(&config, c.to_string()).unwrap();
    rewrite_safetensors(&m.join("model.safetensors"), |name, d, s, b| {
        let f32s = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        match name {
            "lm_head.weight" => None,
            "mtp.fc.weight" => {
                let (rows, cols) = (s[0], s[1]);
                let mut w = vec![0f32; rows * cols];
                for i in 0..rows {
                    w[i * cols + i] = 1.0;
                }
                Some((d, s, f32s(w)))
            }
            "mtp.pre_fc_norm_embedding.weight" | "mtp.norm.weight" => {
                let n = b.len() / 4;
                Some((d, s, f32s(vec![0.0; n]))) // stored as w in 1 + w
            }
            n if n.starts_with("mtp.layers.0.self_attn.o_proj")
                || n.starts_with("mtp.layers.0.mlp.down_proj") =>
            {
                let n = b.len() / 4;
                Some((d, s, f32s(vec![0.0; n])))
            }
            _ => Some((d, s, b)),
        }
    });
    let plain = mtp_run(&m, &[]).0;
    let (tokens, proposed, accepted) = mtp_run(
        &m,
        &["--mtp", "--fixed-draft-length", "--num-draft-tokens", "3"],
    );
    assert_eq!(tokens, plain, "a copying MTP head changed the tokens");
    assert!(
        accepted * 2 > proposed,
        "a copying head on a tied model should be accepted mostly: {accepted} of {proposed}"
    );
    eprintln!("copying head: {accepted} of {proposed} drafts accepted; tokens {tokens}");
}
