#!/usr/bin/env python3
"""Make a GGUF agreement fixture: a tiny random Q4_K_M GGUF (moestream synth) and the scores of
the float checkpoint that gguf-py's dequantization of it gives.

  1. `moestream synth --arch ARCH --preset tiny-gguf --format gguf-q4km` -> OUT/model.gguf
  2. every tensor dequantized with `gguf.quants.dequantize` (gguf-py, not our code), renamed to
     Hugging Face names, the converter's transformations undone (qwen3moe and qwen3 have none to
     undo; the `llama` (Mixtral) q/k row permutation is inverted here, independently of the Rust
     loader's inverse), stacked experts split per expert, written
     as an HF float32 checkpoint (config.json from the GGUF metadata) in a temporary folder
  3. `moestream score` and greedy `run` on that float checkpoint (the engine's f32 path, itself
     checked against transformers by the other fixtures) -> OUT/gguf_reference.json

The Rust test (crates/cli/tests/gguf.rs) then requires `score` on the GGUF to match within 1e-4
and the same greedy tokens, resident and streamed; it needs no Python.
Needs `pip install gguf numpy`. The three committed fixtures:
    python3 scripts/reference/make_gguf_fixtures.py --bin target/release/moestream \
        --arch qwen3_moe --out tests/fixtures/models/qwen3_moe_gguf_q4km
    python3 scripts/reference/make_gguf_fixtures.py --arch qwen3 --out tests/fixtures/models/qwen3_gguf_q4km
    python3 scripts/reference/make_gguf_fixtures.py --arch mixtral --out tests/fixtures/models/mixtral_gguf_q4km
"""

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np
import gguf
from gguf.quants import dequantize

LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
EXPERTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj", "ffn_down_exps.weight": "down_proj"}
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def meta(r, key):
    f = r.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    return v


def unpermute(w, heads):
    # llama converter: ggml row h*D + 2j + i holds HF row h*D + i*D/2 + j.
    rows = w.shape[0]
    d = rows // heads
    return w.reshape(heads, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf(path, out):
    r = gguf.GGUFReader(path)
    arch = meta(r, "general.architecture")
    a = lambda k: meta(r, f"{arch}.{k}")
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        name = t.name
        if name in GLOBAL:
            tensors[GLOBAL[name]] = w
            continue
        _, layer, rest = name.split(".", 2)
        p = f"model.layers.{layer}"
        if rest in EXPERTS:
            for e in range(w.shape[0]):
                tensors[f"{p}.mlp.experts.{e}.{EXPERTS[rest]}.weight"] = np.ascontiguousarray(w[e])
            continue
        if arch == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
            heads = a("attention.head_count") if rest == "attn_q.weight" else a("attention.head_count_kv")
            w = unpermute(w, heads)
        tensors[f"{p}.{LAYER[rest]}"] = w
    layers = a("block_count")
    dense = [l for l in range(layers) if f"model.layers.{l}.mlp.gate.weight" not in tensors]
    cfg = {
        "model_type": {"qwen3moe": "qwen3_moe", "qwen3": "qwen3", "llama": "mixtral"}[arch],
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
        "hidden_size": a("embedding_length"), "num_hidden_layers": layers,
        "num_attention_heads": a("attention.head_count"), "num_key_value_heads": a("attention.head_count_kv"),
        "head_dim": a("attention.key_length"), "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(a("rope.freq_base")), "max_position_embeddings": a("context_length"),
        "tie_word_embeddings": "lm_head.weight" not in tensors, "intermediate_size": a("feed_forward_length"),
        "num_experts": a("expert_count"), "num_local_experts": a("expert_count"),
        "num_experts_per_tok": a("expert_used_count"), "moe_intermediate_size": a("expert_feed_forward_length"),
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": dense,
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if arch != "qwen3moe":
        for k in ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
            cfg.pop(k)
    os.makedirs(out, exist_ok=True)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    header, off, blobs = {}, 0, []
    for k in sorted(tensors):
        b = np.ascontiguousarray(tensors[k], dtype="<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)
    return cfg


def run(binary, *args):
    p = subprocess.run([binary, *args], capture_output=True, text=True, env={**os.environ, "MOESTREAM_EXACT_MATMUL": "1"})
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/moestream")
    ap.add_argument("--arch", default="qwen3_moe", choices=["qwen3_moe", "qwen3", "mixtral"])
    ap.add_argument("--out", default="tests/fixtures/models/qwen3_moe_gguf_q4km")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = os.path.join(args.out, "model.gguf")
    subprocess.run([args.bin, "synth", "--arch", args.arch, "--preset", "tiny-gguf", "--format", "gguf-q4km",
                    "--seed", str(args.seed), model], check=True, capture_output=True)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as hf:
        cfg = gguf_to_hf(model, hf)
        tokens = [int(x) for x in rng.integers(0, 256, size=80)]
        s = run(args.bin, "score", "--model", hf, "--tokens", " ".join(map(str, tokens)), "--decode-activations", "f32")
        prompt = tokens[:10]
        g = run(args.bin, "run", "--model", hf, "--prompt-tokens", " ".join(map(str, prompt)), "--max-tokens", "16",
                "--temperature", "0", "--ignore-eos", "--json", "--decode-activations", "f32")
    ref = {
        "source": f"moestream f32 on the gguf-py {gguf.__name__} dequantized checkpoint",
        "gguf": "model.gguf (moestream synth %s tiny-gguf gguf-q4km seed %d)" % (args.arch, args.seed),
        "config": cfg, "tokens": s["tokens"], "logprobs": s["logprobs"],
        "greedy": {"prompt": prompt, "generated": g["generated_tokens"]},
    }
    json.dump(ref, open(os.path.join(args.out, "gguf_reference.json"), "w"), indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
