#!/usr/bin/env python3
"""Log-probabilities of moestream and llama.cpp (llama-cpp-python 0.3.36) on the same GGUF file.

    python3 scripts/reference/llamacpp_agreement.py FILE.gguf ["ID ID ..."]

Checks that llama.cpp loads a file our writer made (`moestream synth ... --format gguf-*`) and
prints the largest |difference| of `moestream score` and llama.cpp's log-probabilities over the
tokens. llama.cpp runs with an f32 KV cache and no flash attention, so that on a gguf-f32 file
both compute in f32 (measured: 1e-6 on qwen3moe and Mixtral (permuted q/k rows), 1e-5 on dense
qwen3; on the hybrids' `tiny-gguf` preset, 80 tokens: 2.6e-6 qwen3next, 1.6e-6 qwen35, 1.4e-6
qwen35moe). On quantized files llama.cpp rounds activations to 8 bits (Q8_K/Q8_0) and differs by
~1e-2 to 0.3 on these random models; that is its arithmetic, not the file.
"""
import json, sys, numpy as np, llama_cpp, subprocess
path = sys.argv[1]
ref_tokens = [int(x) for x in sys.argv[2].split()] if len(sys.argv) > 2 else None
llm = llama_cpp.Llama(model_path=path, n_threads=2, n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0, flash_attn=False)
toks = ref_tokens or [1, 2, 3, 4, 5]
llm.eval(toks)
lg = np.array(llm.scores[:len(toks)], dtype=np.float64)
lp = lg - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)) - lg.max(1, keepdims=True)
ours = json.loads(subprocess.run(["target/release/moestream", "score", "--model", path, "--tokens", " ".join(map(str, toks))], capture_output=True, text=True, check=True).stdout)["logprobs"]
theirs = [lp[i, toks[i + 1]] for i in range(len(toks) - 1)]
print(path, "llama.cpp loads it; max |logprob(ours) - logprob(llama.cpp)| =", max(abs(a - b) for a, b in zip(ours, theirs)), "over", len(theirs))
