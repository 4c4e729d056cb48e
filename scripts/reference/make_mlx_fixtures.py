#!/usr/bin/env python3
"""Make the MLX (mlx-lm) fixtures from the HF fixtures, with mlx-lm's own converter and references.

For each HF fixture tests/fixtures/models/<name>/ this writes, next to it:
  <name>_mlx4     4-bit, group size 64        (mlx-lm quantize_model with the model's quant_predicate)
  <name>_mlx8     8-bit, group size 64
plus qwen3_moe_a_mlx3g32, qwen3_moe_a_mlx6g128, mixtral_mlx2g32, mixtral_mlx5g64 and the unquantized
(stacked switch_mlp, float32) qwen3_moe_a_mlxf32. Each gets a reference.json computed by mlx-lm from the
saved folder (float32 activations; greedy with mlx_lm.generate.generate_step + argmax, no EOS stop; for the
hybrids qwen3_5_moe_a, qwen3_5_dense, qwen3_next_a also greedy.decode_logprobs, see mlx_ref.py).

Conversion = mlx_lm.convert.convert minus the tokenizer: utils.load_model -> utils.quantize_model -> save_model +
save_config (+ generation_config.json copied). mlx-lm 0.32's qwen3_moe sanitize only understands per-expert
tensors, so the fused TF-5 layout (qwen3_moe_b: mlp.experts.gate_up_proj [E,2I,H] / down_proj [E,H,I]) is
first split into per-expert tensors (gate = rows [0:I], up = rows [I:2I]) in a temporary copy. mlx-lm has no
qwen3_5_text module: the text-only Qwen3.5 CausalLM (qwen3_5_dense) is loaded from a temporary copy whose config
says model_type qwen3_5 (mlx-lm's qwen3_5 then takes the flat config as its text config and prefixes the weights
with language_model.). The Qwen3.5-MoE fixture stays fused (mlx-lm's qwen3_5_moe reads only that layout) and the
qwen3_next one is per-expert (mlx-lm's qwen3_next sanitize silently skips its conversions, the +1 of the norms and
the conv1d transpose included, when it finds no experts.0.up_proj).

It also cross-checks every HF fixture: an unquantized mlx-lm conversion must reproduce the HF reference
log-probs (printed max |diff|) and greedy tokens.

  python3 scripts/reference/make_mlx_fixtures.py [--dir tests/fixtures/models] [--seed 4321] [--only hf1,hf2]
"""

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlx_ref  # noqa: E402

import mlx.core as mx  # noqa: E402

VOCAB = 512
# (hf fixture, output suffix, bits, group size); bits None = unquantized float32
VARIANTS = [
    ("qwen3_moe_a", "mlx4", 4, 64), ("qwen3_moe_a", "mlx8", 8, 64),
    ("qwen3_moe_a", "mlx3g32", 3, 32), ("qwen3_moe_a", "mlx6g128", 6, 128),
    ("qwen3_moe_a", "mlxf32", None, None),
    ("qwen3_moe_b", "mlx4", 4, 64), ("qwen3_moe_b", "mlx8", 8, 64),
    ("qwen3_dense", "mlx4", 4, 64), ("qwen3_dense", "mlx8", 8, 64),
    ("mixtral", "mlx4", 4, 64), ("mixtral", "mlx8", 8, 64),
    ("mixtral", "mlx2g32", 2, 32), ("mixtral", "mlx5g64", 5, 64),
    ("qwen3_5_moe_a", "mlx4", 4, 64), ("qwen3_5_moe_a", "mlx8", 8, 64),
    ("qwen3_5_dense", "mlx4", 4, 64), ("qwen3_5_dense", "mlx8", 8, 64),
    ("qwen3_next_a", "mlx4", 4, 64), ("qwen3_next_a", "mlx8", 8, 64),
]


def unfuse_if_needed(hf_dir, tmp_root):
    """Return a folder mlx-lm can load: the HF folder itself, a per-expert copy of a fused qwen3_moe one, or (text-only
    Qwen3.5, model_type qwen3_5_text / qwen3_5_moe_text, which mlx-lm has no module for) a copy whose config says
    qwen3_5 / qwen3_5_moe. The second value says what was done (None: nothing)."""
    hf_dir = Path(hf_dir)
    cfg = json.load(open(hf_dir / "config.json"))
    if cfg.get("model_type") in ("qwen3_5_text", "qwen3_5_moe_text"):
        out = Path(tmp_root) / (hf_dir.name + "_mt")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(hf_dir / "model.safetensors", out / "model.safetensors")
        shutil.copy(hf_dir / "generation_config.json", out / "generation_config.json")
        mt = cfg["model_type"][: -len("_text")]
        mlx_ref.write_json(out / "config.json", dict(cfg, model_type=mt))
        return out, f"model_type {cfg['model_type']} -> {mt} for mlx-lm"
    if cfg.get("model_type") != "qwen3_moe":
        return hf_dir, None
    w = mx.load(str(hf_dir / "model.safetensors"))
    fused = [k for k in w if k.endswith("mlp.experts.gate_up_proj")]
    if not fused:
        return hf_dir, None
    out = Path(tmp_root) / (hf_dir.name + "_unfused")
    out.mkdir(parents=True, exist_ok=True)
    new = {}
    for k, v in w.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            E, I2, _ = v.shape
            inter = I2 // 2
            for e in range(E):
                new[f"{pre}{e}.gate_proj.weight"] = v[e, :inter, :]
                new[f"{pre}{e}.up_proj.weight"] = v[e, inter:, :]
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                new[f"{pre}{e}.down_proj.weight"] = v[e]
        else:
            new[k] = v
    mx.save_safetensors(str(out / "model.safetensors"), new, metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        shutil.copy(hf_dir / f, out / f)
    return out, "unfused for mlx-lm"


def summarize(name, path, ref):
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    rm = ref["router_margin_min"]
    st = ref["logprob_stats"]
    print(f"== {name}: {size} bytes, router_margin_min {rm if rm is None else f'{rm:.3e}'}, "
          f"greedy margin {ref['greedy_logprob_margin_min']:.4f}, logprobs min {st['min']:.3f} "
          f"max {st['max']:.3f} mean {st['mean']:.3f} std {st['std']:.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="tests/fixtures/models")
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--tensors", action="store_true", help="print tensor names/dtypes/shapes of each output")
    ap.add_argument("--only", default=None, help="comma list of HF fixture names whose MLX variants to (re)make")
    args = ap.parse_args()
    root = Path(args.dir)
    vers = mlx_ref.versions()
    print(f"mlx {vers['mlx']}, mlx-lm {vers['mlx_lm']}", flush=True)
    failed = []
    tmp = Path(tempfile.mkdtemp(prefix="mlxfix_"))
    try:
        srcs = {}
        # 1. cross-check HF references against an unquantized mlx-lm load of the same weights
        only = set(args.only.split(",")) if args.only else None
        for hf in sorted({v[0] for v in VARIANTS if only is None or v[0] in only}):
            try:
                src, unfused = unfuse_if_needed(root / hf, tmp)
                srcs[hf] = src
                chk = tmp / (hf + "_check")
                mlx_ref.convert(src, chk)
                model, _, top_k = mlx_ref.load(chk)
                href = json.load(open(root / hf / "reference.json"))
                lp, m = mlx_ref.score(model, href["tokens"])
                gen, mg, _, glp = mlx_ref.greedy(model, href["greedy"]["prompt"], len(href["greedy"]["generated"]))
                d = float(np.max(np.abs(np.array(lp) - np.array(href["logprobs"]))))
                ok = d < 1e-4 and gen == href["greedy"]["generated"]
                dd = ""
                if "decode_logprobs" in href["greedy"]:
                    ddv = float(np.max(np.abs(np.array(glp) - np.array(href["greedy"]["decode_logprobs"]))))
                    ok = ok and ddv < 1e-4
                    dd = f", greedy decode_logprobs max |diff| {ddv:.2e}"
                print(f"-- HF {hf} ({href['source']}{', ' + unfused if unfused else ''}) vs mlx-lm float32: "
                      f"max |logprob diff| {d:.2e}, greedy {'identical' if gen == href['greedy']['generated'] else 'DIFFERENT'}"
                      f"{dd}, mlx router margin {min(m, mg):.3e}", flush=True)
                if not ok:
                    failed.append(hf + " (HF vs mlx-lm cross-check)")
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                failed.append(hf)
        # 2. the MLX fixtures
        for i, (hf, suffix, bits, gs) in enumerate(VARIANTS):
            name = f"{hf}_{suffix}"
            if only is not None and hf not in only:
                continue
            if hf not in srcs:
                failed.append(name)
                continue
            out = root / name
            try:
                mlx_ref.convert(srcs[hf], out, bits=bits, group_size=gs)
                idx = out / "model.safetensors.index.json"
                model, cfg, top_k = mlx_ref.load(out)
                vocab = (cfg.get("text_config") or cfg).get("vocab_size", VOCAB)
                ref = mlx_ref.make_reference(
                    model, top_k, vocab, seed=args.seed + 31 * i,
                    dtype="float32",
                    extra={"converted_from": hf, "mlx": vers["mlx"], "mlx_lm": vers["mlx_lm"],
                           "quantization": cfg.get("quantization"),
                           "layout": "mlx-quantized" if bits else "mlx-float32"})
                assert ref["router_margin_min"] is None or ref["router_margin_min"] > 1e-3
                mlx_ref.write_json(out / "reference.json", ref)
                summarize(name, out, ref)
                if args.tensors:
                    for k, dt, shp in mlx_ref.tensor_summary(out):
                        print(f"   {k} {dt} {shp}")
                    print("   config.json:", json.dumps(json.load(open(out / "config.json")), sort_keys=True))
                assert idx.exists()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                failed.append(name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"done; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
