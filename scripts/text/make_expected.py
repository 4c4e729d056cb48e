#!/usr/bin/env python3
"""Write tests/fixtures/text/expected.json: reference outputs for moestream's `text` module.

The Rust tests in crates/engine/src/text/ compare byte-for-byte against what Hugging Face transformers produces:

* `apply_chat_template(messages, tokenize=False, add_generation_prompt=..., chat_template=..., **kwargs)` for every
  template under tests/fixtures/text/templates/ and a set of conversations (or the error it raises),
* `encode(text, add_special_tokens=...)` and `decode(ids, skip_special_tokens=...)` with the Qwen3 and Mixtral
  tokenizers under tests/fixtures/text/{qwen3,mixtral}/,
* `datetime.strftime` for a fixed UTC instant (the templates' `strftime_now`).

Only the files in this repository are read, so the output can be regenerated anywhere:

    pip install transformers   # no torch needed
    python3 scripts/text/make_expected.py

The versions of transformers, tokenizers and jinja2 used are recorded in the output.
"""

import copy
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "text"
TEMPLATES = FIXTURES / "templates"

# Strings for encode/decode and for the Rust incremental-decoding tests: multi-byte characters that byte-level BPE and
# SentencePiece byte fallback split across tokens, leading/trailing/repeated spaces, newlines, special-token text.
TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "Hello  world ",
    "   leading spaces and trailing   ",
    "line one\nline two\n\nline four\n",
    "\n\n\nstarts with newlines",
    "tabs\tand\r\nCRLF\r\n",
    "café naïve résumé Ångström façade",
    "combining: e\u0301 a\u0308 n\u0303 (NFD) vs é ä ñ",
    "中文测试：你好，世界！",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "Emoji: 🤗 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "🤗🤗🤗",
    "math ∑∫√∞ ≠ ≤ ≥ π ≈ 3.14159",
    "Ελληνικά και русский текст",
    "العربية من اليمين إلى اليسار",
    "हिन्दी देवनागरी लिपि",
    "ภาษาไทย ไม่มีช่องว่าง",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": "value", "list": [1, 2.5, null, true]}',
    "<think>\nreasoning here\n</think>\n\nanswer",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<s>[INST] hi [/INST] hello</s>",
    "Mixed: abc 中 def 🤗 ghi é\n",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "1234567890 12,345.67 -0.5e-10",
    "a" * 40 + " " + "🙂" * 5,
    " ",
    "\n",
    "ied 4 ½ months",
]

# (ids, skip_special_tokens) decode cases beyond the round trips; tokenizer-specific, see below.
QWEN3_EXTRA_DECODE = [
    [151644, 872, 198, 9707, 151645],  # <|im_start|>user\nHello<|im_end|>
    [151667, 198, 151668],  # <think>\n</think> (added tokens that are not special)
    [11162, 97],  # first two of the three tokens of 🤗: an incomplete UTF-8 sequence
    [97, 245],  # a continuation-only tail
]
MIXTRAL_EXTRA_DECODE = [
    [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 2],
    [243, 162],  # byte-fallback tokens of an incomplete 4-byte sequence
    [28705, 22557],  # '▁' then '▁Hello'
    [22557, 28705, 28705, 1526],
]

STRFTIME_FORMATS = [
    "%d %b %Y",
    "%Y-%m-%d %H:%M:%S",
    "%A, %B %d %Y %I:%M %p",
    "%a %e %j %y %%",
    "%-d %-m %-H",
    "%F %T",
]
STRFTIME_INSTANTS = [1700000000, 1709622489, 951782400, 0]


def special_tokens_note(tok):
    return {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}


def tokenizer_cases(name, tok, extra_decode):
    """Encode/decode references. `ids` come from the `tokenizers` library reading tokenizer.json, which is what the
    Rust side wraps; where transformers' own tokenizer class disagrees (transformers 5's LlamaTokenizer rebuilds the
    Mixtral pre-tokenizer as Metaspace(prepend_scheme=always), which drops the extra '▁' SentencePiece and
    tokenizer.json produce for a leading space), its answer is kept as `transformers_ids` for the record."""
    raw = tokenizers.Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
    encode = []
    for text in TEXTS:
        for add_special in (False, True):
            ids = raw.encode(text, add_special_tokens=add_special).ids
            case = {"text": text, "add_special_tokens": add_special, "ids": ids}
            hf_ids = tok.encode(text, add_special_tokens=add_special)
            if hf_ids != ids:
                case["transformers_ids"] = hf_ids
            encode.append(case)
    decode = []
    all_ids = [case["ids"] for case in encode if case["add_special_tokens"]] + extra_decode
    for ids in all_ids:
        for skip in (False, True):
            text = raw.decode(ids, skip_special_tokens=skip)
            hf_text = tok.decode(ids, skip_special_tokens=skip)
            if hf_text != text:
                sys.exit(f"{name}: transformers and tokenizers decode {ids} differently: {hf_text!r} != {text!r}")
            decode.append({"ids": ids, "skip_special_tokens": skip, "text": text})
    return {
        "vocab_size": len(tok),
        "special_tokens_map": special_tokens_note(tok),
        "encode": encode,
        "decode": decode,
    }


# ---------------------------------------------------------------------------------------------------------------
# Conversations

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "The capital of France is Paris."}
USER2 = {"role": "user", "content": "And of Germany?"}
ASSISTANT_THINK = {
    "role": "assistant",
    "content": "<think>\nThe user asks about France. Paris.\n</think>\n\nThe capital of France is Paris.",
}
ASSISTANT_REASONING_FIELD = {
    "role": "assistant",
    "content": "The capital of France is Paris.",
    "reasoning_content": "Recall: France → Paris.",
}
NON_ASCII_USER = {"role": "user", "content": "Bonjour ! Ça va ? 你好，世界 🤗 — «ünïcödé» \"quotes\" & <tags>\n\ttabbed"}
NON_ASCII_ASSISTANT = {"role": "assistant", "content": "Très bien, merci ! 很好 👍"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city — «météo».",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "safe": {"type": "boolean", "default": True}},
                "required": ["query"],
            },
        },
    },
]
TOOL_CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "What's the weather in Zürich and in 東京?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius", "days": 2}},
            },
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "東京", "unit": "celsius"}'},
            },
        ],
    },
    {"role": "tool", "content": '{"temperature": 21.5, "condition": "sunny"}'},
    {"role": "tool", "content": '{"temperature": 18, "condition": "雨"}'},
    {"role": "assistant", "content": "Zürich: 21.5 °C and sunny; 東京: 18 °C with rain."},
    {"role": "user", "content": "Search for umbrellas, safe search off."},
    {
        "role": "assistant",
        "content": "<think>\nNeed the search tool.\n</think>\n\nSearching now.",
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "search",
                    "arguments": {"query": "umbrella \"compact\" <best>", "safe": False, "limit": None, "score": 0.75},
                },
            }
        ],
    },
    {"role": "tool", "content": "3 results"},
]
# Qwen3.5's template iterates `arguments|items`, so it needs arguments as objects rather than JSON strings
TOOL_CONVERSATION_DICT_ARGS = copy.deepcopy(TOOL_CONVERSATION)
TOOL_CONVERSATION_DICT_ARGS[2]["tool_calls"][1]["function"]["arguments"] = {"city": "東京", "unit": "celsius"}
# OpenAI clients send `content: null` beside tool calls; transformers drops None-valued keys before rendering
TOOL_CALL_NULL_CONTENT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny"},
]
CONTENT_PARTS_USER = {
    "role": "user",
    "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "this text."}],
}

QWEN_CASES = [
    ("system_user", [SYSTEM, USER], {}),
    ("user_only", [USER], {}),
    ("multi_turn", [SYSTEM, USER, ASSISTANT, USER2], {}),
    ("multi_turn_no_system", [USER, ASSISTANT, USER2], {}),
    ("assistant_think_last", [USER, ASSISTANT_THINK], {}),
    ("assistant_think_history", [USER, ASSISTANT_THINK, USER2], {}),
    ("assistant_reasoning_field", [USER, ASSISTANT_REASONING_FIELD], {}),
    ("enable_thinking_false", [SYSTEM, USER], {"enable_thinking": False}),
    ("enable_thinking_true", [SYSTEM, USER], {"enable_thinking": True}),
    ("enable_thinking_false_multi", [USER, ASSISTANT_THINK, USER2], {"enable_thinking": False}),
    ("tools", TOOL_CONVERSATION, {"tools": TOOLS}),
    ("tools_dict_args", TOOL_CONVERSATION_DICT_ARGS, {"tools": TOOLS}),
    ("tools_no_system", TOOL_CONVERSATION[1:6], {"tools": TOOLS[:1], "enable_thinking": False}),
    ("non_ascii", [SYSTEM, NON_ASCII_USER, NON_ASCII_ASSISTANT, NON_ASCII_USER], {}),
    ("content_parts", [CONTENT_PARTS_USER], {}),
    ("tool_call_null_content", TOOL_CALL_NULL_CONTENT, {"tools": TOOLS[:1]}),
    ("system_not_first", [USER, SYSTEM], {}),
    ("assistant_only", [ASSISTANT], {}),
]
MISTRAL_CASES = [
    ("user_only", [USER], {}),
    ("multi_turn", [USER, ASSISTANT, USER2], {}),
    ("non_ascii", [NON_ASCII_USER, NON_ASCII_ASSISTANT, NON_ASCII_USER], {}),
    ("system_user", [SYSTEM, USER], {}),
    ("system_multi_turn", [SYSTEM, USER, ASSISTANT, USER2], {}),
    ("user_user", [USER, USER2], {}),
    ("assistant_first", [ASSISTANT, USER], {}),
    ("tool_role", [USER, {"role": "tool", "content": "x"}], {}),
]
COMPAT_VALUES_KWARGS = {
    "flag": True,
    "off": False,
    "nothing": None,
    "count": 42,
    "ratio": 0.5,
    "big": 1e20,
    "small": 1e-7,
    "negzero": -0.0,
    "whole": 2.0,
    "third": 1 / 3,
    "items": ["a", "it's", 'say "hi"', 1, 2.5, True, None, {"k": "v"}, "tab\there", "naïve 🤗", "back\\slash"],
    "mapping": {"b": 1, "a": [False, None], "c": "x'y"},
}
COMPAT_CASES = {
    "compat-tojson.jinja": [
        (
            "tojson",
            [
                {
                    "role": "user",
                    "content": "naïve \"quoted\" <b>&amp;</b> 'single' \\ tab\t nl\n ctrl\x01 🤗 \u2028",
                    "zeta": 1,
                    "alpha": [1, 2.5, -0.0, 1e20, 1e-7, True, None, {"nested": {}}],
                },
                {"role": "assistant", "content": "ok", "reasoning_content": "because", "tool_calls": None},
            ],
            {"numbers": {"int": 3, "neg": -7, "float": 0.1, "exp": 1.5e300, "tiny": 5e-324, "list": [], "obj": {}}},
        ),
    ],
    "compat-python-values.jinja": [
        (
            "python_values",
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
                {"role": "user", "content": ["part", 1, None]},
            ],
            COMPAT_VALUES_KWARGS,
        ),
    ],
    "compat-undefined.jinja": [
        (f"undefined_{case}", [USER], {"case": case}) for case in ["none", "attr", "add", "concat", "index", "call"]
    ],
    "compat-raise.jinja": [
        ("one_message", [USER], {}),
        ("two_messages", [USER, ASSISTANT], {}),
    ],
}

TEMPLATE_PLAN = [
    ("Qwen-Qwen3-0.6B.jinja", "qwen3", QWEN_CASES),
    ("Qwen3-0.6B.current.jinja", "qwen3", QWEN_CASES),
    ("Qwen3.5-4B.jinja", "qwen3", QWEN_CASES),
    ("Qwen3-Next-80B-A3B-Instruct.xinference.jinja", "qwen3", QWEN_CASES),
    ("Qwen3-Next-80B-A3B-Thinking.xinference.jinja", "qwen3", QWEN_CASES),
    ("Mixtral-8x7B-Instruct-v0.1.jinja", "mixtral", MISTRAL_CASES),
    ("mistral-v1-system.llama.cpp-test.jinja", "mixtral", MISTRAL_CASES),
    ("compat-tojson.jinja", "qwen3", COMPAT_CASES["compat-tojson.jinja"]),
    ("compat-python-values.jinja", "qwen3", COMPAT_CASES["compat-python-values.jinja"]),
    ("compat-undefined.jinja", "qwen3", COMPAT_CASES["compat-undefined.jinja"]),
    ("compat-raise.jinja", "mixtral", COMPAT_CASES["compat-raise.jinja"]),
    ("compat-raise.jinja", "qwen3", COMPAT_CASES["compat-raise.jinja"]),
]


def render_cases(toks):
    cases = []
    seen = set()
    for template_name, tok_name, plan in TEMPLATE_PLAN:
        source = (TEMPLATES / template_name).read_text(encoding="utf-8")
        tok = toks[tok_name]
        for case_name, messages, kwargs in plan:
            for add_generation_prompt in (False, True):
                case = {
                    "template": template_name,
                    "tokenizer": tok_name,
                    "case": case_name,
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "kwargs": kwargs,
                }
                try:
                    # apply_chat_template may normalise its inputs; hand it copies so the recorded inputs stay as given
                    case["output"] = tok.apply_chat_template(
                        copy.deepcopy(messages),
                        tokenize=False,
                        add_generation_prompt=add_generation_prompt,
                        chat_template=source,
                        **copy.deepcopy(kwargs),
                    )
                except Exception as e:  # noqa: BLE001 - any failure is an expected outcome to reproduce
                    # TemplateError is raise_exception(); others (TypeError, UndefinedError) are template bugs that
                    # the Rust side must also refuse, with its own wording
                    case["error"] = str(e)
                    case["error_type"] = type(e).__name__
                # Identical outputs for both add_generation_prompt values are kept: the flag is still an input
                key = (template_name, tok_name, case_name, add_generation_prompt)
                assert key not in seen
                seen.add(key)
                cases.append(case)
    return cases


def strftime_cases():
    out = []
    for ts in STRFTIME_INSTANTS:
        when = datetime.fromtimestamp(ts, tz=timezone.utc)
        for fmt in STRFTIME_FORMATS:
            out.append({"unix_seconds": ts, "format": fmt, "text": when.strftime(fmt)})
    return out


def ggml_vocab_cases():
    """The llama.cpp qwen2 vocab test, re-checked here with transformers (the Rust test reads the .inp/.out files)."""
    inp = (FIXTURES / "qwen3" / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    out = (FIXTURES / "qwen3" / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]
    lines = out.split("\n")[: len(texts)]
    return texts, [[int(x) for x in line.split()] for line in lines]


def main():
    toks = {
        "qwen3": AutoTokenizer.from_pretrained(str(FIXTURES / "qwen3")),
        "mixtral": AutoTokenizer.from_pretrained(str(FIXTURES / "mixtral")),
    }
    texts, ids = ggml_vocab_cases()
    for text, expected in zip(texts, ids):
        got = toks["qwen3"].encode(text, add_special_tokens=False)
        if got != expected:
            sys.exit(f"transformers disagrees with ggml-vocab-qwen2.gguf.out on {text!r}: {got} != {expected}")

    result = {
        "generated_by": "scripts/text/make_expected.py",
        "versions": {
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "jinja2": jinja2.__version__,
        },
        "tokenizers": {
            "qwen3": tokenizer_cases("qwen3", toks["qwen3"], QWEN3_EXTRA_DECODE),
            "mixtral": tokenizer_cases("mixtral", toks["mixtral"], MIXTRAL_EXTRA_DECODE),
        },
        "templates": render_cases(toks),
        "strftime": strftime_cases(),
    }
    path = FIXTURES / "expected.json"
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    n_err = sum("error" in c for c in result["templates"])
    print(f"wrote {path}: {len(result['templates'])} template cases ({n_err} raise), ggml vocab {len(texts)} checked")


if __name__ == "__main__":
    main()
