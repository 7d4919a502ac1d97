"""Weight-only int8 / int4 on the demo model: size on disk, logit error and greedy agreement vs float32.

    python -m bench.quant_accuracy

For each chat prompt, float32 greedily writes a reply; each quantized model then reads the same tokens
(teacher forcing) and we compare its logits at every reply position: the largest absolute error
(relative to the float32 logits' spread), and how often its top token is float32's. "free-running"
counts the tokens a quantized model's own greedy reply shares with float32's before they part.
"""

from __future__ import annotations

import sys

import numpy as np

import model
from bench.run import CACHE, prepare
from model.generate import Generator

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a CPU cache is in two sentences.", "List three fruits that are red.",
           "How do I reverse a list in Python?", "Why is the sky blue?"]
REPLY_TOKENS = 48


def main() -> int:
    _, reference_ckpt = prepare("demo", "float32", None)
    hf_dir = CACHE / "demo" / "exported"
    tok = model.load_tokenizer(reference_ckpt)
    mesh = model.make_mesh((1, 1))
    reference = model.load(reference_ckpt, mesh)
    prompts = [model.encode_chat(tok, [{"role": "user", "content": p}], "template") for p in PROMPTS]
    replies = [Generator(reference).greedy(p, REPLY_TOKENS) for p in prompts]
    sequences = [np.array([p + r], np.int32) for p, r in zip(prompts, replies)]
    reference_logits = [np.asarray(reference(s))[0, len(p) - 1:-1] for s, p in zip(sequences, prompts)]
    size = sum(f.stat().st_size for f in reference_ckpt.glob("*.safetensors"))
    rows = [("float32", size, 0.0, 0.0, 1.0, 1.0)]
    for mode in ("int8", "int4"):
        ckpt = CACHE / "demo" / f"ours-{mode}"
        if not ckpt.exists():
            model.convert_hf(hf_dir, ckpt, quantize=mode)
        quantized = model.load(ckpt, mesh)
        errors, agree, free_running = [], [], []
        for seq, prompt, ref, reply in zip(sequences, prompts, reference_logits, replies):
            logits = np.asarray(quantized(seq))[0, len(prompt) - 1:-1]
            errors.append(np.abs(logits - ref).max() / (ref.max(-1) - ref.min(-1)).mean())
            agree.append((logits.argmax(-1) == ref.argmax(-1)).mean())
            own = Generator(quantized).greedy(prompt, REPLY_TOKENS)
            free_running.append(next((i for i, (a, b) in enumerate(zip(own, reply)) if a != b), len(reply)) / len(reply))
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        rows.append((mode, size, float(np.max(errors)), float(np.mean(errors)), float(np.mean(agree)),
                     float(np.mean(free_running))))
    print("| weights | size on disk | max logit error (of spread) | mean of per-prompt max | top-1 agreement "
          "| free-running greedy agreement |")
    print("|---|---|---|---|---|---|")
    for mode, size, max_err, mean_err, agree, free in rows:
        print(f"| {mode} | {size / 1e6:.0f} MB | {max_err:.3f} | {mean_err:.3f} | {agree:.1%} | {free:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
