#!/usr/bin/env python3
"""Reference fixtures for src/tokenizer tests, produced by llama.cpp (llama-cpp-python) and jinja2.

Writes tests/fixtures/tokenizer/{smollm2,qwen25}.json (and pre-tokenizer variants run on the SmolLM2
vocabulary: gpt2.json, llama_bpe.json) with:
  texts:   [{text (base64 of the raw bytes), special: ids with parse_special, plain: ids without}]
  pieces:  {id: base64 of llama_token_to_piece(id, special=True)} for a sample of ids
  eog:     ids llama.cpp marks end-of-generation
  chat:    [{messages, add_generation_prompt, expected}] rendered by jinja2 from the model's own
           tokenizer.chat_template
Usage: python3 scripts/make_tokenizer_fixtures.py [--smol PATH] [--qwen PATH] [--out DIR]
"""
import argparse
import base64
import json
import os
import random
import tempfile

import gguf
import jinja2
import llama_cpp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.environ.get("TWILIGHT_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "twilight")

TEXTS = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog. It's 4:30pm; we'll leave at 5.",
    "don't I'LL you've WE'RE she'd it's 'quoted' ''double'' O'Neil rock'n'roll",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "#include <vector>\nint main() {\n\tstd::vector<int> v{1, 2, 3};\n\tfor (auto& x : v) x *= 2;\n\treturn 0;\n}\n",
    "if (a&&b||!c) { x->y = arr[i++] >> 2; } // comment\r\n",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "\n\n\nthree newlines then text\n",
    "\t\ttabs\tand\t \t mixed \n \n  \r\n\r\n end",
    "      \n      ",
    "1 12 123 1234 12345 123456 1234567 3.14159 -42 1e10 0x1F 1,000,000",
    "Version 2.0.1 released on 2024-11-29 at 12:00:00",
    "99999999999999999999999999999999",
    "café naïve résumé Ångström façade Straße",
    "e\u0301 a\u0308 n\u0303 combining: Z\u0351\u0364\u0347a\u0336l\u0327g\u0310o",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم، هذا نص عربي. ١٢٣٤٥",
    "Привет, мир! Ελληνικά κείμενα. עברית",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷",
    "math: ∑ ∫ √2 ≈ 1.414 ≤ ∞ ½ ² ³ Ⅻ ①",
    "nbsp:\u00a0x\u2003y\u3000z nel:\u0085w fs:\u001cq zwj:\u200dz",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>x",
    "<|im_start|><|im_start|>nested <|im_end",
    "</s> and <s> and <tool_call>{\"a\": 1}</tool_call>",
    "<reponame>repo<file_sep>file.py<|fim_prefix|>pre<|fim_suffix|>suf<|fim_middle|>",
    "URLs: https://example.com/path?q=1&r=two#frag and user@example.org",
    "Mixed\u2028line\u2029separators and \u000bvertical\u000cfeed",
    "CamelCaseIdentifier snake_case_name SCREAMING_CASE kebab-case",
    "$$$ %%% ^^^ &&& *** ((( ))) --- +++ === ~~~ ``` ||| \\\\\\",
    "....... ,,,,,, !!!!!! ?????? ;;;;;; :::::",
    # Unicode-version probes: letters of 15.0 / 15.1 are letters to llama.cpp, letters new in 16.0
    # are not (its tables are Unicode 15.1), which decides whether "'s" splits off.
    "\U0001E030's \U00011F04's \U0002EBF0's \u1c8a's \U00010D50's",
]


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def random_texts(seed: int, count: int):
    """Short random strings over a pool that stresses the pre-tokenizer's edge cases."""
    pool = (list("aZ09 '\n\r\t.,!?-_()") + ["  ", "   ", "'s", "'LL", "'re", " 1", "é", "e\u0301",
            "日本", "한", "ب", "😀", "👍🏽", "\u200d", "\u00a0", "\u0085", "\u2003", "\u001c", "\u00b2",
            "Ⅻ", "٣", "<|im_end|>", "<tool_call>", "\U0001F3F3\uFE0F"])
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(1, 12)
        out.append("".join(rng.choice(pool) for _ in range(n)))
    return out


INVALID_UTF8 = [
    b"a\xffb",
    b"\x80\x80 lone continuation",
    b"truncated \xe6\x97",
    b"truncated at end \xf0\x9f\x98",
    b"\xc3\x28 bad second byte",
    b"overlong \xc0\xaf slash",
    b"surrogate \xed\xa0\x80 half",
    b"\xf8\x88\x80\x80\x80 five-byte form",
]


def copy_with_pre(src: str, dst: str, pre: str) -> None:
    """Vocabulary-only copy of src with tokenizer.ggml.pre replaced (llama.cpp loads it with vocab_only)."""
    r = gguf.GGUFReader(src)
    arch = bytes(r.fields["general.architecture"].parts[r.fields["general.architecture"].data[0]]).decode()
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        if name == "tokenizer.ggml.pre":
            w.add_key_value(name, pre, gguf.GGUFValueType.STRING)
        elif vt == gguf.GGUFValueType.ARRAY:
            st = f.types[1]
            if st == gguf.GGUFValueType.STRING:
                val = [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data]
            else:
                val = [f.parts[i][0].item() for i in f.data]
            w.add_key_value(name, val, vt, st)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_key_value(name, bytes(f.parts[f.data[0]]).decode(), vt)
        else:
            w.add_key_value(name, f.parts[f.data[0]][0].item(), vt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def chat_cases(template: str, qwen: bool):
    env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, **kw)
    tpl = env.from_string(template)
    convs = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
         {"role": "user", "content": "Write a haiku\nabout rain."}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "system", "content": "Later system note"},
         {"role": "user", "content": "ünïcödé 日本 😀"}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "Call the tool"}, {"role": "assistant", "content": "Calling."},
         {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "second result"},
         {"role": "user", "content": "Thanks"}],
        [{"role": "tool", "content": "first message is a tool result"}],
        [{"role": "narrator", "content": "an unknown role"}, {"role": "user", "content": "ok"}],
    ]
    out = []
    for msgs in convs:
        for agp in (False, True):
            text = tpl.render(messages=msgs, add_generation_prompt=agp)
            out.append({"messages": msgs, "add_generation_prompt": agp, "expected": text})
    return out


def model_fixture(path: str, label: str, with_chat: bool, qwen: bool):
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    vocab = llm._model.vocab

    def tok(b: bytes, special: bool):
        return llm.tokenize(b, add_bos=False, special=special)

    def piece(i: int) -> bytes:
        buf = (llama_cpp.ctypes.c_char * 256)()
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, 256, 0, True)
        assert 0 <= n <= 256
        return bytes(buf[:n])

    texts = [t.encode() for t in TEXTS] + INVALID_UTF8 + [t.encode() for t in random_texts(1234, 150)]
    cases = [{"text": b64(b), "special": tok(b, True), "plain": tok(b, False)} for b in texts]
    # A longer mixed document (checks pieces stitched across many words).
    long_doc = ("\n\n".join(TEXTS[2:]) * 2).encode()
    cases.append({"text": b64(long_doc), "special": tok(long_doc, True), "plain": tok(long_doc, False)})

    n_vocab = llm.n_vocab()
    rng = random.Random(99)
    ids = sorted(set(list(range(0, 300)) + list(range(n_vocab - 300, n_vocab)) + rng.sample(range(n_vocab), 400)))
    fx = {
        "model": label,
        "n_vocab": n_vocab,
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "eog": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "texts": cases,
        "pieces": {str(i): b64(piece(i)) for i in ids},
    }
    if with_chat:
        r = gguf.GGUFReader(path)
        f = r.fields["tokenizer.chat_template"]
        fx["chat"] = chat_cases(bytes(f.parts[f.data[0]]).decode(), qwen)
    return fx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smol", default=os.path.join(CACHE, "models", "SmolLM2-135M-Instruct-Q4_1.gguf"))
    ap.add_argument("--qwen", default=os.path.join(CACHE, "models", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"))
    ap.add_argument("--qwen05", default=os.path.join(CACHE, "models", "Qwen2.5-Coder-0.5B-Instruct-AWQ.gguf"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "tokenizer"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    def dump(name, obj):
        p = os.path.join(a.out, name)
        with open(p, "w") as fh:
            json.dump(obj, fh, ensure_ascii=True, separators=(",", ":"))
        print(p, os.path.getsize(p), "bytes")

    dump("smollm2.json", model_fixture(a.smol, "smollm2", True, False))
    dump("qwen25.json", model_fixture(a.qwen, "qwen25-coder-1.5b", True, True))
    q05 = model_fixture(a.qwen05, "qwen25-coder-0.5b", True, True)
    dump("qwen25_05b_chat.json", {"model": q05["model"], "chat": q05["chat"]})
    with tempfile.TemporaryDirectory() as td:
        for pre, name in (("gpt-2", "gpt2.json"), ("llama-bpe", "llama_bpe.json")):
            p = os.path.join(td, "v.gguf")
            copy_with_pre(a.smol, p, pre)
            fx = model_fixture(p, "smollm2-vocab-" + pre, False, False)
            fx["pre"] = pre
            del fx["pieces"]
            dump(name, fx)


if __name__ == "__main__":
    main()
