//! Streamed experts compute exactly what memory-mapped experts do, whichever way the bytes
//! arrive; `--top-k` means what the model's own `num_experts_per_tok` means; read faults end one
//! request with an error naming the file and offset.
use crate::common::*;
use std::path::{Path, PathBuf};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture folder")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    v.sort();
    assert!(v.len() >= 17, "fixtures missing in {}", dir.display());
    v
}

fn fixture_tokens(model: &Path) -> String {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap())
            .unwrap();
    r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `score` stdout, asserting success.
fn score_raw(model: &Path, tokens: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        tokens,
    ];
    args.extend_from_slice(extra);
    let o = moestream(&args);
    assert!(
        o.status.success(),
        "score {extra:?} failed on {}: {}",
        model.display(),
        stderr(&o)
    );
    stdout(&o)
}

/// Streaming configurations checked against the memory map. The default (an expert cache of
/// what memory allows, O_DIRECT where the file system has it) holds every expert of a fixture;
/// the others make the pool evict: `--expert-cache 0` leaves only the minimum pool.
const VARIANTS: &[&[&str]] = &[
    &[],
    &["--io-backend", "io_uring", "--expert-cache", "0"],
    &["--io-backend", "threads", "--expert-cache", "0"],
    &["--direct-io", "--expert-cache", "0"],
    &["--direct-io=off", "--expert-cache", "1G"],
    &["--stream-reads", "map"],
    &[
        "--expert-cache",
        "64K",
        "--prefetch",
        "previous",
        "--expert-eviction",
        "lru",
    ],
    &["--expert-cache", "1G", "--queue-depth", "1"],
    // The router prefetch with an expert cache (the default, auto, turns it off there).
    &["--expert-cache", "64K", "--prefetch", "router"],
    &[
        "--prefetch",
        "none",
        "--queue-depth",
        "3",
        "--io-backend",
        "threads",
    ],
];

#[test]
fn streamed_scores_equal_mapped_scores_bit_for_bit() {
    for model in fixtures() {
        let tokens = fixture_tokens(&model);
        let mapped = score_raw(&model, &tokens, &["--stream-experts", "off"]);
        for v in VARIANTS {
            let mut args = vec!["--stream-experts", "on"];
            args.extend_from_slice(v);
            let streamed = score_raw(&model, &tokens, &args);
            assert_eq!(
                mapped,
                streamed,
                "{} streamed with {v:?} differs",
                model.display()
            );
        }
    }
}

#[test]
fn streamed_greedy_generation_equals_mapped() {
    for name in ["qwen3_moe_a_mlx4", "mixtral_mlx8", "qwen3_moe_b"] {
        let model = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name);
        let mapped = greedy_ids(&model, &["--stream-experts", "off"]);
        for v in VARIANTS {
            let mut args = vec!["--stream-experts", "on"];
            args.extend_from_slice(v);
            assert_eq!(mapped, greedy_ids(&model, &args), "{name} with {v:?}");
        }
    }
}

/// The memory-cap tool of the shared folder, when this machine can use it (root, cgroups).
fn memory_limit_tool() -> Option<PathBuf> {
    let tool =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tools/with-memory-limit");
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc_getuid() } == 0;
    (tool.is_file() && root).then_some(tool)
}

extern "C" {
    #[link_name = "getuid"]
    fn libc_getuid() -> u32;
}

#[test]
fn streamed_scores_are_exact_under_a_memory_cap() {
    let Some(tool) = memory_limit_tool() else {
        eprintln!("skipped: ../shared/tools/with-memory-limit needs root and the shared folder");
        return;
    };
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3_moe_a_mlx4");
    let tokens = fixture_tokens(&model);
    let mapped = score_raw(&model, &tokens, &["--stream-experts", "off"]);
    for extra in [&[][..], &["--direct-io"][..], &["--expert-cache", "0"][..]] {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(&tool)
            .args(["64M", "--drop-caches", "--"])
            .arg(bin());
        cmd.args([
            "score",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            &tokens,
        ]);
        cmd.args(["--stream-experts", "on"]).args(extra);
        let o = cmd.output().unwrap();
        let err = stderr(&o);
        if err.contains("no memory cgroup") || err.contains("Permission denied") {
            eprintln!("skipped: no usable memory cgroup here: {err}");
            return;
        }
        assert!(o.status.success(), "capped run failed: {err}");
        assert_eq!(mapped, stdout(&o), "capped {extra:?}");
    }
}

fn copy_model(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn top_k_override_equals_the_model_configured_with_that_k() {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3_moe_b_mlx8");
    let tokens = fixture_tokens(&src);
    let tmp = tempfile::tempdir().unwrap();
    let k1 = tmp.path().join("k1");
    copy_model(&src, &k1);
    let cfg_path = k1.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let own = cfg["num_experts_per_tok"].as_u64().unwrap();
    assert!(own >= 2);
    cfg["num_experts_per_tok"] = 1.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let configured = score_raw(&k1, &tokens, &[]);
    for stream in ["off", "on"] {
        let overridden = score_raw(&src, &tokens, &["--top-k", "1", "--stream-experts", stream]);
        assert_eq!(configured, overridden, "--top-k 1, streaming {stream}");
    }
    let full = score_raw(&src, &tokens, &[]);
    assert_ne!(full, configured, "top-k 1 must change the scores");
    let own_s = own.to_string();
    assert_eq!(full, score_raw(&src, &tokens, &["--top-k", &own_s]));
    // The environment variable does the same.
    let o = std::process::Command::new(bin())
        .args([
            "score",
            "--model",
            src.to_str().unwrap(),
            "--tokens",
            &tokens,
        ])
        .env("MOESTREAM_TOP_K", "1")
        .output()
        .unwrap();
    assert_eq!(configured, stdout(&o));
    // Out of range.
    for bad in ["0", &(own + 1).to_string()] {
        let o = moestream(&[
            "score",
            "--model",
            src.to_str().unwrap(),
            "--tokens",
            "1 2",
            "--top-k",
            bad,
        ]);
        assert_clean_error(&o, &["top-k", "out of range"]);
    }
    let dense =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3_dense");
    let o = moestream(&[
        "score",
        "--model",
        dense.to_str().unwrap(),
        "--tokens",
        "1 2",
        "--top-k",
        "1",
    ]);
    assert_clean_error(&o, &["dense"]);
}

#[test]
fn a_failed_read_is_a_clear_error_naming_file_and_offset() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3_moe_a_mlx4");
    for backend in ["io_uring", "threads"] {
        let o = std::process::Command::new(bin())
            .args([
                "score",
                "--model",
                model.to_str().unwrap(),
                "--tokens",
                "1 2 3 4 5",
            ])
            .args(["--stream-experts", "on", "--io-backend", backend])
            .env("MOESTREAM_FAIL_READ", "7")
            .output()
            .unwrap();
        assert_clean_error(&o, &["model.safetensors", "at offset", "injected fault"]);
    }
}

#[test]
fn streaming_options_are_checked() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3_moe_a_mlx4");
    let m = model.to_str().unwrap();
    let o = moestream(&[
        "score",
        "--model",
        m,
        "--tokens",
        "1 2",
        "--stream-experts",
        "sometimes",
    ]);
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    let o = moestream(&[
        "score",
        "--model",
        m,
        "--tokens",
        "1 2",
        "--stream-experts",
        "on",
        "--stream-reads",
        "map",
        "--io-backend",
        "io_uring",
    ]);
    assert_clean_error(&o, &["io_uring cannot populate"]);
    let o = moestream(&[
        "score",
        "--model",
        m,
        "--tokens",
        "1 2",
        "--expert-cache",
        "lots",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = moestream(&[
        "score",
        "--model",
        m,
        "--tokens",
        "1 2",
        "--queue-depth",
        "0",
    ]);
    assert_clean_error(&o, &["--queue-depth"]);
}
