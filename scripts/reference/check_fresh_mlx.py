#!/usr/bin/env python3
"""Check the moestream binary against mlx-lm on FRESH random models (no torch, no committed models).

For each architecture (qwen3_moe, qwen3, mixtral, and the hybrid Gated DeltaNet ones qwen3_next, qwen3_5,
qwen3_5_moe) this builds a random model with mlx-lm's own model classes (seeded), saves it as an MLX float32
checkpoint with mlx-lm's save functions, makes quantized copies with mlx-lm's quantize_model (4-bit gs64, 8-bit
gs32 and, for the first three, one seed-chosen bits/group-size), computes references with mlx-lm (score: log-probs
of an 80-token prompt, 100 for the hybrids; greedy: 16 tokens after a 10-token prompt, 70 for the hybrids, KV cache,
no EOS stop) and compares with

  BIN score --model DIR --tokens "ID ID ..."          -> {"tokens": [...], "logprobs": [...]}
  BIN run --model DIR --prompt-tokens "ID ID ..." --max-tokens 16 --temperature 0 --ignore-eos --json
                                                       -> {"prompt_tokens": [...], "generated_tokens": [...]}
  hybrids also: BIN score --ubatch 1 --model DIR --tokens "PROMPT GENERATED" (one decode step per token), whose
  log-probs of the generated tokens are compared with mlx-lm's greedy.decode_logprobs (from its decode steps)

The score reference of a float32 checkpoint is mlx-lm's forward with its parameters cast to float64 (mlx computes
float64 on the CPU), because mlx-lm's own float32 forward drifts by up to ~1e-4 on some random models (seed 312599,
qwen3_5: 1.06e-4 from float64 at one position, where moestream was within 1.1e-5); quantized checkpoints, and MoE
ones (mlx's gather_mm has no float64 kernel), keep the float32 forward.

Pass: max |logprob diff| <= --tol (1e-4) (prefill and decode) and identical greedy tokens. Ends with
"N passed, M failed"; exit status 1 on any failure (2 on a setup error).

  python3 scripts/reference/check_fresh_mlx.py [--bin target/release/moestream] [--seed N] [--dry-run]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlx_ref  # noqa: E402

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.utils import _get_classes, save_config, save_model  # noqa: E402

VOCAB = 512
HYBRIDS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
HYB_VOCAB = 256
A_MIN, A_MAX = 0.02, 16.0   # A = exp(A_log) log-uniform (as make_hf_fixtures.py)


def arch_config(arch, rng):
    """Config dict (Hub / transformers-4 style: top-level rope_theta) with a few seed-chosen knobs."""
    tie = bool(rng.integers(2))
    theta = float(rng.choice([10000.0, 1000000.0]))
    common = dict(vocab_size=VOCAB, hidden_size=128, rms_norm_eps=1e-6, max_position_embeddings=4096,
                  rope_theta=theta, tie_word_embeddings=tie, hidden_act="silu", bos_token_id=1,
                  eos_token_id=2, torch_dtype="float32", attention_bias=False)
    if arch == "qwen3_moe":
        dense_by_list = bool(rng.integers(2))
        return dict(common, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                    intermediate_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                    norm_topk_prob=bool(rng.integers(2)),
                    decoder_sparse_step=1 if dense_by_list else 2,
                    mlp_only_layers=[1] if dense_by_list else [],
                    use_sliding_window=False, sliding_window=None)
    if arch == "qwen3":
        return dict(common, model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=256,
                    use_sliding_window=False, sliding_window=None)
    if arch == "mixtral":
        # mlx-lm's mixtral ignores head_dim (uses hidden/heads), so keep head_dim = 128/4 = 32.
        return dict(common, model_type="mixtral", architectures=["MixtralForCausalLM"], num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
                    num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=None)
    if arch in HYBRIDS:
        return hybrid_config(arch, rng, tie, theta)
    raise ValueError(arch)


def hybrid_config(arch, rng, tie, theta):
    """Same geometry as the committed hybrid fixtures (make_hf_fixtures.py): H 64, 8 layers (full attention every 4th),
    4 heads / 2 kv, head_dim 32, linear 2 key / 4 value heads, dk 16, dv 32, vocab 256; 4 experts top-2, I 64."""
    t = dict(vocab_size=HYB_VOCAB, hidden_size=64, num_hidden_layers=8, full_attention_interval=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=32, linear_conv_kernel_dim=4,
             rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=tie, hidden_act="silu",
             bos_token_id=1, eos_token_id=2, attention_bias=False, torch_dtype="float32")
    if arch == "qwen3_next":
        # Hub-style flat config (top-level rope_theta / partial_rotary_factor, as the real Qwen3-Next config.json)
        sparse_step = int(rng.choice([1, 2]))
        return dict(t, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], rope_theta=theta,
                    partial_rotary_factor=0.25, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                    shared_expert_intermediate_size=64, intermediate_size=64, norm_topk_prob=bool(rng.integers(2)),
                    decoder_sparse_step=sparse_step, mlp_only_layers=[int(rng.integers(8))] if sparse_step == 1 else [])
    rope = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}
    if arch == "qwen3_5":
        text = dict(t, model_type="qwen3_5_text", intermediate_size=64, rope_parameters=rope)
        return dict(model_type="qwen3_5", architectures=["Qwen3_5ForConditionalGeneration"], text_config=text,
                    tie_word_embeddings=tie)
    # qwen3_5_moe: every layer MoE; Qwen3.5 always renormalises the top-k weights (real configs say so too)
    text = dict(t, model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                shared_expert_intermediate_size=64, norm_topk_prob=True, rope_parameters=rope)
    return dict(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"], text_config=text,
                tie_word_embeddings=tie)


def text_cfg(cfg):
    return cfg.get("text_config") or cfg


def is_router(name):
    return name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight")


def init_weight(name, shape, rng, tied, hidden=128):
    """Same scales as make_hf_fixtures.py: norms 1+0.2N (MLX stores the multiplier itself, the HF 1+w already
    applied), router 0.2N, lm_head (or tied embedding) 0.2*sqrt(128/H)N, rest 0.1N; hybrids (H 64): lm_head (or tied
    embedding) 0.1*sqrt(128/H)N, rest 0.07N, A_log = log(A) with A log-uniform in [A_MIN, A_MAX], dt_bias 0.1N,
    conv1d 0.3N."""
    hybrid = hidden != 128
    if hybrid and name.endswith("A_log"):
        u = rng.random(shape)
        return mx.array((np.log(A_MIN) + u * (np.log(A_MAX) - np.log(A_MIN))).astype(np.float32))
    if hybrid and name.endswith("dt_bias"):
        return mx.array((0.1 * rng.standard_normal(shape)).astype(np.float32))
    if hybrid and name.endswith("conv1d.weight"):
        return mx.array((0.3 * rng.standard_normal(shape)).astype(np.float32))
    if name.endswith("norm.weight"):
        w = 1.0 + 0.2 * rng.standard_normal(shape)
    elif is_router(name):
        w = 0.2 * rng.standard_normal(shape)
    elif name.endswith("lm_head.weight") or (tied and name.endswith("model.embed_tokens.weight")):
        # hybrids: half the fixtures' scale, which halves the float32 noise in the log-probs (each of mlx-lm and
        # the engine reaches ~4e-5 at the fixtures' scale on some seeds, too close to the 1e-4 tolerance for CI)
        w = (0.1 if hybrid else 0.2) * np.sqrt(128 / hidden) * rng.standard_normal(shape)
    else:
        w = (0.07 if hybrid else 0.1) * rng.standard_normal(shape)
    return mx.array(w.astype(np.float32))


def make_fresh(arch, cfg, rng, out_dir):
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    params = tree_flatten(model.parameters())
    tc = text_cfg(cfg)
    new = [(k, init_weight(k, v.shape, rng, tc["tie_word_embeddings"], tc["hidden_size"])) for k, v in params]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    save_model(out_dir, model)
    save_config(dict(cfg), config_path=Path(out_dir) / "config.json")
    mlx_ref.write_json(Path(out_dir) / "generation_config.json",
                       {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False})


def parse_json_stdout(text):
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON object in stdout: {text[-300:]!r}")


def run_bin(cmd, timeout):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd[:4])} ...\n{p.stderr[-1500:]}")
    return parse_json_stdout(p.stdout)


def check_engine(bin_path, model_dir, ref, tol, timeout):
    """Returns (max_abs_diff, greedy_match, error or None)."""
    toks = " ".join(map(str, ref["tokens"]))
    try:
        s = run_bin([bin_path, "score", "--model", str(model_dir), "--tokens", toks], timeout)
        if list(s.get("tokens", ref["tokens"])) != ref["tokens"]:
            return None, None, "score: echoed tokens differ"
        lp = s["logprobs"]
        if len(lp) != len(ref["logprobs"]):
            return None, None, f"score: {len(lp)} logprobs, expected {len(ref['logprobs'])}"
        # float32 checkpoints: against mlx-lm's forward in float64 (see mlx_ref.score_f64) when it has one.
        want = ref.get("logprobs_f64") or ref["logprobs"]
        diff = float(np.max(np.abs(np.asarray(lp, dtype=np.float64) - np.asarray(want))))
        if not np.isfinite(diff):
            diff = float("inf")
    except Exception as e:  # noqa: BLE001
        return None, None, f"score: {e}"
    prompt = ref["greedy"]["prompt"]
    try:
        # f32 decode activations, as the reference: `run`'s default int16 activations move
        # log-probs by ~1e-3, more than the 1e-3 margins the prompts are chosen with (the committed
        # fixtures test the int16 path against a bound of its own).
        g = run_bin([bin_path, "run", "--model", str(model_dir), "--prompt-tokens", " ".join(map(str, prompt)),
                     "--max-tokens", str(len(ref["greedy"]["generated"])), "--temperature", "0", "--ignore-eos",
                     "--decode-activations", "f32", "--json"], timeout)
        gen = [int(t) for t in g["generated_tokens"]]
        match = gen == ref["greedy"]["generated"]
        err = None if match else f"greedy: got {gen}, expected {ref['greedy']['generated']}"
    except Exception as e:  # noqa: BLE001
        return diff, None, f"run: {e}"
    ddiff = None
    if "decode_logprobs" in ref["greedy"]:
        seq = prompt + ref["greedy"]["generated"]
        try:
            d = run_bin([bin_path, "score", "--ubatch", "1", "--model", str(model_dir), "--tokens",
                         " ".join(map(str, seq))], timeout)
            ours = np.asarray(d["logprobs"][len(prompt) - 1:], dtype=np.float64)
            ddiff = float(np.max(np.abs(ours - np.asarray(ref["greedy"]["decode_logprobs"]))))
            if not np.isfinite(ddiff):
                ddiff = float("inf")
        except Exception as e:  # noqa: BLE001
            return diff, match, f"score --ubatch 1: {e}"
        if ddiff > tol and err is None:
            err = f"decode: max abs logprob diff {ddiff:.3g} > {tol:g}"
    if diff > tol and err is None:
        err = f"max abs logprob diff {diff:.3g} > {tol:g}"
    if ddiff is not None:
        diff = (diff, ddiff)
    return diff, match, err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/moestream")
    ap.add_argument("--seed", type=int, default=None, help="default: derived from the time (printed)")
    ap.add_argument("--dry-run", action="store_true", help="build models and mlx-lm references only")
    ap.add_argument("--archs", default="qwen3_moe,qwen3,mixtral,qwen3_next,qwen3_5,qwen3_5_moe")
    ap.add_argument("--variants", default=None,
                    help="comma list like f32,q4g64,q8g32,q3g128 (default: f32,q4g64,q8g32 + one seed-chosen; "
                         "hybrids f32,q4g64,q8g32)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per engine call")
    ap.add_argument("--workdir", default=None, help="keep models and references here (default: temp, removed)")
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    print(f"check_fresh_mlx: seed {seed}; {mlx_ref.versions()}", flush=True)
    rng = np.random.default_rng(seed)
    if args.variants:
        variants = args.variants.split(",")
    else:
        extra_bits = int(rng.choice([2, 3, 5, 6]))
        extra_gs = int(rng.choice([32, 64, 128]))
        variants = ["f32", "q4g64", "q8g32", f"q{extra_bits}g{extra_gs}"]

    bin_path = args.bin
    if not args.dry_run:
        bp = Path(bin_path)
        if not bp.is_file() or not os.access(bp, os.X_OK):
            print(f"error: engine binary {bin_path!r} not found or not executable (build it, or use --dry-run)")
            print("0 passed, 1 failed")
            return 2
        bin_path = str(bp.resolve())

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moestream_fresh_"))
    work.mkdir(parents=True, exist_ok=True)
    rows, passed, failed = [], 0, 0
    t0 = time.time()
    try:
        for arch in args.archs.split(","):
            cfg = arch_config(arch, rng)
            tc = text_cfg(cfg)
            knobs = {k: tc[k] for k in ("tie_word_embeddings", "rope_theta", "norm_topk_prob",
                                        "decoder_sparse_step", "mlp_only_layers") if k in tc}
            if "rope_parameters" in tc:
                knobs["rope_theta"] = tc["rope_parameters"]["rope_theta"]
            arch_variants = variants if (args.variants or arch not in HYBRIDS) else variants[:3]
            print(f"[{arch}] {knobs}", flush=True)
            f32_dir = work / f"{arch}_f32"
            try:
                make_fresh(arch, cfg, rng, f32_dir)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                for v in arch_variants:
                    rows.append((f"{arch}_{v}", None, None, "model build failed"))
                    failed += 1
                continue
            for v in arch_variants:
                name = f"{arch}_{v}"
                mdir = work / name
                try:
                    if v != "f32":
                        bits, gs = (int(x) for x in v[1:].split("g"))
                        mlx_ref.convert(f32_dir, mdir, bits=bits, group_size=gs)
                    model, _, top_k = mlx_ref.load(mdir)
                    ref = mlx_ref.make_reference(model, top_k, tc["vocab_size"], seed=int(rng.integers(1 << 31)),
                                                 extra={"variant": v},
                                                 # hybrids: the first clear greedy prompt (their forward passes
                                                 # are slow in mlx-lm on CPU: a Python loop over time steps)
                                                 **(dict(greedy_tries=40, min_distinct=1) if arch in HYBRIDS
                                                    else dict(greedy_tries=25)))
                    mlx_ref.write_json(mdir / "reference.json", ref)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append((name, None, None, f"mlx-lm reference failed: {e}"))
                    failed += 1
                    continue
                rm = ref["router_margin_min"]
                info = (f"router margin {rm:.2e}" if rm is not None else "dense") + \
                       f", logprobs [{ref['logprob_stats']['min']:.2f}, {ref['logprob_stats']['max']:.2f}]"
                if args.dry_run:
                    rows.append((name, None, None, f"dry-run ({info})"))
                    continue
                diff, match, err = check_engine(bin_path, mdir, ref, args.tol, args.timeout)
                rows.append((name, diff, match, err or info))
                if err is None:
                    passed += 1
                else:
                    failed += 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'model':<22} {'max abs diff':>13} {'decode':>10} {'greedy':>7}  note")
    for name, diff, match, note in rows:
        dd = "-"
        if isinstance(diff, tuple):
            diff, dd = diff[0], f"{diff[1]:.3e}"
        d = "-" if diff is None else f"{diff:.3e}"
        m = "-" if match is None else ("yes" if match else "NO")
        print(f"{name:<22} {d:>13} {dd:>10} {m:>7}  {note}")
    print(f"(seed {seed}, {time.time() - t0:.1f}s)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
