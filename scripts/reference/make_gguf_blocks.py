#!/usr/bin/env python3
"""Make the ggml block-format fixture: random blocks of every type moestream decodes, and what
gguf-py's `gguf.quants.dequantize` makes of them.

Writes OUT (default tests/fixtures/ggml_blocks/blocks.gguf), a GGUF file written by gguf-py's
GGUFWriter holding, for each type T in F32 F16 BF16 Q4_0 Q8_0 Q4_K Q5_K Q6_K Q4_1 Q5_0 (the last two
appended, so that the random blocks of the others stay as they were):
  `blocks.T`   the raw blocks, type T, 4096 values (16 rows of 256)
  `dequant.T`  gguf.quants.dequantize(blocks.T) as F32, same shape
Block bytes are uniformly random except the f16 scales (d, dmin), which are drawn finite
(normal * 0.05, plus exact zeros, negatives and subnormals), since a NaN/inf scale is not a
weight anyone stores. F16/BF16 are random finite bit patterns.

The Rust test `crates/kernels/tests/ggml_blocks.rs` decodes `blocks.T` and requires equality with
`dequant.T` bit for bit. Needs `pip install gguf numpy` (gguf 0.19.0 used).
    python3 scripts/reference/make_gguf_blocks.py [--out PATH] [--seed 7]
"""

import argparse

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

ROWS, COLS = 16, 256


def scales(rng, n):
    d = (rng.standard_normal(n) * 0.05).astype(np.float16)
    d[::7] = 0.0
    d[1::11] = np.float16(-3.0e-6)  # a negative subnormal
    d[2::13] = np.float16(6.0e-8)   # the smallest subnormal
    return d.view(np.uint8).reshape(n, 2)


def random_blocks(rng, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = ROWS * COLS // block
    b = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    if qtype in (T.Q4_0, T.Q8_0, T.Q5_0):
        b[:, 0:2] = scales(rng, n)
    elif qtype in (T.Q4_K, T.Q5_K, T.Q4_1):
        b[:, 0:2] = scales(rng, n)
        b[:, 2:4] = scales(rng, n)
    elif qtype == T.Q6_K:
        b[:, 208:210] = scales(rng, n)
    return b.reshape(ROWS, -1)


def random_floats(rng, qtype):
    bits = rng.integers(0, 1 << 16, size=(ROWS, COLS), dtype=np.uint16)
    if qtype == T.F16:
        bad = (bits & 0x7C00) == 0x7C00
    else:
        bad = (bits & 0x7F80) == 0x7F80
    bits[bad] &= 0x3FFF  # clear the top exponent bit: finite
    return bits.view(np.uint8).reshape(ROWS, -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/ggml_blocks/blocks.gguf")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    w = gguf.GGUFWriter(args.out, arch="ggml_blocks")
    w.add_string("fixture.source", f"gguf-py {gguf.__name__} quants.dequantize, seed {args.seed}")
    for qtype in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_1, T.Q5_0):
        if qtype == T.F32:
            raw = rng.standard_normal((ROWS, COLS)).astype(np.float32).view(np.uint8)
        elif qtype in (T.F16, T.BF16):
            raw = random_floats(rng, qtype)
        else:
            raw = random_blocks(rng, qtype)
        ref = dequantize(raw, qtype).astype(np.float32)
        assert ref.shape == (ROWS, COLS), (qtype, ref.shape)
        assert np.isfinite(ref).all(), qtype
        w.add_tensor(f"blocks.{qtype.name}", raw, raw_dtype=qtype)
        w.add_tensor(f"dequant.{qtype.name}", ref)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
