"""The demo model end to end: the 4-expert upcycle computes what the dense SmolLM2 computes, and
`mixtral-chat --demo --headless` answers a real question, keeping its KV cache across turns."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import model
from chat_app.demo import DEMO_NAME
from chat_app.personas import DEFAULT_PERSONA, PersonaLibrary

pytest_plugins = ["demo_gguf"]

QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_upcycled_demo_equals_the_dense_model(demo_files, demo_data_dir):
    from transformers import LlamaForCausalLM

    ids = np.array([[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2]], np.int32)
    dense = LlamaForCausalLM.from_pretrained(demo_files.hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = dense(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.load(demo_data_dir / "models" / DEMO_NAME, model.make_mesh((1, 1)))(ids))
    # (the int4 demo's weights are exact; its prefill rounds x to int16 per 32 inputs: 7e-3 here, of logits to 30)
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_headless_demo_answers_paris_and_reuses_its_cache(demo_data_dir):
    turns = [QUESTION, "Tell me one thing to see there."]
    run = subprocess.run(
        [sys.executable, "-m", "chat_app", "--demo", "--headless", "--jsonl", "--temperature", "0",
         "--max-new-tokens", "40", "--mesh", "1x1", "--data-dir", str(demo_data_dir), "--no-save"],
        input="".join(json.dumps({"role": "user", "content": t}) + "\n" for t in turns),
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    first, second = (json.loads(line) for line in run.stdout.splitlines())
    assert "Paris" in first["text"]
    assert first["finish_reason"] == "stop"

    # the second turn prefills only what the cache lacks: the reply's end-of-turn and the new user block
    tok = model.load_tokenizer(demo_data_dir / "models" / DEMO_NAME)
    persona = PersonaLibrary(demo_data_dir / "personas").get(DEFAULT_PERSONA)
    history = [{"role": "system", "content": persona.system_prompt}, {"role": "user", "content": turns[0]}, {"role": "assistant", "content": first["text"]},
               {"role": "user", "content": turns[1]}]
    prompt1 = model.encode_chat(tok, history[:2], "template")
    prompt2 = model.encode_chat(tok, history, "template")
    cached = len(prompt1) + first["generated_tokens"] + 1  # + the <|im_end|> that ended the reply
    assert second["prompt_tokens"] == len(prompt2)
    assert second["prefilled_tokens"] == len(prompt2) - cached


@pytest.mark.slow
def test_plain_headless_demo(demo_data_dir):
    run = subprocess.run(
        [sys.executable, "-m", "chat_app", "--demo", "--headless", "--temperature", "0", "--mesh", "1x1",
         "--data-dir", str(demo_data_dir), "--no-save"],
        input=QUESTION + "\n", capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
