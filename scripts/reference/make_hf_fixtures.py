#!/usr/bin/env python3
"""Make the Hugging Face transformers reference fixtures (random tiny models, float32, CPU).

Writes OUT/<name>/{config.json, model.safetensors, generation_config.json, reference.json} for
  qwen3_moe_a  qwen3_moe, 8 experts top-2, norm_topk_prob, mlp_only_layers=[1], untied, per-expert layout
  qwen3_moe_b  qwen3_moe, 16 experts top-4, no norm_topk_prob, decoder_sparse_step=2, tied, fused TF-5 layout
  qwen3_dense  qwen3, tied
  mixtral      mixtral, 8 experts top-2, per-expert layout (block_sparse_moe.experts.N.w1/w2/w3)
  qwen3_5_moe_a  qwen3_5_moe (Gated DeltaNet + gated attention, 8 layers), VLM class/layout (model.language_model.*,
                 tiny model.visual.* tower), fused experts, shared expert, + random mtp.* tensors added after saving
  qwen3_5_dense  qwen3_5 text-only CausalLM (model_type qwen3_5_text, model.* prefix), dense MLP, tied
  qwen3_next_a   qwen3_next, fused in_proj_qkvz/in_proj_ba, MoE + shared expert on layers 1, 3, 7, dense MLP elsewhere,
                 per-expert layout (the only one mlx-lm's qwen3_next sanitize converts correctly), no norm_topk_prob

reference.json: tokens (80), logprobs[i] = ln p(tokens[i+1] | tokens[..=i]), greedy {prompt (10), generated (16,
argmax, KV cache, no EOS stop)}, router_margin_min = min over MoE layers/positions of both runs of p_(k) - p_(k+1).
Tokens are chosen position by position (random candidates, first whose router margins all exceed 1e-3 is kept),
so top-k routing is unambiguous; weights are random with larger-than-default scales so log-probs spread out.
Hybrid fixtures (the qwen3_5* / qwen3_next ones; H 64, vocab 256, small, weights 0.07N, rms eps 1e-5) use 100 tokens
(more than the 64-token chunk of the chunked gated delta rule), a 70-token greedy prompt, and add
greedy.decode_logprobs: ln p(generated[j] | prompt + generated[:j]) from the step that produced generated[j] (the
prompt prefill for j = 0, then single-token steps with the cache: TF's recurrent delta rule and conv-state update).

Needs torch + transformers 5.x (runs on CPU).  python3 make_hf_fixtures.py --out DIR [--seed 1234] [--only a,b]
"""

import argparse
import copy
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

# Hybrid models (Gated DeltaNet): sequences longer than the 64-token chunk of TF's chunked delta rule.
HYB_N_TOKENS, HYB_N_PROMPT, HYB_N_GEN = 100, 70, 16
HYB_GREEDY_TRIES = 24
A_MIN, A_MAX = 0.02, 16.0   # A = exp(A_log) log-uniform in [A_MIN, A_MAX]: per-token decay from ~0.99 to ~0

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

# Shared trunk of the hybrid fixtures: 3 linear (Gated DeltaNet) + 1 full (gated) attention layers, twice.
# Small (H 64, vocab 256) so that the fixtures and their MLX conversions stay a few MB; every matrix's input dimension
# is a multiple of 64 so that mlx-lm quantizes all of them at group size 64.
# head_dim 32 != H/heads (16); value heads = 2 x key heads (grouped GQA-like mapping); dk 16 != dv 32.
LAYER_TYPES_8 = (["linear_attention"] * 3 + ["full_attention"]) * 2
HYB_VOCAB = 256
HYB_TRUNK = dict(vocab_size=HYB_VOCAB, hidden_size=64, num_hidden_layers=8, layer_types=LAYER_TYPES_8,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=32,
                 linear_conv_kernel_dim=4, rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1,
                 eos_token_id=2, pad_token_id=None, attention_bias=False, hidden_act="silu")
# Weight scale of the hybrid fixtures (projections, experts): 0.1N (at H 128) made the gated RMSNorm inside the DeltaNet
# amplify float32 rounding to ~4e-4 in the log-probs; 0.07N here (the activation scale of 0.05N at H 128) keeps
# float32 vs float64 within ~3e-5.
HYB_W_STD = 0.07


def hyb_rope(theta, mrope):
    rp = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.25}   # rot = 32 * 0.25 = 8 dims
    if mrope:   # Qwen3.5 carries an (interleaved) mRoPE section; for text all three position streams are equal
        rp.update(mrope_section=[2, 1, 1], mrope_interleaved=True)
    return rp


FIXTURES.update({
    "qwen3_5_moe_a": dict(
        arch="qwen3_5_moe_vlm", fused=True, hybrid=True, mtp=True, vocab=HYB_VOCAB,
        layout="hf-vlm-fused: model.language_model.* + model.visual.* (tiny vision tower) + lm_head, fused experts "
               "(save_original_format=False), mtp.* added after saving",
        cfg=dict(tie_word_embeddings=False,
                 text_config=dict(HYB_TRUNK, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                  shared_expert_intermediate_size=64, tie_word_embeddings=False,
                                  mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False,
                                  rope_parameters=hyb_rope(10000000.0, True)),
                 vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3,
                                    patch_size=2, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                                    num_position_embeddings=16))),
    "qwen3_5_dense": dict(
        arch="qwen3_5_text", fused=False, hybrid=True, vocab=HYB_VOCAB,
        layout="hf-causallm: model.* prefix (Qwen3_5ForCausalLM, model_type qwen3_5_text), tied",
        cfg=dict(HYB_TRUNK, intermediate_size=64, tie_word_embeddings=True, rope_parameters=hyb_rope(1000000.0, True))),
    "qwen3_next_a": dict(
        arch="qwen3_next", fused=False, hybrid=True, vocab=HYB_VOCAB,
        layout="hf-per-expert (default save_pretrained)",
        # MoE where (i+1) % 2 == 0 and i not in mlp_only_layers: layers 1, 3, 7; dense MLP (F 64) on 0, 2, 4, 5, 6
        cfg=dict(HYB_TRUNK, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                 shared_expert_intermediate_size=64, intermediate_size=64, norm_topk_prob=False,
                 decoder_sparse_step=2, mlp_only_layers=[5], tie_word_embeddings=False,
                 rope_parameters=hyb_rope(5000000.0, False))),
})


def classes(arch):
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    if arch == "qwen3":
        return transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    if arch == "mixtral":
        return transformers.MixtralConfig, transformers.MixtralForCausalLM
    if arch == "qwen3_5_moe_vlm":
        return transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration
    if arch == "qwen3_5_text":
        return transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM
    if arch == "qwen3_next":
        return transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM
    raise ValueError(arch)


def is_router(name):
    return name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight")


def init_params(model, seed, tied, hybrid=False, w_std=0.1):
    """norms 1+0.2N, router 0.2N, lm_head (or the tied embedding) 0.2*sqrt(128/H)N, everything else 0.1N
    (transformers' default init is 0.02N with norms 1, which gives near-uniform routing and log-probs).
    Hybrid models: everything else w_std*N (HYB_W_STD), the zero-centred norms (stored w, computed 1+w) 0.2N, the gated
    linear_attn.norm (plain w) 1+0.2N, A_log = log(A) with A log-uniform in [A_MIN, A_MAX], dt_bias 0.1N, conv1d 0.3N;
    the vision tower keeps its init."""
    g = torch.Generator().manual_seed(seed)
    lm_std = 0.2 * math.sqrt(128 / model.config.get_text_config().hidden_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if hybrid and name.startswith("model.visual."):
                continue
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if hybrid and name.endswith("linear_attn.norm.weight"):
                v = 1.0 + 0.2 * r
            elif hybrid and name.endswith("norm.weight"):
                v = 0.2 * r
            elif name.endswith("norm.weight"):
                v = 1.0 + 0.2 * r
            elif hybrid and name.endswith("A_log"):
                u = torch.rand(p.shape, generator=g, dtype=torch.float64)
                v = math.log(A_MIN) + u * (math.log(A_MAX) - math.log(A_MIN))
            elif hybrid and name.endswith("dt_bias"):
                v = 0.1 * r
            elif hybrid and name.endswith("conv1d.weight"):
                v = 0.3 * r
            elif is_router(name):
                v = 0.2 * r
            elif name == "lm_head.weight" or (tied and name.endswith("embed_tokens.weight")):
                v = lm_std * r
            else:
                v = w_std * r
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


def build_tokens(model, tap, n, rng, vocab=VOCAB, batch=8, max_tries=64):
    toks = []
    while len(toks) < n:
        for _ in range(max_tries):
            cands = rng.integers(0, vocab, size=batch)
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
    """Argmax decoding with the KV cache (prefill, then one token per step), no EOS stop. Returns (generated, min
    router margin, min best-vs-second logit gap, [ln p(generated[j] | prompt + generated[:j]) at the step that chose
    it])."""
    tap.logits.clear()
    gen, gaps, margins, lps = [], [], [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], dtype=torch.long), use_cache=True)
        margins.append(tap.margins(1, len(prompt)).min())
        for _ in range(n):
            lg = out.logits[0, -1].to(torch.float64)
            top2 = torch.topk(lg, 2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(lg))
            gen.append(nxt)
            lps.append(float(torch.log_softmax(lg, dim=-1)[nxt]))
            out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=out.past_key_values,
                        use_cache=True)
            margins.append(tap.margins(1, 1).min())
    return gen, float(min(margins)), min(gaps), lps


def build_tokens_fast(model, tap, n, rng, vocab=VOCAB, batch=8, max_tries=64):
    """Same acceptance rule as build_tokens (each position's router margins, given its prefix, exceed THR) with far
    fewer forward passes, for the long hybrid sequences: draw all n tokens, run the whole sequence, and replace the
    first failing position by the first acceptable of batches of random candidates; repeat until none fails."""
    toks = [int(t) for t in rng.integers(0, vocab, size=n)]
    for _ in range(8 * n):
        _, m = forward(model, tap, [toks])
        bad = np.nonzero(~(m[0] > THR))[0]
        if not len(bad):
            return toks
        t = int(bad[0])
        for _ in range(max_tries):
            cands = rng.integers(0, vocab, size=batch)
            _, mc = forward(model, tap, [toks[:t] + [int(c)] for c in cands])
            ok = np.nonzero(mc[:, -1] > THR)[0]
            if len(ok):
                toks[t] = int(cands[ok[0]])
                break
        else:
            raise RuntimeError(f"no token with router margin > {THR} at position {t}")
    raise RuntimeError("build_tokens_fast did not converge")


def decode_logprobs(model, tap, tokens, n_prefill, describe_cache=False):
    """tokens[:n_prefill] in one cached forward (chunked delta rule), then tokens[n_prefill:-1] one at a time with the
    cache (recurrent delta rule, conv-state update). Returns ([ln p(tokens[t] | tokens[..t-1]) for t in
    n_prefill..len-1], min router margin over all those steps)."""
    tap.logits.clear()
    lps, margins = [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens[:n_prefill]], dtype=torch.long), use_cache=True)
        margins.append(tap.margins(1, n_prefill).min())
        if describe_cache:
            try:
                cache = out.past_key_values
                for li, layer in enumerate(cache.layers):
                    d = {k: tuple(v.shape) for k, v in vars(layer).items() if isinstance(v, torch.Tensor)}
                    for k in ("conv_states", "recurrent_states"):
                        st = getattr(layer, k, None)
                        if isinstance(st, dict):
                            d[k] = {i: (tuple(x.shape) if isinstance(x, torch.Tensor) else x) for i, x in st.items()}
                    print(f"   cache layer {li} {type(layer).__name__}: {d}")
            except Exception as e:  # noqa: BLE001
                print(f"   (cache layout not printed: {e!r})")
        for t in range(n_prefill, len(tokens)):
            lsm = torch.log_softmax(out.logits[0, -1].to(torch.float64), dim=-1)
            lps.append(float(lsm[tokens[t]]))
            if t == len(tokens) - 1:
                break
            out = model(input_ids=torch.tensor([[tokens[t]]], dtype=torch.long), past_key_values=out.past_key_values,
                        use_cache=True)
            margins.append(tap.margins(1, 1).min())
    return lps, float(min(margins))


def add_mtp_tensors(path, text_cfg, seed):
    """Append random mtp.* tensors (MODELS.md 5.5: one full-attention MoE decoder layer, per-expert MTP experts as in
    the official Qwen3.5 checkpoints) to a saved model.safetensors; transformers drops them on load."""
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), framework="pt") as st:
        meta = st.metadata()
    sd = load_file(str(path))
    g = torch.Generator().manual_seed(seed + 5555)
    H, nh, nkv, D = text_cfg.hidden_size, text_cfg.num_attention_heads, text_cfg.num_key_value_heads, text_cfg.head_dim
    E, I, Is = text_cfg.num_experts, text_cfg.moe_intermediate_size, text_cfg.shared_expert_intermediate_size
    spec = [("mtp.pre_fc_norm_embedding.weight", [H], 0.2), ("mtp.pre_fc_norm_hidden.weight", [H], 0.2),
            ("mtp.fc.weight", [H, 2 * H], 0.1)]
    L = "mtp.layers.0."
    spec += [(L + "input_layernorm.weight", [H], 0.2), (L + "post_attention_layernorm.weight", [H], 0.2),
             (L + "self_attn.q_proj.weight", [nh * 2 * D, H], 0.1), (L + "self_attn.k_proj.weight", [nkv * D, H], 0.1),
             (L + "self_attn.v_proj.weight", [nkv * D, H], 0.1), (L + "self_attn.o_proj.weight", [H, nh * D], 0.1),
             (L + "self_attn.q_norm.weight", [D], 0.2), (L + "self_attn.k_norm.weight", [D], 0.2),
             (L + "mlp.gate.weight", [E, H], 0.2)]
    for e in range(E):
        spec += [(L + f"mlp.experts.{e}.gate_proj.weight", [I, H], 0.1), (L + f"mlp.experts.{e}.up_proj.weight", [I, H], 0.1),
                 (L + f"mlp.experts.{e}.down_proj.weight", [H, I], 0.1)]
    spec += [(L + "mlp.shared_expert.gate_proj.weight", [Is, H], 0.1), (L + "mlp.shared_expert.up_proj.weight", [Is, H], 0.1),
             (L + "mlp.shared_expert.down_proj.weight", [H, Is], 0.1), (L + "mlp.shared_expert_gate.weight", [1, H], 0.1),
             ("mtp.norm.weight", [H], 0.2)]
    for name, shape, std in spec:
        assert name not in sd, name
        sd[name] = (std * torch.randn(shape, generator=g, dtype=torch.float64)).to(torch.float32).contiguous()
    save_file(sd, str(path), metadata=meta)
    return [[n, list(sh)] for n, sh, _ in spec]


def make_config(spec):
    """The config object; returns (config, whether the extra MTP keys were accepted by the config class)."""
    cfg_cls, _ = classes(spec["arch"])
    cfg = copy.deepcopy(spec["cfg"])
    try:
        return cfg_cls(**cfg, attn_implementation="eager", experts_implementation="eager"), bool(spec.get("mtp"))
    except TypeError as e:
        if not spec.get("mtp"):
            raise
        print(f"   config class rejected the MTP keys ({e}); building it without them", flush=True)
        for k in ("mtp_num_hidden_layers", "mtp_use_dedicated_embeddings"):
            cfg["text_config"].pop(k, None)
        return cfg_cls(**cfg, attn_implementation="eager", experts_implementation="eager"), False


def build_model(spec, seed):
    _, model_cls = classes(spec["arch"])
    config, _ = make_config(spec)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    hybrid = spec.get("hybrid", False)
    init_params(model, seed, config.get_text_config().tie_word_embeddings, hybrid,
                spec.get("w_std", HYB_W_STD if hybrid else 0.1))
    model.eval()
    return model


def patch_config(path, arch, mtp=False):
    """Add Hub-style keys mlx-lm needs (top-level rope_theta, num_experts; qwen3_next: partial_rotary_factor);
    TF 5 writes rope_parameters. mtp: make sure text_config says mtp_num_hidden_layers 1 (the mtp.* tensors exist)."""
    cfg = json.load(open(path))
    added = []
    if mtp and "mtp_num_hidden_layers" not in cfg["text_config"]:
        cfg["text_config"]["mtp_num_hidden_layers"] = 1
        added.append("text_config.mtp_num_hidden_layers")
    if arch == "qwen3_next" and "partial_rotary_factor" not in cfg:
        cfg["partial_rotary_factor"] = cfg["rope_parameters"]["partial_rotary_factor"]
        added.append("partial_rotary_factor")
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
    hybrid = spec.get("hybrid", False)
    n_tokens, n_prompt, n_gen = (HYB_N_TOKENS, HYB_N_PROMPT, HYB_N_GEN) if hybrid else (N_TOKENS, N_PROMPT, N_GEN)
    vocab = spec.get("vocab", VOCAB)
    builder = (lambda m, t, n, r: build_tokens_fast(m, t, n, r, vocab)) if hybrid else \
        (lambda m, t, n, r: build_tokens(m, t, n, r, vocab))
    greedy_tries = HYB_GREEDY_TRIES if hybrid else GREEDY_TRIES
    dec = None
    for attempt in range(10):
        s = seed + 1000 * attempt
        model = build_model(spec, s)
        tap = RouterTap(model)
        is_moe = tap.top_k > 0
        rng = np.random.default_rng(s)
        try:
            tokens = builder(model, tap, n_tokens, rng) if is_moe else \
                [int(t) for t in rng.integers(0, vocab, size=n_tokens)]
            lp, m_score = score(model, tap, tokens)
            if is_moe and not m_score > THR:
                raise RuntimeError(f"score router margin {m_score}")
            if hybrid:   # prefill n_prompt tokens, then one token at a time with the cache
                dec, m_dec = decode_logprobs(model, tap, tokens, n_prompt, describe_cache=attempt == 0)
                if is_moe and not m_dec > THR:
                    raise RuntimeError(f"decode router margin {m_dec}")
                m_score = min(m_score, m_dec)
            best = None   # prefer greedy runs that do not collapse into repeating one token
            for _ in range(greedy_tries):
                prompt = builder(model, tap, n_prompt, rng) if is_moe else \
                    [int(t) for t in rng.integers(0, vocab, size=n_prompt)]
                gen, m_gen, g_gap, g_lps = greedy(model, tap, prompt, n_gen)
                if (not is_moe or m_gen > THR) and g_gap > GREEDY_THR:
                    if best is None or len(set(gen)) > len(set(best[1])):
                        best = (prompt, gen, m_gen, g_gap, g_lps)
                    if len(set(gen)) >= MIN_DISTINCT:
                        break
            if best is None:
                raise RuntimeError("no greedy prompt with clear margins")
            prompt, gen, m_gen, g_gap, g_lps = best
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
    mtp_tensors = None
    if spec.get("mtp"):
        mtp_tensors = add_mtp_tensors(out / "model.safetensors", model.config.get_text_config(), s)
    added = patch_config(out / "config.json", spec["arch"], mtp=spec.get("mtp", False))
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
    gen2, _, _, g_lps2 = greedy(re_model, re_tap, prompt, n_gen)
    roundtrip = float(np.max(np.abs(np.array(lp2) - np.array(lp))))
    assert roundtrip < 1e-6 and gen2 == gen, (roundtrip, gen2, gen)
    # The same weights in float64: shows how far float32 rounding alone moves the log-probs.
    m64 = model_cls.from_pretrained(out, dtype=torch.float64, attn_implementation="eager",
                                    experts_implementation="eager").eval()
    tap64 = RouterTap(m64)
    lp64, _ = score(m64, tap64, tokens)
    gen64, _, _, _ = greedy(m64, tap64, prompt, n_gen)
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
        "layout": spec.get("layout") or ("hf-fused" if spec["fused"] else "hf-per-expert"),
        "attn_implementation": "eager",
        "experts_implementation": "eager",
    }
    if hybrid:
        # greedy.decode_logprobs: from the decode steps of the greedy run (prefill for the first generated token).
        ref["greedy"]["decode_logprobs"] = g_lps
        # (the reloaded model's greedy run: not bit-identical on every machine, but far inside float32 noise)
        ref["decode_checks_roundtrip"] = float(max(abs(x - y) for x, y in zip(g_lps2, g_lps)))
        assert ref["decode_checks_roundtrip"] < 2e-5, ref["decode_checks_roundtrip"]
        # The same greedy sequence teacher-forced through the float64 model (prompt prefill, then one token at a time).
        g64, _ = decode_logprobs(m64, tap64, prompt + gen, n_prompt)
        # Checks of transformers itself: decode (single-token steps after a 70-token prefill) vs full-sequence
        # (chunked) log-probs of the 100 score tokens, in float32 and float64.
        dec64, _ = decode_logprobs(m64, tap64, tokens, n_prompt)
        full = np.array(lp[n_prompt - 1:])
        ref["decode_checks"] = {
            "greedy_decode_logprobs_float64": g64,
            "greedy_decode_float32_vs_float64_max_abs_diff": float(np.max(np.abs(np.array(g64) - np.array(g_lps)))),
            "score_tokens_decode_after_prefill_vs_full_max_abs_diff": float(np.max(np.abs(np.array(dec) - full))),
            "same_float64": float(np.max(np.abs(np.array(dec64) - np.array(lp64[n_prompt - 1:])))),
            "definition": "decode: tokens[:70] in one cached forward, then one token at a time with the cache; compared "
                          "with logprobs[69:] of the full-sequence forward"}
        ref["gdn_chunk_size"] = 64
        ref["init"] = {"norms_zero_centred_1_plus_w": "0.2N", "linear_attn.norm": "1+0.2N",
                       "A_log": f"log(A), A log-uniform in [{A_MIN}, {A_MAX}]", "dt_bias": "0.1N", "conv1d": "0.3N",
                       "router": "0.2N", "lm_head_or_tied_embedding": f"{0.2 * math.sqrt(128 / 64):.4f}N",
                       "other": f"{spec.get('w_std', HYB_W_STD)}N"}
        ref["transformers_class"] = model_cls.__name__
    if mtp_tensors is not None:
        _, mtp_ok = make_config(spec)
        ref["mtp"] = {"tensors": mtp_tensors, "count": len(mtp_tensors),
                      "mtp_num_hidden_layers_accepted_by_config_class": mtp_ok,
                      "note": "random values added to model.safetensors after save_pretrained (transformers drops mtp.* on "
                              "load and never computes them): norms 0.2N (1+w), router 0.2N, others 0.1N; experts "
                              "per-expert as in the official Qwen3.5 checkpoints; no reference outputs for the MTP head"}
    with open(out / "reference.json", "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")

    print(f"== {name}: seed {s}, router_margin_min {rmin}, greedy margin {g_gap:.4f}, "
          f"logprobs min {lpa.min():.3f} max {lpa.max():.3f} mean {lpa.mean():.3f} std {lpa.std():.3f}, "
          f"-ln(V) = {-math.log(vocab):.3f}, roundtrip diff {roundtrip:.2e}, f32-vs-f64 {f32_vs_f64:.2e} (greedy same: {gen64 == gen}), config keys added {added}, "
          f"{time.time() - t0:.1f}s", flush=True)
    if hybrid:
        d = ref["decode_checks"]
        print(f"   greedy decode_logprobs f32 vs f64 {d['greedy_decode_float32_vs_float64_max_abs_diff']:.2e}; score "
              f"tokens decode vs full {d['score_tokens_decode_after_prefill_vs_full_max_abs_diff']:.2e} (float64 "
              f"{d['same_float64']:.2e}); attn impl {model.config.get_text_config()._attn_implementation}", flush=True)
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
    for name in names:
        i = list(FIXTURES).index(name)   # seed from the position in FIXTURES, so --only reproduces a full run
        try:
            make_one(name, FIXTURES[name], args.out, args.seed + 17 * i)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(name)
    print(f"done; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
