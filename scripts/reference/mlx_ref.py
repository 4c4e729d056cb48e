"""Shared mlx-lm helpers for the reference scripts (make_mlx_fixtures.py, check_fresh_mlx.py).

Everything here uses mlx-lm's own code paths: `mlx_lm.utils.load_model` to read a checkpoint,
`mlx_lm.utils.quantize_model` (with the model's own `quant_predicate`) to quantize,
`mlx_lm.utils.save_model` / `save_config` to write, and `mlx_lm.generate.generate_step` for greedy decoding.

Reference definitions (same as the HF fixtures):
  logprobs[i] = ln p(tokens[i+1] | tokens[..=i])             (len(tokens) - 1 values)
  greedy       = 16 argmax tokens after `prompt`, with a KV cache, no EOS stop
  hybrid models (Gated DeltaNet: qwen3_next, qwen3_5, qwen3_5_moe): 100 tokens, a 70-token greedy prompt, and
  greedy.decode_logprobs[j] = ln p(generated[j] | prompt + generated[:j]) from the generate_step that produced it
  router_margin_min = min over MoE layers, positions (score run and greedy run) of p_(k) - p_(k+1),
                      p = softmax(router logits) sorted descending, k = num_experts_per_tok
Token sequences are chosen position by position so that every router decision has a margin above a
threshold (random candidates, first acceptable one kept); this keeps top-k routing unambiguous without
forcing any particular routing.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

# Router logits captured during a forward pass, in call order: list of (layer_index, array [..., E]).
_ROUTER_SINK = []


class _GateRecorder(nn.Module):
    """Wraps a router Linear / QuantizedLinear and records its output."""

    def __init__(self, inner, layer_index):
        super().__init__()
        self.inner = inner
        self.layer_index = layer_index

    def __call__(self, x):
        y = self.inner(x)
        _ROUTER_SINK.append((self.layer_index, y))
        return y


def versions():
    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def moe_info(model):
    """Returns (list of (layer_index, moe_block), top_k) for qwen3_moe / mixtral models and the sparse MoE blocks of the
    hybrids (qwen3_next, qwen3_5_moe: `mlp.gate` router + `mlp.switch_mlp` experts, plus a shared expert whose sigmoid
    `shared_expert_gate` is no top-k decision and is not recorded), ([], 0) for dense."""
    blocks = []
    top_k = 0
    for i, layer in enumerate(model.layers):
        blk = None
        if hasattr(layer, "block_sparse_moe"):
            blk = layer.block_sparse_moe
            top_k = blk.num_experts_per_tok
        elif hasattr(layer, "mlp") and hasattr(layer.mlp, "switch_mlp"):
            blk = layer.mlp
            top_k = blk.top_k
        if blk is not None:
            blocks.append((i, blk))
    return blocks, top_k


def install_router_hooks(model):
    blocks, top_k = moe_info(model)
    for i, blk in blocks:
        if not isinstance(blk.gate, _GateRecorder):
            blk.gate = _GateRecorder(blk.gate, i)
    return top_k


def _router_margins(sink, top_k):
    """sink entries [..., E] -> list of arrays of margins with the leading shape."""
    out = []
    for _, logits in sink:
        p = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
        p = np.array(p, dtype=np.float64)
        ps = -np.sort(-p, axis=-1)
        out.append(ps[..., top_k - 1] - ps[..., top_k])
    return out


def load(path):
    model, config = load_model(Path(path))
    top_k = install_router_hooks(model)
    model._ref_top_k = top_k
    return model, config, top_k


def forward_logits(model, tokens_2d):
    """tokens_2d: list of equal-length lists. Returns (np.float64 logits [B,T,V], router margins [B,T] min over layers)."""
    _ROUTER_SINK.clear()
    x = mx.array(np.asarray(tokens_2d, dtype=np.int32))
    logits = model(x).astype(mx.float32)
    mx.eval(logits)
    B, T = x.shape
    margins = np.full((B, T), np.inf)
    for m in _router_margins(_ROUTER_SINK, getattr(model, "_ref_top_k", 0) or 0):
        margins = np.minimum(margins, m.reshape(B, T))
    _ROUTER_SINK.clear()
    return np.array(logits, dtype=np.float64), margins


def log_softmax(logits):
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def is_hybrid(model):
    """Gated DeltaNet models (their linear layers keep a recurrent state, not a trimmable KV cache)."""
    return any(hasattr(layer, "is_linear") for layer in model.layers)


def build_tokens_full(model, n, vocab, rng, thr, batch=8, max_tries=64):
    """build_tokens for models whose cache cannot be trimmed (hybrids), with the same acceptance rule (each position's
    router margins, given its prefix, exceed thr): draw all n tokens, run the whole sequence, replace the first failing
    position by the first acceptable of batches of random candidates; repeat until none fails."""
    toks = [int(t) for t in rng.integers(0, vocab, size=n)]
    for _ in range(8 * n):
        _, m = forward_logits(model, [toks])
        bad = np.nonzero(~(m[0] > thr))[0]
        if not len(bad):
            return toks
        t = int(bad[0])
        for _ in range(max_tries):
            cands = rng.integers(0, vocab, size=batch)
            _, mc = forward_logits(model, [toks[:t] + [int(c)] for c in cands])
            ok = np.nonzero(mc[:, -1] > thr)[0]
            if len(ok):
                toks[t] = int(cands[ok[0]])
                break
        else:
            raise RuntimeError(f"could not find a token with router margin > {thr} at position {t}")
    raise RuntimeError("build_tokens_full did not converge")


def build_tokens(model, n, vocab, rng, thr, max_tries=512):
    """Choose n tokens one at a time so that every router margin at each new position exceeds thr.

    Incremental: the accepted prefix lives in a KV cache; a rejected candidate is trimmed off again.
    Models whose cache cannot be trimmed (hybrids) use build_tokens_full."""
    cache = make_prompt_cache(model)
    if not can_trim_prompt_cache(cache):
        return build_tokens_full(model, n, vocab, rng, thr)
    toks = []
    top_k = getattr(model, "_ref_top_k", 0) or 0
    while len(toks) < n:
        for _ in range(max_tries):
            c = int(rng.integers(0, vocab))
            _ROUTER_SINK.clear()
            out = model(mx.array([[c]], dtype=mx.int32), cache=cache)
            mx.eval(out, [a for _, a in _ROUTER_SINK])
            margins = _router_margins(_ROUTER_SINK, top_k)
            _ROUTER_SINK.clear()
            if min((float(m.min()) for m in margins), default=math.inf) > thr:
                toks.append(c)
                break
            trim_prompt_cache(cache, 1)
        else:
            raise RuntimeError(f"could not find a token with router margin > {thr} at position {len(toks)}")
    return toks


def score(model, tokens):
    logits, margins = forward_logits(model, [tokens])
    lsm = log_softmax(logits[0])
    lp = [float(lsm[i, tokens[i + 1]]) for i in range(len(tokens) - 1)]
    return lp, float(margins.min())


def score_f64(model, tokens):
    """score() with every float32 parameter cast to float64 (mlx computes float64 on the CPU): the precise reference
    for float32 checkpoints, whose float32 forward in mlx-lm can itself drift by ~1e-4 in log-prob on a random model
    (seed 312599, qwen3_5: 1.06e-4 at one position, where moestream is within 1.1e-5 of float64). None for quantized
    models or when an op has no float64 kernel."""
    params = model.parameters()
    flat = tree_flatten(params)
    if any(a.dtype != mx.float32 for _, a in flat):
        return None
    try:
        model.update(tree_map(lambda a: a.astype(mx.float64), params))
        with mx.stream(mx.cpu):
            logits = model(mx.array(np.asarray([tokens], dtype=np.int32)))
            mx.eval(logits)
        lsm = log_softmax(np.array(logits.astype(mx.float64))[0])
        return [float(lsm[i, tokens[i + 1]]) for i in range(len(tokens) - 1)]
    except Exception as e:  # an op without a float64 kernel: keep the float32 reference
        print(f"  (no float64 reference: {e})")
        return None
    finally:
        model.update(params)
        _ROUTER_SINK.clear()


def greedy(model, prompt, n=16):
    """mlx-lm's own generate_step with an argmax sampler (what mlx_lm.generate does at temp 0), no EOS stop.
    Returns (generated, min router margin, min best-vs-second log-prob gap, [log-prob of each generated token from
    the step that produced it])."""
    _ROUTER_SINK.clear()
    out, gaps, lps = [], [], []
    for tok, lp in generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=n,
                                 sampler=lambda x: mx.argmax(x, axis=-1)):
        t = int(tok.item() if hasattr(tok, "item") else tok)
        out.append(t)
        lpa = np.array(lp.astype(mx.float32), dtype=np.float64).reshape(-1)
        lps.append(float(lpa[t]))
        lpn = np.sort(lpa)
        gaps.append(float(lpn[-1] - lpn[-2]))
    margins = [float(m.min()) for m in _router_margins(_ROUTER_SINK, getattr(model, "_ref_top_k", 0) or 0)]
    _ROUTER_SINK.clear()
    return out, (min(margins) if margins else math.inf), min(gaps), lps


def make_reference(model, top_k, vocab, seed, n_tokens=None, n_prompt=None, n_gen=16, thr=1e-3, greedy_thr=1e-3,
                   min_distinct=7, greedy_tries=200,
                   source=None, dtype="float32", extra=None):
    """Build the reference dict for one loaded mlx-lm model (n_tokens / n_prompt default 80 / 10, hybrids 100 / 70)."""
    hybrid = is_hybrid(model)
    if n_tokens is None:
        n_tokens = 100 if hybrid else 80
    if n_prompt is None:
        n_prompt = 70 if hybrid else 10
    model._ref_top_k = top_k
    is_moe = top_k > 0
    rng = np.random.default_rng(seed)
    for attempt in range(20):
        tokens = build_tokens(model, n_tokens, vocab, rng, thr) if is_moe else \
            [int(t) for t in rng.integers(0, vocab, size=n_tokens)]
        lp, m_score = score(model, tokens)
        if m_score > thr:
            break
    else:
        raise RuntimeError("score prompt: router margin check failed repeatedly")
    best = None   # prefer greedy runs that do not collapse into repeating one token
    for attempt in range(greedy_tries):
        prompt = build_tokens(model, n_prompt, vocab, rng, thr) if is_moe else \
            [int(t) for t in rng.integers(0, vocab, size=n_prompt)]
        gen, m_gen, g_gap, g_lps = greedy(model, prompt, n_gen)
        if m_gen > thr and g_gap > greedy_thr:
            if best is None or len(set(gen)) > len(set(best[1])):
                best = (prompt, gen, m_gen, g_gap, g_lps)
            if len(set(gen)) >= min_distinct:
                break
    if best is None:
        raise RuntimeError("greedy prompt: margin checks failed repeatedly")
    prompt, gen, m_gen, g_gap, g_lps = best
    lp64 = score_f64(model, tokens) if dtype == "float32" else None
    lp_np = np.array(lp)
    ref = {
        "source": source or f"mlx-lm {mlx_lm.__version__} (mlx {mx.__version__})",
        "dtype": dtype,
        "tokens": tokens,
        "logprobs": lp,
        **({"logprobs_f64": lp64} if lp64 is not None else {}),
        "greedy": {"prompt": prompt, "generated": gen, **({"decode_logprobs": g_lps} if hybrid else {})},
        "router_margin_min": (min(m_score, m_gen) if is_moe else None),
        "greedy_logprob_margin_min": g_gap,
        "logprob_stats": {"min": float(lp_np.min()), "max": float(lp_np.max()),
                          "mean": float(lp_np.mean()), "std": float(lp_np.std())},
        "seed": seed,
    }
    if extra:
        ref.update(extra)
    return ref


def convert(src_dir, dst_dir, bits=None, group_size=None, mode="affine"):
    """mlx_lm.convert without a tokenizer: load_model -> [quantize_model] -> save_model + save_config.

    Mirrors mlx_lm.convert.convert (quant_predicate = the model's own, dtype left as stored)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    model, config = load_model(src_dir, lazy=True)
    if bits is not None:
        model, config = quantize_model(model, config, group_size, bits, mode=mode)
    save_model(dst_dir, model, donate_model=True)
    save_config(config, config_path=dst_dir / "config.json")
    gc = src_dir / "generation_config.json"
    if gc.exists():
        shutil.copy(gc, dst_dir / "generation_config.json")
    return config


def tensor_summary(path):
    """[(name, dtype, shape)] of every tensor in the model*.safetensors files of a folder."""
    out = []
    for f in sorted(Path(path).glob("model*.safetensors")):
        for k, v in sorted(mx.load(str(f)).items()):
            out.append((k, str(v.dtype).replace("mlx.core.", ""), list(v.shape)))
    return out


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
