#!/usr/bin/env python3
"""Reference logits and greedy continuations from llama.cpp (llama-cpp-python) for fixed prompts.

Writes tests/fixtures/llamacpp/<model>.json: for each prompt, the token ids (llama.cpp's tokenizer),
at the last positions of the prompt the top-K logits and statistics of the full logit vector, and a
greedy continuation with the top-1/top-2 logit gap at each step. The C++ test src/model/model_test.cpp
replays the token ids through our forward pass and compares.

Usage: python3 scripts/make_llamacpp_fixtures.py [--models smollm2,qwen15,qwen05]
Needs llama-cpp-python (scripts/setup.sh --reference) and the models (scripts/fetch_models.py).
"""
import argparse, json, os, sys
import numpy as np

CACHE = os.environ.get("TWILIGHT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "twilight")
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct-Q4_1.gguf",
    "qwen15": "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
    "qwen05": "Qwen2.5-Coder-0.5B-Instruct-AWQ.gguf",
}
LONG = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. "
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well "
    "fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters. "
)
PROMPTS = [
    ("prose", "The quick brown fox jumps over the lazy dog. In the morning, the village"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"),
    ("chat", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
    ("long", LONG * 8 + "\nSummary of the passage above:"),  # > 256 tokens: several prefill chunks and pages
]
TOPK = 40
LAST = 4
GREEDY = 48


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,qwen15")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llamacpp"))
    args = ap.parse_args()
    from llama_cpp import Llama
    import llama_cpp
    for key in args.models.split(","):
        path = os.path.join(CACHE, "models", MODELS[key])
        if not os.path.exists(path):
            sys.exit(f"missing {path}: run scripts/fetch_models.py")
        llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=2, logits_all=True, verbose=False)
        out = {"model": MODELS[key], "llama_cpp_python": llama_cpp.__version__, "n_vocab": llm.n_vocab(), "prompts": []}
        for name, text in PROMPTS:
            toks = llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true", special=True)
            llm.reset()
            llm.eval(toks)
            scores = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
            positions = []
            for pos in range(len(toks) - LAST, len(toks)):
                row = scores[pos]
                top = np.argsort(-row, kind="stable")[:TOPK]
                positions.append({"pos": pos, "ids": top.tolist(), "logits": [round(float(row[i]), 5) for i in top],
                                  "mean": float(row.mean()), "std": float(row.std())})
            greedy, gaps = [], []
            for _ in range(GREEDY):
                row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                o = np.argsort(-row, kind="stable")[:2]
                greedy.append(int(o[0]))
                gaps.append(round(float(row[o[0]] - row[o[1]]), 5))
                llm.eval([int(o[0])])
            out["prompts"].append({"name": name, "tokens": list(map(int, toks)), "positions": positions,
                                   "greedy": greedy, "greedy_gap": gaps})
            print(f"{key} {name}: {len(toks)} tokens, greedy: {llm.detokenize(greedy).decode(errors='replace')!r}")
        with open(os.path.join(args.out, key + ".json"), "w") as f:
            json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
