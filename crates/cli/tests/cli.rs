//! The command-line contract: `score`'s exact output, `run`'s statistics, `synth` layouts that
//! load, and that every weight format of the same synthetic model gives consistent numbers.
use crate::common::*;
use std::path::PathBuf;

#[test]
fn score_prints_exactly_one_json_object() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "hf-f32");
    let o = moestream(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--tokens",
        "5 6 7 8",
    ]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 2);
    assert_eq!(v["tokens"], serde_json::json!([5, 6, 7, 8]));
    let lps = v["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), 3);
    assert!(lps.iter().all(|x| x.as_f64().unwrap() < 0.0));
}

#[test]
fn scoring_in_one_pass_equals_token_by_token_decoding() {
    // The greedy continuation from `run` must be the argmax of `score`'s distribution at each
    // step; and a prefix scored alone gives the same numbers as inside a longer sequence.
    let t = tempfile::tempdir().unwrap();
    for arch in ["qwen3_moe", "qwen3", "mixtral"] {
        let m = synth(t.path(), arch, "hf-f32");
        let ids: Vec<String> = (0..70).map(|i| ((i * 37 + 11) % 250).to_string()).collect();
        let (_, long) = score(&m, &ids.join(" "));
        let (_, short) = score(&m, &ids[..20].join(" "));
        for (a, b) in short.iter().zip(&long) {
            assert!((a - b).abs() < 1e-5, "{arch}: prefix logprob {a} vs {b}");
        }
    }
}

#[test]
fn prefill_is_exact_however_tokens_are_routed() {
    // A prefill computes every product with f32 activations, including an expert that only one
    // of its tokens chose and the last-token logits: its numbers must not depend on the int16
    // activations of decode steps (MOESTREAM_EXACT_MATMUL=1 turns those off). Three tokens with
    // top-2 of 8 experts leave experts with a single user in every layer.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    for name in ["qwen3_moe_a_mlx8", "mixtral_mlx4"] {
        let model = dir.join(name);
        let scored = |exact: &str| {
            let o = std::process::Command::new(bin())
                .args(["score", "--model", model.to_str().unwrap()])
                .args(["--tokens", "5 77 301"])
                .env("MOESTREAM_LOG", "error")
                .env("MOESTREAM_EXACT_MATMUL", exact)
                .output()
                .unwrap();
            assert!(o.status.success(), "{name}: {}", stderr(&o));
            stdout(&o)
        };
        assert_eq!(scored("0"), scored("1"), "{name}");
    }
}

#[test]
fn run_greedy_json_and_statistics_line() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "hf-f32");
    let args = [
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt-tokens",
        "1 2 3 4",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];
    let o = moestream(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let gen: Vec<u64> = v["generated_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(gen.len(), 6);
    let err = stderr(&o);
    for s in [
        "prompt 4 tok",
        "prefill",
        "generated 6 tok",
        "decode",
        "peak resident",
    ] {
        assert!(err.contains(s), "stats line lacks {s}: {err}");
    }
    // Greedy decoding reproduces itself, and each greedy token is the argmax under `score`.
    let o2 = moestream(&args);
    let v2: serde_json::Value = serde_json::from_str(stdout(&o2).trim()).unwrap();
    assert_eq!(v["generated_tokens"], v2["generated_tokens"]);
    assert_eq!(v["text"], v2["text"]);
    let mut seq: Vec<String> = ["1", "2", "3", "4"].iter().map(|s| s.to_string()).collect();
    for &g in &gen {
        let probe = |cand: u64| {
            let mut s = seq.clone();
            s.push(cand.to_string());
            *score(&m, &s.join(" ")).1.last().unwrap()
        };
        let best = probe(g);
        for other in [0u64, 7, 100, 300] {
            if other != g {
                assert!(probe(other) <= best + 1e-9);
            }
        }
        seq.push(g.to_string());
    }
}

#[test]
fn text_prompt_through_chat_template_and_stop_string() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "mlx4");
    let o = moestream(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "héllo 🌍",
        "--max-tokens",
        "8",
        "--seed",
        "3",
        "--temperature",
        "1.0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = moestream(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--text",
        "héllo 🌍",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn inspect_reports_expert_and_non_expert_bytes() {
    let t = tempfile::tempdir().unwrap();
    for fmt in ["hf-f32", "hf-bf16", "mlx4", "mlx8"] {
        let m = synth(t.path(), "qwen3_moe", fmt);
        let o = moestream(&["inspect", "--model", m.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["architecture"], "qwen3_moe");
        assert_eq!(v["experts"], 8);
        let (e, d, f) = (
            v["expert_bytes"].as_u64().unwrap(),
            v["non_expert_bytes"].as_u64().unwrap(),
            v["file_bytes"].as_u64().unwrap(),
        );
        // Norm weights are in neither count; headers are small.
        assert!(
            e + d <= f && f - (e + d) < 64 * 1024,
            "{fmt}: {e} + {d} vs {f}"
        );
        // 8 experts x 3 projections x 128 x 128.
        assert_eq!(v["expert_parameters"], 4 * 8 * 3 * 128 * 128);
    }
}

#[test]
fn demo_model_is_generated_once_and_labelled_as_noise() {
    let t = tempfile::tempdir().unwrap();
    let run = || {
        std::process::Command::new(bin())
            .args(["run", "--prompt", "hi", "--max-tokens", "3"])
            .env("XDG_CACHE_HOME", t.path())
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("generating the random-weight demo model"));
    assert!(stderr(&o).contains("noise"));
    let o = run();
    assert!(o.status.success());
    assert!(!stderr(&o).contains("generating"));
    assert!(stderr(&o).contains("noise"));
}

#[test]
fn hub_repository_ids_resolve_through_the_cache_and_fail_cleanly_offline() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3", "hf-f32");
    // Lay the model out as hf-hub's cache does: models--owner--name/{refs/main, snapshots/REV/*}.
    let home = t.path().join("hf");
    let repo = home.join("hub").join("models--acme--tiny-qwen3");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    copy_files(&m, &snap);
    let run = |id: &str| {
        std::process::Command::new(bin())
            .args(["score", "--model", id, "--tokens", "1 2 3"])
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let o = run("acme/tiny-qwen3");
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, local) = score(&m, "1 2 3");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["logprobs"][1].as_f64().unwrap(), local[1]);
    let o = run("acme/not-downloaded");
    assert_clean_error(
        &o,
        &["acme/not-downloaded", "config.json", "HF_HUB_OFFLINE"],
    );
    // Online but unreachable: a clean error naming the repository.
    let o = std::process::Command::new(bin())
        .args(["score", "--model", "acme/unreachable", "--tokens", "1"])
        .env("HF_HOME", &home)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_clean_error(&o, &["acme/unreachable"]);
}

#[test]
fn perplexity_follows_llama_perplexity_from_score() {
    // PPL = exp(mean NLL over the second half of each ctx-token chunk), each chunk scored from an
    // empty cache; recomputed here from `score` on the same chunks.
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "hf-f32");
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(3);
    let f = t.path().join("text.txt");
    std::fs::write(&f, &text).unwrap();
    let ctx = 32;
    let o = moestream(&[
        "perplexity",
        "--model",
        m.to_str().unwrap(),
        "--file",
        f.to_str().unwrap(),
        "--ctx",
        &ctx.to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let ppl: f64 = out
        .split("PPL = ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The synthetic tokenizer is byte-level: one token per byte, no BOS for qwen3.
    let bytes = text.as_bytes();
    let (mut nll, mut n) = (0.0, 0);
    for c in 0..bytes.len() / ctx {
        let ids: Vec<String> = bytes[c * ctx..(c + 1) * ctx]
            .iter()
            .map(|b| b.to_string())
            .collect();
        let (_, lp) = score(&m, &ids.join(" "));
        for x in &lp[ctx / 2 - 1..] {
            nll -= x;
            n += 1;
        }
    }
    let want = (nll / n as f64).exp();
    assert!((ppl - want).abs() / want < 1e-3, "{ppl} vs {want}");
    let o = moestream(&[
        "perplexity",
        "--model",
        m.to_str().unwrap(),
        "--file",
        f.to_str().unwrap(),
        "--ctx",
        "4096",
    ]);
    assert_clean_error(&o, &["at least 4096"]);
}

fn to_half(bytes: &[u8], bf16: bool) -> Vec<u8> {
    bytes
        .chunks(4)
        .flat_map(|c| {
            let x = f32::from_le_bytes(c.try_into().unwrap());
            if bf16 {
                half::bf16::from_f32(x).to_bits().to_le_bytes()
            } else {
                half::f16::from_f32(x).to_bits().to_le_bytes()
            }
        })
        .collect()
}

#[test]
fn f16_and_bf16_checkpoints_agree_with_f32() {
    let t = tempfile::tempdir().unwrap();
    let ids = "3 14 15 92 65 35 89 79 32 38 46 26 43 38 32 79 50 28";
    for arch in ["qwen3_moe", "mixtral"] {
        let m = synth(t.path(), arch, "hf-f32");
        let (_, want) = score(&m, ids);
        for (bf16, dtype, tol) in [
            (false, safetensors::Dtype::F16, 2e-2),
            (true, safetensors::Dtype::BF16, 1e-1),
        ] {
            let copy = t.path().join(format!("{arch}-{dtype:?}"));
            std::fs::create_dir_all(&copy).unwrap();
            copy_files(&m, &copy);
            rewrite_safetensors(&copy.join("model.safetensors"), |_, _, s, b| {
                Some((dtype, s, to_half(&b, bf16)))
            });
            let (_, got) = score(&copy, ids);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < tol, "{arch} {dtype:?}: {worst}");
            assert!(worst > 0.0, "{arch} {dtype:?}: suspiciously exact");
        }
    }
}

#[test]
fn fused_transformers5_expert_layout_equals_per_expert_layout() {
    // Stack the per-expert tensors into `experts.gate_up_proj [E, 2I, H]` and
    // `experts.down_proj [E, H, I]` (no `.weight`), as transformers 5 saves with
    // save_original_format=False; the model must compute the same numbers.
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "hf-f32");
    let fused = t.path().join("fused");
    std::fs::create_dir_all(&fused).unwrap();
    copy_files(&m, &fused);
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    let (e, i, h) = (8, 128, 128);
    for (name, view) in st.tensors() {
        if !name.contains(".experts.") {
            out.push((name, view.shape().to_vec(), view.data().to_vec()));
        }
    }
    for l in 0..4 {
        let get = |x: usize, p: &str| {
            st.tensor(&format!("model.layers.{l}.mlp.experts.{x}.{p}.weight"))
                .unwrap()
                .data()
                .to_vec()
        };
        let mut gu = vec![];
        let mut down = vec![];
        for x in 0..e {
            gu.extend(get(x, "gate_proj"));
            gu.extend(get(x, "up_proj"));
            down.extend(get(x, "down_proj"));
        }
        out.push((
            format!("model.layers.{l}.mlp.experts.gate_up_proj"),
            vec![e, 2 * i, h],
            gu,
        ));
        out.push((
            format!("model.layers.{l}.mlp.experts.down_proj"),
            vec![e, h, i],
            down,
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &fused.join("model.safetensors")).unwrap();
    let ids = "1 5 9 13 17 21 25 29 33";
    assert_eq!(score(&m, ids).1, score(&fused, ids).1);
}

#[test]
fn interactive_chat_reads_turns_from_stdin() {
    use std::io::Write;
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "mlx8");
    let mut child = std::process::Command::new(bin())
        .args([
            "run",
            "--model",
            m.to_str().unwrap(),
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("hello\nand again\n\n".as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // One statistics line per turn; the second turn reuses the cached conversation prefix, so
    // its prompt is only the new turn.
    let err = stderr(&o);
    let prompts: Vec<usize> = err
        .lines()
        .filter_map(|l| l.strip_prefix("[prompt "))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(prompts.len(), 2, "{err}");
    let full_second_turn = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n".len();
    assert!(prompts[1] < full_second_turn + 20, "{prompts:?}");
}
