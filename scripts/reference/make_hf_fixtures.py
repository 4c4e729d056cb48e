#!/usr/bin/env python3
"""Make the Hugging Face transformers reference fixtures (random tiny models, float32, CPU).

Writes OUT/<name>/{config.json, model.safetensors, generation_config.json, reference.json} for
  qwen3_moe_a  qwen3_moe, 8 experts top-2, norm_topk_prob, mlp_only_layers=[1], untied, per-expert layout
  qwen3_moe_b  qwen3_moe, 16 experts top-4, no norm_topk_prob, decoder_sparse_step=2, tied, fused TF-5 layout
  qwen3_dense  qwen3, tied
  mixtral      mixtral, 8 experts top-2, per-expert layout (block_sparse_moe.experts.N.w1/w2/w3)

reference.json: tokens (80), logprobs[i] = ln p(tokens[i+1] | tokens[..=i]), greedy {prompt (10), generated (16,
argmax, KV cache, no EOS stop)}, router_margin_min = min over MoE layers/positions of both runs of p_(k) - p_(k+1).
Tokens are chosen position by position (random candidates, first whose router margins all exceed 1e-3 is kept),
so top-k routing is unambiguous; weights are random with larger-than-default scales so log-probs spread out.

Needs torch + transformers 5.x (runs on CPU).  python3 make_hf_fixtures.py --out DIR [--seed 1234] [--only a,b]
"""

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open

THR = 1e-3          # router probability margin required at every position
GREEDY_THR = 1e-3   # required gap between the best and second-best log-prob at every greedy step
N_TOKENS, N_PROMPT, N_GEN = 80, 10, 16
GREEDY_TRIES = 40   # greedy prompts tried (first with clear margins and MIN_DISTINCT kept, else the best)
MIN_DISTINCT = 7    # wanted number of distinct tokens among the 16 generated
VOCAB = 512

COMMON = dict(vocab_size=VOCAB, hidden_size=128, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
              pad_token_id=None, attention_bias=False, hidden_act="silu")

FIXTURES = {
    "qwen3_moe_a": dict(
        arch="qwen3_moe", fused=False,
        cfg=dict(COMMON, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False,
                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                 use_sliding_window=False)),
    "qwen3_moe_b": dict(
        arch="qwen3_moe", fused=True,
        cfg=dict(COMMON, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=128, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
                 norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[], tie_word_embeddings=True,
                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 use_sliding_window=False)),
    "qwen3_dense": dict(
        arch="qwen3", fused=False,
        cfg=dict(COMMON, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                 intermediate_size=256, tie_word_embeddings=True, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_sliding_window=False)),
    "mixtral": dict(
        arch="mixtral", fused=False,
        # head_dim = hidden/heads: mlx-lm's mixtral ignores an explicit head_dim.
        cfg=dict(COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
                 rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                 sliding_window=None)),
}


def classes(arch):
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    if arch == "qwen3":
        return transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    if arch == "mixtral":
        return transformers.MixtralConfig, transformers.MixtralForCausalLM
    raise ValueError(arch)


def is_router(name):
    return name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight")


def init_params(model, seed, tied):
    """norms 1+0.2N, router 0.2N, lm_head (or the tied embedding) 0.2*sqrt(128/H)N, everything else 0.1N
    (transformers' default init is 0.02N with norms 1, which gives near-uniform routing and log-probs)."""
    g = torch.Generator().manual_seed(seed)
    lm_std = 0.2 * math.sqrt(128 / model.config.hidden_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("norm.weight"):
                v = 1.0 + 0.2 * r
            elif is_router(name):
                v = 0.2 * r
            elif name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
                v = lm_std * r
            else:
                v = 0.1 * r
            p.copy_(v.to(p.dtype))


class RouterTap:
    """Forward hooks on every *TopKRouter: records router logits [N, E]."""

    def __init__(self, model):
        self.logits, self.top_k = [], 0
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("TopKRouter"):
                self.top_k = mod.top_k
                mod.register_forward_hook(self._hook)

    def _hook(self, mod, inp, out):
        self.logits.append(out[0].detach().to(torch.float32))

    def margins(self, B, T):
        """min over layers of p_(k)-p_(k+1), shape [B, T] (inf for dense models)."""
        m = np.full((B, T), np.inf)
        for lg in self.logits:
            p = torch.softmax(lg, dim=-1).double().numpy().reshape(B, T, -1)
            ps = -np.sort(-p, axis=-1)
            m = np.minimum(m, ps[..., self.top_k - 1] - ps[..., self.top_k])
        self.logits.clear()
        return m


def forward(model, tap, batch):
    tap.logits.clear()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch, dtype=torch.long), use_cache=False)
    lg = out.logits.to(torch.float64)
    B, T = len(batch), len(batch[0])
    return lg, tap.margins(B, T)


def build_tokens(model, tap, n, rng, batch=8, max_tries=64):
    toks = []
    while len(toks) < n:
        for _ in range(max_tries):
            cands = rng.integers(0, VOCAB, size=batch)
            _, m = forward(model, tap, [toks + [int(c)] for c in cands])
            ok = np.nonzero(m[:, -1] > THR)[0]
            if len(ok):
                toks.append(int(cands[ok[0]]))
                break
        else:
            raise RuntimeError(f"no token with router margin > {THR} at position {len(toks)}")
    return toks


def score(model, tap, tokens):
    lg, m = forward(model, tap, [tokens])
    lsm = torch.log_softmax(lg[0], dim=-1)
    return [float(lsm[i, tokens[i + 1]]) for i in range(len(tokens) - 1)], float(m.min())


def greedy(model, tap, prompt, n):
    """Argmax decoding with the KV cache (prefill, then one token per step), no EOS stop."""
    tap.logits.clear()
    gen, gaps, margins = [], [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], dtype=torch.long), use_cache=True)
        margins.append(tap.margins(1, len(prompt)).min())
        for _ in range(n):
            lg = out.logits[0, -1].to(torch.float64)
            top2 = torch.topk(lg, 2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(lg))
            gen.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=out.past_key_values,
                        use_cache=True)
            margins.append(tap.margins(1, 1).min())
    return gen, float(min(margins)), min(gaps)


def build_model(spec, seed):
    cfg_cls, model_cls = classes(spec["arch"])
    cfg = dict(spec["cfg"])
    config = cfg_cls(**cfg, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    init_params(model, seed, cfg["tie_word_embeddings"])
    model.eval()
    return model


def patch_config(path, arch):
    """Add Hub-style keys mlx-lm needs (top-level rope_theta, num_experts); TF 5 writes rope_parameters."""
    cfg = json.load(open(path))
    added = []
    rp = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
        added.append("rope_theta")
    if arch == "qwen3_moe" and "num_experts" not in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]
        added.append("num_experts")
    if arch == "mixtral" and "num_local_experts" not in cfg:
        cfg["num_local_experts"] = cfg["num_experts"]
        added.append("num_local_experts")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return added


def make_one(name, spec, out_root, seed):
    t0 = time.time()
    tied = spec["cfg"]["tie_word_embeddings"]
    for attempt in range(10):
        s = seed + 1000 * attempt
        model = build_model(spec, s)
        tap = RouterTap(model)
        is_moe = tap.top_k > 0
        rng = np.random.default_rng(s)
        try:
            tokens = build_tokens(model, tap, N_TOKENS, rng) if is_moe else \
                [int(t) for t in rng.integers(0, VOCAB, size=N_TOKENS)]
            lp, m_score = score(model, tap, tokens)
            if is_moe and not m_score > THR:
                raise RuntimeError(f"score router margin {m_score}")
            best = None   # prefer greedy runs that do not collapse into repeating one token
            for _ in range(GREEDY_TRIES):
                prompt = build_tokens(model, tap, N_PROMPT, rng) if is_moe else \
                    [int(t) for t in rng.integers(0, VOCAB, size=N_PROMPT)]
                gen, m_gen, g_gap = greedy(model, tap, prompt, N_GEN)
                if (not is_moe or m_gen > THR) and g_gap > GREEDY_THR:
                    if best is None or len(set(gen)) > len(set(best[1])):
                        best = (prompt, gen, m_gen, g_gap)
                    if len(set(gen)) >= MIN_DISTINCT:
                        break
            if best is None:
                raise RuntimeError("no greedy prompt with clear margins")
            prompt, gen, m_gen, g_gap = best
        except RuntimeError as e:
            print(f"  [{name}] seed {s}: {e}; trying another seed", flush=True)
            continue
        break
    else:
        raise RuntimeError(f"{name}: no seed gave unambiguous routing")

    rmin = min(m_score, m_gen) if is_moe else None
    if is_moe:
        assert rmin > THR, rmin
    out = Path(out_root) / name
    out.mkdir(parents=True, exist_ok=True)
    if spec["fused"]:
        model.save_pretrained(out, save_original_format=False)
    else:
        model.save_pretrained(out)
    added = patch_config(out / "config.json", spec["arch"])
    with open(out / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False,
                   "transformers_version": transformers.__version__}, f, indent=2)
        f.write("\n")

    # Round trip: the saved files, loaded back by transformers, must give the same numbers.
    cfg_cls, model_cls = classes(spec["arch"])
    re_model = model_cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                         experts_implementation="eager").eval()
    re_tap = RouterTap(re_model)
    lp2, _ = score(re_model, re_tap, tokens)
    gen2, _, _ = greedy(re_model, re_tap, prompt, N_GEN)
    roundtrip = float(np.max(np.abs(np.array(lp2) - np.array(lp))))
    assert roundtrip < 1e-6 and gen2 == gen, (roundtrip, gen2, gen)
    # The same weights in float64: shows how far float32 rounding alone moves the log-probs.
    m64 = model_cls.from_pretrained(out, dtype=torch.float64, attn_implementation="eager",
                                    experts_implementation="eager").eval()
    tap64 = RouterTap(m64)
    lp64, _ = score(m64, tap64, tokens)
    gen64, _, _ = greedy(m64, tap64, prompt, N_GEN)
    f32_vs_f64 = float(np.max(np.abs(np.array(lp64) - np.array(lp))))

    lpa = np.array(lp)
    ref = {
        "source": f"transformers {transformers.__version__}",
        "torch": torch.__version__,
        "dtype": "float32",
        "tokens": tokens,
        "logprobs": lp,
        "greedy": {"prompt": prompt, "generated": gen},
        "router_margin_min": rmin,
        "greedy_logprob_margin_min": g_gap,
        "logprobs_float64": lp64,
        "float32_vs_float64_max_abs_diff": f32_vs_f64,
        "greedy_float64_identical": gen64 == gen,
        "logprob_stats": {"min": float(lpa.min()), "max": float(lpa.max()), "mean": float(lpa.mean()),
                          "std": float(lpa.std())},
        "seed": s,
        "layout": "hf-fused" if spec["fused"] else "hf-per-expert",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
    }
    with open(out / "reference.json", "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")

    print(f"== {name}: seed {s}, router_margin_min {rmin}, greedy margin {g_gap:.4f}, "
          f"logprobs min {lpa.min():.3f} max {lpa.max():.3f} mean {lpa.mean():.3f} std {lpa.std():.3f}, "
          f"-ln(V) = {-math.log(VOCAB):.3f}, roundtrip diff {roundtrip:.2e}, f32-vs-f64 {f32_vs_f64:.2e} (greedy same: {gen64 == gen}), config keys added {added}, "
          f"{time.time() - t0:.1f}s", flush=True)
    print(f"   greedy prompt {prompt} -> {gen}")
    for f in sorted(out.iterdir()):
        print(f"   {f.name} {f.stat().st_size} bytes")
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        print(f"   metadata {st.metadata()}")
        for k in sorted(st.keys()):
            t = st.get_slice(k)
            print(f"   {k} {t.get_dtype()} {t.get_shape()}")
    print("   config.json:", json.dumps(json.load(open(out / "config.json")), sort_keys=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", default=None, help="comma list of fixture names")
    args = ap.parse_args()
    torch.set_num_threads(min(8, torch.get_num_threads()))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"python {sys.version.split()[0]}", flush=True)
    names = args.only.split(",") if args.only else list(FIXTURES)
    failed = []
    for i, name in enumerate(names):
        try:
            make_one(name, FIXTURES[name], args.out, args.seed + 17 * i)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(name)
    print(f"done; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
