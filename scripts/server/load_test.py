#!/usr/bin/env python3
"""Load test of `moestream serve` on loopback, with the official `openai` client (AsyncOpenAI).

200 requests from 16 concurrent clients, mixed: chat and completions, plain and streamed; every
seventh streamed request disconnects after its third chunk. Checks that every request that was
not cancelled got a well-formed response (the client's own types, usage that adds up, one id per
stream, a finish reason), that the server's resident memory returns to its baseline, and that
`/metrics` counts exactly the requests sent and the tokens reported. Bounded: at most 200
requests of at most 48 tokens each, and a time limit.

    python3 scripts/server/load_test.py --bin target/release/moestream [--requests 200] [--clients 16]
"""
import argparse
import asyncio
import json
import os
import re
import sys
import time
import urllib.request

import openai
from openai import AsyncOpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletion

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import MODEL_NAME, Server, synth_model, workdir  # noqa: E402

TIME_LIMIT_S = 300
# Resident memory may end this much above its baseline (allocator slack), no more.
MEMORY_SLACK_BYTES = 16 << 20


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def metric(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    m = re.search("^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def one(client, i, stats):
    kind = ("chat", "chat_stream", "completion_stream", "completion")[i % 4]
    streamed = kind.endswith("_stream")
    disconnect = streamed and i % 7 == 0
    kw = dict(model=MODEL_NAME, max_tokens=8 + (i * 13) % 41, temperature=0.8, seed=i)
    prompt = f"Request {i}: tell me about the number {i * 7919 % 1000}."
    if not streamed:
        if kind == "chat":
            r = await client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **kw)
        else:
            r = await client.completions.create(prompt=prompt, **kw)
        assert isinstance(r, ChatCompletion if kind == "chat" else Completion), type(r)
        u = r.usage
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= kw["max_tokens"]
        assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
        stats["completed"] += 1
        stats["completion_tokens"] += u.completion_tokens
        stats["prompt_tokens"] += u.prompt_tokens
        return
    if kind == "chat_stream":
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], stream=True,
            stream_options={"include_usage": True}, **kw)
    else:
        stream = await client.completions.create(prompt=prompt, stream=True,
                                                 stream_options={"include_usage": True}, **kw)
    ids, finish, usage, n = set(), [], None, 0
    async with stream:
        async for chunk in stream:
            n += 1
            ids.add(chunk.id)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)
            if chunk.usage:
                usage = chunk.usage
            if disconnect and n == 3:
                break
    if disconnect and n == 3:
        stats["disconnected"] += 1
        return
    assert len(ids) == 1 and len(finish) == 1 and finish[0] in ("stop", "length"), (ids, finish)
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats["completed"] += 1
    stats["completion_tokens"] += usage.completion_tokens
    stats["prompt_tokens"] += usage.prompt_tokens


async def run(url, requests, clients):
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stats = {"completed": 0, "disconnected": 0, "completion_tokens": 0, "prompt_tokens": 0}
    queue = list(range(requests))
    failures = []

    async def worker():
        while queue:
            i = queue.pop(0)
            try:
                await one(client, i, stats)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(f"request {i}: {type(e).__name__}: {e}")

    t0 = time.time()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), TIME_LIMIT_S)
    await client.close()
    return stats, failures, time.time() - t0


def health(url):
    return json.loads(get(url + "/health"))


def settle(url):
    """Waits until the engine has nothing running or queued."""
    for _ in range(200):
        h = health(url)
        if h["active_sequences"] == 0 and h["queue_depth"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"the server did not settle: {h}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    with workdir() as tmp:
        model = synth_model(args.bin, tmp)
        with Server(args.bin, model, "--max-concurrent", "4", "--max-queue", "64") as s:
            # Warm-up: one round at full concurrency, so the baseline includes the allocator's
            # steady state.
            warm, warm_failures, _ = asyncio.run(run(s.url, args.clients, args.clients))
            assert not warm_failures, warm_failures
            baseline = settle(s.url)["memory"]["resident_bytes"]
            before = get(s.url + "/metrics")
            stats, failures, seconds = asyncio.run(run(s.url, args.requests, args.clients))
            after_health = settle(s.url)
            after = get(s.url + "/metrics")
            resident = after_health["memory"]["resident_bytes"]
            if failures:
                raise AssertionError(f"{len(failures)} failed:\n" + "\n".join(failures[:20]))
            assert stats["completed"] + stats["disconnected"] == args.requests, stats
            assert stats["disconnected"] > 0, stats

            def delta(name, **labels):
                return metric(after, name, **labels) - metric(before, name, **labels)
            chat = sum(1 for i in range(args.requests) if i % 4 in (0, 1))
            sent = {"/v1/chat/completions": chat, "/v1/completions": args.requests - chat}
            for endpoint, n in sent.items():
                got = delta("moestream_requests_total", endpoint=endpoint, status="200")
                assert got == n, f"{endpoint}: /metrics counts {got}, sent {n}"
            finished = {r: delta("moestream_generations_total", reason=r)
                        for r in ("stop", "length", "cancelled", "error")}
            assert finished["error"] == 0, finished
            assert finished["stop"] + finished["length"] + finished["cancelled"] == args.requests, finished
            # A disconnected stream may still have finished before the engine saw it go.
            assert finished["stop"] + finished["length"] >= stats["completed"], finished
            assert finished["cancelled"] <= stats["disconnected"], finished
            out_tokens = delta("moestream_generation_tokens_total")
            in_tokens = delta("moestream_prompt_tokens_total")
            assert out_tokens >= stats["completion_tokens"], (out_tokens, stats)
            assert in_tokens >= stats["prompt_tokens"], (in_tokens, stats)
            ttft = delta("moestream_time_to_first_token_seconds_count")
            assert ttft == args.requests, f"time-to-first-token observations {ttft}"
            assert resident <= baseline + MEMORY_SLACK_BYTES, \
                f"resident memory {resident} after the load, baseline {baseline}"
            assert s.stop() == 0, "SIGTERM exits 0"
    mib = 1 << 20
    print(f"load test: {args.requests} requests from {args.clients} clients in {seconds:.1f} s "
          f"({args.requests / seconds:.0f} req/s); {stats['completed']} completed, "
          f"{stats['disconnected']} disconnected mid-stream ({finished['cancelled']:.0f} cancelled "
          f"by the engine); {stats['completion_tokens']} tokens out, {stats['prompt_tokens']} in; "
          f"resident memory {baseline / mib:.1f} MiB before, {resident / mib:.1f} MiB after; "
          f"/metrics counts match (openai {openai.__version__})")


if __name__ == "__main__":
    main()
