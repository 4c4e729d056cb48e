"""Times mlx-lm's own forward pass, one decode step at a time, on an MLX checkpoint.

mlx_lm.generate gives one figure at the end; on slow back ends (MLX's CPU back end with a
30B MoE) that can take very long, so this prints each step as it completes: a prefill of P
tokens, then N single-token decode steps with mlx-lm's KV cache, each forced with mx.eval.
Usage: python3 scripts/bench/mlx_decode_steps.py MODEL_DIR [P] [N]
"""
import sys
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

model_dir = sys.argv[1]
p = int(sys.argv[2]) if len(sys.argv) > 2 else 16
n = int(sys.argv[3]) if len(sys.argv) > 3 else 4
t = time.time()
model, _ = load(model_dir)
print(f"load {time.time() - t:.1f} s", flush=True)
cache = make_prompt_cache(model)
ids = mx.array([[(i * 7919 + 13) % 30000 for i in range(p)]])
t = time.time()
logits = model(ids, cache=cache)
mx.eval(logits)
dt = time.time() - t
print(f"prefill {p} tokens: {dt:.2f} s = {p / dt:.3f} tok/s", flush=True)
tok = mx.argmax(logits[:, -1, :], axis=-1)
steps = []
for i in range(n):
    t = time.time()
    logits = model(tok.reshape(1, 1), cache=cache)
    tok = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(tok)
    steps.append(time.time() - t)
    print(f"decode step {i + 1}: {steps[-1]:.2f} s", flush=True)
print(f"decode mean: {len(steps) / sum(steps):.3f} tok/s over {len(steps)} steps (mlx {mx.__version__}, default device {mx.default_device()})")
