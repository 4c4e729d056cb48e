#!/usr/bin/env python3
"""Prefill and decode speed of llama.cpp (the `llama-cpp-python` package, 0.3.36) on a GGUF file,
timed as `moestream bench` times itself, printed as one JSON line per test.

  pp{P}: one `eval` of P prompt tokens on an empty context; the token ids are those of
         `moestream bench` (`(i*7919 + 13) % min(vocab, 30000)`).
  tg{N}: N single-token `eval` calls on an empty context, starting from token 1, each next
         token the argmax of the last logits (greedy), as `moestream bench`'s tgN.

Each test runs once to warm up, then R times; the rate is tokens over the wall-clock time of the
`eval` calls (the Python between calls is microseconds against milliseconds per token). llama.cpp's
own counters (`llama_perf_context`) are printed beside it when they count anything: through
llama-cpp-python 0.3.36 they stayed at zero here (its `eval` path does not feed them).
    pip install llama-cpp-python==0.3.36
    python3 scripts/bench/llamacpp_timing.py FILE.gguf [-t 2] [-p 128] [-n 32] [-r 2]
"""

import argparse
import json
import statistics
import sys
import time

import llama_cpp
import numpy as np


def prompt(n, vocab):
    return [(i * 7919 + 13) % min(vocab, 30000) for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--no-mmap", action="store_true", help="read the whole file into memory")
    ap.add_argument("--no-repack", action="store_true",
                    help="compute on the mapped file (llama.cpp's --no-repack): by default its CPU backend "
                         "copies Q4_0/Q4_K tensors into an interleaved layout in anonymous memory")
    args = ap.parse_args()
    if args.no_repack:
        low = llama_cpp.llama_cpp
        default = low.llama_model_default_params

        def no_extra_bufts():
            params = default()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = no_extra_bufts

    t0 = time.time()
    llm = llama_cpp.Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=max(args.n_prompt, args.n_gen) + 16, n_batch=max(args.n_prompt, 32),
                          n_ubatch=max(args.n_prompt, 32), use_mmap=not args.no_mmap, verbose=False)
    load_s = time.time() - t0
    vocab = llm.n_vocab()
    ctx = llm._ctx.ctx
    base = {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "threads": args.threads,
            "model": args.model, "repack": not args.no_repack}
    print(json.dumps({**base, "test": "load", "seconds": round(load_s, 2)}), flush=True)

    def timed(test, run):
        rates, walls = [], []
        for rep in range(args.repetitions + 1):
            llm.reset()  # the next eval removes every cached position past 0
            llama_cpp.llama_perf_context_reset(ctx)
            start = time.perf_counter()
            tokens = run()
            wall = time.perf_counter() - start
            perf = llama_cpp.llama_perf_context(ctx)
            if test.startswith("pp"):
                ms, n = perf.t_p_eval_ms, perf.n_p_eval
            else:
                # The first single-token eval of an empty context can be counted as a prompt.
                ms, n = perf.t_eval_ms + perf.t_p_eval_ms, perf.n_eval + perf.n_p_eval
            if rep == 0:
                continue
            if ms > 0:
                rates.append(n / (ms / 1e3))
            walls.append(tokens / wall)
        line = {**base, "test": test, "tokens_per_second": statistics.mean(walls),
                "std": statistics.pstdev(walls), "runs": len(walls)}
        if rates:
            line["perf_counter_tokens_per_second"] = statistics.mean(rates)
        print(json.dumps(line), flush=True)

    ids = prompt(args.n_prompt, vocab)

    def prefill():
        llm.eval(ids)
        return len(ids)

    def decode():
        tok = 1
        for _ in range(args.n_gen):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return args.n_gen

    timed(f"pp{args.n_prompt}", prefill)
    timed(f"tg{args.n_gen}", decode)


if __name__ == "__main__":
    sys.exit(main())
