#!/usr/bin/env python3
"""`moestream serve` driven by the official `openai` client (pip install openai).

Every response is parsed by the client's own types: chat (plain and streamed), completions
(plain and streamed), models, `stop`, `max_tokens`, `seed` reproducibility, logprobs, usage,
errors as the client's exception classes, the API key, and a tool-call round trip with
reasoning. The model has random weights, so the tool-call and reasoning requests run on a
second server started with `--scripted-replies`: its replies are fixed texts, fed through the
model token by token in place of sampled tokens, so the template, the parsing and the wire format
are exercised as with a real model. Exits non-zero on the first failed check.

    python3 scripts/server/openai_client.py --bin target/release/moestream
"""
import argparse
import json
import os
import sys
import time

import openai
from openai import OpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import MODEL_NAME, Server, synth_model, workdir  # noqa: E402

CHECKS = []


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    CHECKS.append(what)


def messages(text):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def plain_and_streamed(client):
    models = client.models.list()
    check([m.id for m in models.data] == [MODEL_NAME], "models.list names the served model")
    check(client.models.retrieve(MODEL_NAME).id == MODEL_NAME, "models.retrieve")

    r = client.chat.completions.create(model=MODEL_NAME, messages=messages("Why is the sky blue?"),
                                       max_tokens=24, temperature=0)
    check(isinstance(r, ChatCompletion), "chat returns a ChatCompletion")
    c = r.choices[0]
    check(c.message.role == "assistant" and isinstance(c.message.content, str), "assistant message")
    check(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason}")
    u = r.usage
    check(u.prompt_tokens > 0 and u.completion_tokens <= 24
          and u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage {u}")

    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=messages("Why is the sky blue?"), max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    check(all(isinstance(x, ChatCompletionChunk) for x in chunks), "chunks are ChatCompletionChunks")
    check(len({x.id for x in chunks}) == 1, "one id for all chunks")
    check(chunks[0].choices[0].delta.role == "assistant", "first chunk carries the role")
    text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
    finish = [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason]
    check(text == c.message.content, f"streamed text {text!r} equals plain {c.message.content!r}")
    check(finish == [c.finish_reason], f"one finish chunk {finish}")
    check(chunks[-1].choices == [] and chunks[-1].usage == u, "last chunk has the usage")

    cr = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12,
                                   temperature=0)
    check(isinstance(cr, Completion) and cr.choices[0].finish_reason in ("stop", "length"),
          "completion")
    streamed = list(client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                              max_tokens=12, temperature=0, stream=True))
    check("".join(x.choices[0].text for x in streamed) == cr.choices[0].text,
          "streamed completion equals plain")
    ids = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    check(ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens <= 3,
          "token-array prompt and its usage")
    return c.message.content


def sampling(client, greedy_text):
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages("Count to ten."),
                                       max_tokens=3, temperature=0.7, seed=1)
    check(r.usage.completion_tokens <= 3, "max_tokens bounds the completion")
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages("Count to ten."),
                                       max_completion_tokens=2, temperature=0.7, seed=1)
    check(r.usage.completion_tokens <= 2, "max_completion_tokens bounds the completion")

    # stop: a piece from the middle of the greedy reply cuts it there.
    clean = [i for i in range(4, len(greedy_text) - 3) if "\ufffd" not in greedy_text[i:i + 2]]
    check(clean, f"greedy text usable for stop: {greedy_text!r}")
    stop = greedy_text[clean[0]:clean[0] + 2]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages("Why is the sky blue?"),
                                       max_tokens=24, temperature=0, stop=[stop, "\x00never"])
    check(r.choices[0].message.content == greedy_text[:greedy_text.index(stop)]
          and r.choices[0].finish_reason == "stop", f"stop {stop!r}: {r.choices[0].message.content!r}")
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages("Why is the sky blue?"),
                                       max_tokens=24, temperature=0, stop=stop)
    check(r.choices[0].finish_reason == "stop", "stop as a single string")

    def sampled(seed):
        return client.chat.completions.create(
            model=MODEL_NAME, messages=messages("Tell me a story."), max_tokens=24,
            temperature=1.0, top_p=0.95, seed=seed, logprobs=True).choices[0]
    a, b, c = sampled(42), sampled(42), sampled(43)
    check(a.message.content == b.message.content, "the same seed reproduces the text")
    toks = lambda ch: [t.token for t in ch.logprobs.content]  # noqa: E731
    check(toks(a) != toks(c), "another seed gives other tokens")
    extras = client.chat.completions.create(
        model=MODEL_NAME, messages=messages("Tell me a story."), max_tokens=8, temperature=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, seed=5,
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    check(extras.usage.completion_tokens <= 8, "top_k, min_p and penalties accepted")


def logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages("hi"), max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    check(len(lp) == r.usage.completion_tokens, "one logprob per generated token")
    for t in lp:
        check(t.logprob <= 0 and len(t.top_logprobs) == 3, "logprob and 3 alternatives")
        check(abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, "greedy picks the top token")
        check(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob,
              "alternatives sorted")
    raw = b"".join(bytes(t.bytes) for t in lp).decode("utf-8", "replace")
    check(raw == r.choices[0].message.content,
          f"token bytes {raw!r} make up the text {r.choices[0].message.content!r}")
    cr = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=5, temperature=0,
                                   logprobs=2)
    l = cr.choices[0].logprobs
    check(len(l.tokens) == len(l.token_logprobs) == len(l.top_logprobs) == cr.usage.completion_tokens,
          "completions logprobs arrays")
    check(all(len(t) <= 2 for t in l.top_logprobs), "completions top_logprobs")


def errors(client, url):
    def raises(cls, what, **kw):
        try:
            client.chat.completions.create(**{"model": MODEL_NAME, "messages": messages("hi"), **kw})
        except cls as e:
            check(isinstance(e.body, dict) and e.body.get("message"), f"{what}: message")
            return e
        raise AssertionError(f"{what}: no {cls.__name__}")
    raises(openai.NotFoundError, "unknown model", model="gpt-5")
    e = raises(openai.BadRequestError, "negative max_tokens", max_tokens=-1)
    check(e.param == "max_tokens", "error names the parameter")
    raises(openai.BadRequestError, "n > 1", n=2)
    raises(openai.BadRequestError, "temperature out of range", temperature=9)
    raises(openai.BadRequestError, "unknown argument", extra_body={"frobnicate": 1})
    bad_key = OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    try:
        bad_key.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        check(True, "wrong key raises AuthenticationError")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

SCRIPT = [
    "Hello there.",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "<think>\nThe tool says 21 degrees and sunny.\n</think>\n\nIt is sunny in Paris, 21 °C.",
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    "Plain answer.",
]


def tools_and_reasoning(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r0 = client.chat.completions.create(model=MODEL_NAME, messages=ask)
    check(r0.choices[0].message.content == SCRIPT[0] and r0.choices[0].finish_reason == "stop",
          "scripted reply")

    r1 = client.chat.completions.create(model=MODEL_NAME, messages=ask, tools=TOOLS)
    m1 = r1.choices[0].message
    check(r1.usage.prompt_tokens > r0.usage.prompt_tokens + 50, "tools are rendered into the prompt")
    check(r1.choices[0].finish_reason == "tool_calls", "finish_reason tool_calls")
    check(m1.content is None and len(m1.tool_calls) == 1, f"one tool call, no content: {m1}")
    call = m1.tool_calls[0]
    check(call.type == "function" and call.function.name == "get_weather"
          and json.loads(call.function.arguments) == {"city": "Paris"}, f"tool call {call}")

    history = ask + [m1.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "sunny"}'}]
    r2 = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS)
    m2 = r2.choices[0].message
    check(r2.usage.prompt_tokens > r1.usage.prompt_tokens, "the tool call and result are rendered")
    check(m2.content == "It is sunny in Paris, 21 °C." and not m2.tool_calls, f"answer {m2.content!r}")
    check(getattr(m2, "reasoning_content", None) == "\nThe tool says 21 degrees and sunny.\n",
          f"reasoning_content {getattr(m2, 'reasoning_content', None)!r}")

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=ask, tools=TOOLS,
                                                 stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    check(content.strip() == "Let me check.", f"streamed content before the call {content!r}")
    check(len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
          and json.loads(calls[0].function.arguments) == {"city": "Oslo"}, f"streamed call {calls}")
    check(chunks[-1].choices[0].finish_reason == "tool_calls", "streamed finish_reason tool_calls")

    r4 = client.chat.completions.create(model=MODEL_NAME, messages=ask,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    check(r4.usage.prompt_tokens > r0.usage.prompt_tokens, "enable_thinking=False changes the prompt")
    check(r4.choices[0].message.content == SCRIPT[4], "chat_template_kwargs accepted")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True)
    args = ap.parse_args()
    t0 = time.time()
    with workdir() as tmp:
        model = synth_model(args.bin, tmp)
        with Server(args.bin, model) as s:
            client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            greedy = plain_and_streamed(client)
            sampling(client, greedy)
            logprobs(client)
            check(s.stop() == 0, "SIGTERM exits 0")
        script = os.path.join(tmp, "script.json")
        with open(script, "w") as f:
            json.dump(SCRIPT, f)
        with Server(args.bin, model, "--scripted-replies", script, "--api-key", "k-123") as s:
            client = OpenAI(base_url=s.url + "/v1", api_key="k-123", max_retries=0)
            tools_and_reasoning(client)
            errors(client, s.url)
            check(s.stop() == 0, "SIGTERM exits 0")
    print(f"openai client: {len(CHECKS)} checks passed in {time.time() - t0:.1f} s "
          f"(openai {openai.__version__})")


if __name__ == "__main__":
    main()
