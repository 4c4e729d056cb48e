#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint to GGUF with llama.cpp's own converter, then compare
`moestream score` on both (the converter is the reference: nobody here wrote it).

    python3 scripts/reference/llamacpp_convert.py LLAMA_CPP_DIR HF_DIR OUT.gguf ["ID ID ..."]

LLAMA_CPP_DIR is a llama.cpp source tree with `convert_hf_to_gguf.py`, `conversion/` and
`gguf-py/` (e.g. `vendor/llama.cpp` of the llama-cpp-python 0.3.36 sdist:
`pip download llama-cpp-python==0.3.36 --no-deps --no-binary llama-cpp-python`). Run it with a
Python that has torch, transformers and numpy. The converter runs unchanged, with one patch:
our synthetic byte-level tokenizer is not one whose pre-tokenizer hash it knows
(`get_vocab_base_pre` raises), so we name the pre-tokenizer llama.cpp uses for the real models
(`qwen2` for Qwen3-Next, `qwen35` for Qwen3.5). That touches only `tokenizer.ggml.pre`, never a
tensor or another metadata key.

Measured (f32, `synth --arch A --preset tiny-gguf --format hf-f32 --seed 1`, the default 80
tokens): qwen3next 0, qwen35 8.6e-7, qwen35moe 6.8e-7. The converted files cannot be run by
llama.cpp itself only because our synthetic tokenizer has no merges, which its vocabulary
loader requires (`synth --format gguf-*` files carry an empty list and load).
"""
import json
import os
import subprocess
import sys


def main():
    llama_dir, hf_dir, out = sys.argv[1:4]
    tokens = sys.argv[4] if len(sys.argv) > 4 else " ".join(str((i * 37 + 11) % 256) for i in range(80))
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    pre = "qwen35" if config.get("model_type", "").startswith("qwen3_5") else "qwen2"
    sys.path.insert(0, llama_dir)
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", "f32"]
    import convert_hf_to_gguf
    import conversion.base

    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    convert_hf_to_gguf.main()

    def score(model):
        p = subprocess.run(["target/release/moestream", "score", "--model", model, "--tokens", tokens],
                           capture_output=True, text=True, env={**os.environ, "MOESTREAM_EXACT_MATMUL": "1"})
        if p.returncode != 0:
            raise SystemExit(p.stderr)
        return json.loads(p.stdout)["logprobs"]

    ours, theirs = score(out), score(hf_dir)
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"{out}: llama.cpp's converter; max |logprob(gguf) - logprob(safetensors)| = {worst:.3g} "
          f"over {len(ours)} tokens")


if __name__ == "__main__":
    main()
