#!/usr/bin/env python3
"""Make a GGUF agreement fixture: a tiny random Q4_K_M GGUF (moestream synth) and the scores of
the float checkpoint that gguf-py's dequantization of it gives.

  1. `moestream synth --arch ARCH --preset tiny-gguf --format gguf-q4km` -> OUT/model.gguf
  2. every tensor dequantized with `gguf.quants.dequantize` (gguf-py, not our code), renamed to
     Hugging Face names, the converter's transformations undone (qwen3moe and qwen3 have none to
     undo; the `llama` (Mixtral) q/k row permutation is inverted here, independently of the Rust
     loader's inverse; for the hybrids, read off llama.cpp's conversion/qwen.py (`Qwen3NextModel`,
     `_LinearAttentionVReorderBase`, `_QwenMtpMixin`): norms less their folded 1 (not
     `ssm_norm`), `A_log = log(-ssm_a)`, convolutions back to `[C, 1, K]`, Qwen3.5's value heads
     from tiled back to grouped order, Qwen3-Next's `attn_qkv` + `attn_gate` interleaved back
     into `in_proj_qkvz`, the `nextn` blocks back to `mtp.*`), stacked experts split per expert,
     written as an HF float32 checkpoint (config.json from the GGUF metadata) in a temporary
     folder. The Rust loader undoes none of the hybrids' transformations this way (it reads
     tiled heads, `ssm_a` and `1 + w` as they are), so the two sides share no code or method
  3. `moestream score` and greedy `run` on that float checkpoint (the engine's f32 path, itself
     checked against transformers by the other fixtures) -> OUT/gguf_reference.json

The Rust test (crates/cli/tests/gguf.rs) then requires `score` on the GGUF to match within 1e-4
and the same greedy tokens, resident and streamed; it needs no Python.
Needs `pip install gguf numpy`. The three committed fixtures:
    python3 scripts/reference/make_gguf_fixtures.py --bin target/release/moestream \
        --arch qwen3_moe --out tests/fixtures/models/qwen3_moe_gguf_q4km
    python3 scripts/reference/make_gguf_fixtures.py --arch qwen3 --out tests/fixtures/models/qwen3_gguf_q4km
    python3 scripts/reference/make_gguf_fixtures.py --arch mixtral --out tests/fixtures/models/mixtral_gguf_q4km
    python3 scripts/reference/make_gguf_fixtures.py --arch qwen3_next --out tests/fixtures/models/qwen3_next_gguf_q4km
    python3 scripts/reference/make_gguf_fixtures.py --arch qwen3_5 --out tests/fixtures/models/qwen3_5_gguf_q4km
    python3 scripts/reference/make_gguf_fixtures.py --arch qwen3_5_moe --out tests/fixtures/models/qwen3_5_moe_gguf_q4km
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
HYBRID = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_ba.weight": "linear_attn.in_proj_ba.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_a": "linear_attn.A_log",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
}
NEXTN = {"nextn.eh_proj.weight": "mtp.fc.weight", "nextn.enorm.weight": "mtp.pre_fc_norm_embedding.weight",
         "nextn.hnorm.weight": "mtp.pre_fc_norm_hidden.weight", "nextn.shared_head_norm.weight": "mtp.norm.weight"}
HYBRID_ARCHES = {"qwen3next": "qwen3_next", "qwen35": "qwen3_5_text", "qwen35moe": "qwen3_5_moe_text"}


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


def untile(w, axis, nk, r, width):
    # Converter: tiled head j*nk + g holds HF head g*r + j, along `axis` in blocks of `width`.
    w = np.moveaxis(w, axis, 0)
    rest = w.shape[1:]
    w = w.reshape(r, nk, width, *rest).swapaxes(0, 1).reshape(r * nk * width, *rest)
    return np.moveaxis(w, 0, axis)


def hybrid_to_hf(arch, a, name, w):
    """HF name(s) and values of a hybrid's GGUF tensor; None for names the generic tables map."""
    rest = name.split(".", 2)[2]
    nk, nv = a("ssm.group_count"), a("ssm.time_step_rank")
    dk, dv = a("ssm.state_size"), a("ssm.inner_size") // nv
    r = nv // nk
    tiled = arch != "qwen3next" and nk != nv
    if rest.endswith("norm.weight") and rest != "ssm_norm.weight":
        w = w - 1  # the converter stores 1 + w
    if rest == "ssm_a":
        w = np.log(-w)
    if rest == "ssm_conv1d.weight":
        w = w[:, None, :]
    if tiled:
        if rest == "attn_qkv.weight":
            w = np.concatenate([w[:2 * nk * dk], untile(w[2 * nk * dk:], 0, nk, r, dv)])
        elif rest == "attn_gate.weight":
            w = untile(w, 0, nk, r, dv)
        elif rest in ("ssm_beta.weight", "ssm_alpha.weight", "ssm_a", "ssm_dt.bias"):
            w = untile(w, 0, nk, r, 1)
        elif rest == "ssm_conv1d.weight":
            w = np.concatenate([w[:2 * nk * dk], untile(w[2 * nk * dk:], 0, nk, r, dv)])
        elif rest == "ssm_out.weight":
            w = untile(w, 1, nk, r, dv)
    if rest == "ffn_gate_inp_shexp.weight":
        w = w.reshape(1, -1)  # [1, H] as the converter writes it; 1-D in some files
    return w


def qkvz(qkv, z, nk, nv, dk, dv):
    # Qwen3-Next's in_proj_qkvz: per key head g, [q_g, k_g, v_g (r heads), z_g (r heads)].
    r = nv // nk
    q, k, v = qkv[:nk * dk], qkv[nk * dk:2 * nk * dk], qkv[2 * nk * dk:]
    parts = []
    for g in range(nk):
        parts += [q[g * dk:(g + 1) * dk], k[g * dk:(g + 1) * dk], v[g * r * dv:(g + 1) * r * dv],
                  z[g * r * dv:(g + 1) * r * dv]]
    return np.concatenate(parts)


def gguf_to_hf(path, out):
    r = gguf.GGUFReader(path)
    arch = meta(r, "general.architecture")
    a = lambda k: meta(r, f"{arch}.{k}")
    hybrid = arch in HYBRID_ARCHES
    trunk = a("block_count") - (a("nextn_predict_layers") or 0)
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        name = t.name
        if name in GLOBAL:
            tensors[GLOBAL[name]] = w - 1 if hybrid and name == "output_norm.weight" else w
            continue
        _, layer, rest = name.split(".", 2)
        p = f"model.layers.{layer}"
        if hybrid:
            if rest in NEXTN:
                tensors[NEXTN[rest]] = w - 1 if rest != "nextn.eh_proj.weight" else w
                continue
            if int(layer) >= trunk:
                p = f"mtp.layers.{int(layer) - trunk}"
            w = hybrid_to_hf(arch, a, name, w)
            if rest in HYBRID:
                tensors[f"{p}.{HYBRID[rest]}"] = w
                continue
        if rest in EXPERTS:
            for e in range(w.shape[0]):
                tensors[f"{p}.mlp.experts.{e}.{EXPERTS[rest]}.weight"] = np.ascontiguousarray(w[e])
            continue
        if arch == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
            heads = a("attention.head_count") if rest == "attn_q.weight" else a("attention.head_count_kv")
            w = unpermute(w, heads)
        tensors[f"{p}.{LAYER[rest]}"] = w
    if arch == "qwen3next":
        nk, nv = a("ssm.group_count"), a("ssm.time_step_rank")
        dk, dv = a("ssm.state_size"), a("ssm.inner_size") // nv
        for k in [k for k in tensors if k.endswith("linear_attn.in_proj_qkv.weight")]:
            p = k[: -len("in_proj_qkv.weight")]
            tensors[p + "in_proj_qkvz.weight"] = qkvz(tensors.pop(k), tensors.pop(p + "in_proj_z.weight"), nk, nv, dk, dv)
    layers = trunk
    dense = [l for l in range(layers) if f"model.layers.{l}.mlp.gate.weight" not in tensors]
    cfg = {
        "model_type": {"qwen3moe": "qwen3_moe", "qwen3": "qwen3", "llama": "mixtral", **HYBRID_ARCHES}[arch],
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
    if hybrid:
        nv = a("ssm.time_step_rank")
        flags = list(a("attention.recurrent_layers"))[:layers]
        cfg.update({
            "model_type": HYBRID_ARCHES[arch], "linear_num_key_heads": a("ssm.group_count"),
            "linear_num_value_heads": nv, "linear_key_head_dim": a("ssm.state_size"),
            "linear_value_head_dim": a("ssm.inner_size") // nv, "linear_conv_kernel_dim": a("ssm.conv_kernel"),
            "layer_types": ["linear_attention" if f else "full_attention" for f in flags],
            "partial_rotary_factor": a("rope.dimension_count") / a("attention.key_length"),
            "shared_expert_intermediate_size": a("expert_shared_feed_forward_length"),
            "mtp_num_hidden_layers": a("nextn_predict_layers") or 0,
        })
        if arch == "qwen35":
            for k in ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
                cfg.pop(k)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if arch not in ("qwen3moe", "qwen3next", "qwen35", "qwen35moe"):
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
    ap.add_argument("--arch", default="qwen3_moe",
                    choices=["qwen3_moe", "qwen3", "mixtral", "qwen3_next", "qwen3_5", "qwen3_5_moe"])
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
