"""One process of a process group for test_multihost.py: `python multihost_engine.py CKPT PORT N ID`.

Every process joins the group and loads the tiny checkpoint on one 2x4 mesh over all the devices;
process 0 then prints (one JSON object on stdout) the model's logits for a prompt, gathered from every
process, and the replies of a `DriverEngine` conversation, which the other processes follow.
"""

import json
import os
import sys
from pathlib import Path

from model.multihost import DriverEngine, ProcessGroup, follow, identity, join

MESH = (2, 4)
PROMPT = [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]


def conversation(engine) -> dict:
    """What test_multihost.py compares with one process: greedy turns in one conversation (its cache kept
    between turns), a seeded sampled reply, a cancelled one (cancelled at the first check), a reply
    whose reader stops listening, a forgotten conversation answered again."""
    from model.engine_api import SamplingParams, TextDelta, TurnDone

    def turn(conversation_id, messages, sampling, should_stop=lambda: False):
        done = [e for e in engine.generate(conversation_id, messages, sampling, should_stop) if isinstance(e, TurnDone)]
        return done[0]

    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    messages, turns = [], []
    for text in ("Hello there", "Tell me more", "And again"):
        messages.append({"role": "user", "content": text})
        done = turn("greedy", messages, greedy)
        turns.append({"text": done.text, "prefilled": done.prefilled_tokens, "prompt": done.prompt_tokens})
        messages.append({"role": "assistant", "content": done.text})
    question = [{"role": "user", "content": "Pick a word"}]
    sampled = turn("sampled", question, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=1234)).text
    cancelled = turn("cancelled", question, SamplingParams(temperature=0, max_new_tokens=50), should_stop=lambda: True)
    abandoned = engine.generate("abandoned", question, SamplingParams(temperature=0, max_new_tokens=50))
    next(e for e in abandoned if isinstance(e, TextDelta))
    abandoned.close()  # across processes the others still run to the next stop check, in step
    engine.forget("greedy")
    again = turn("greedy", messages[:1], greedy)
    return {"turns": turns, "sampled": sampled, "cancelled": [cancelled.finish_reason, cancelled.generated_tokens],
            "after_forget": [again.text, again.prefilled_tokens]}


def logits(ckpt: Path, mesh) -> list:
    import numpy as np
    from jax.experimental import multihost_utils

    import model

    out = model.load(ckpt, mesh)(np.asarray([PROMPT], np.int32))
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))[0, -1].tolist()


def main() -> None:
    ckpt, port, processes, process_id = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def fatal(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(1)

    link = join(ProcessGroup(f"127.0.0.1:{port}", processes, process_id), identity(ckpt, MESH, 512), fatal)
    from model.engine import Engine
    from model.sharding import make_mesh

    result = {"logits": logits(ckpt, make_mesh(MESH))}
    engine = Engine(ckpt, mesh_shape=MESH, context_length=512)
    if link.is_driver:
        result.update(conversation(DriverEngine(engine, link)))
        link.close()
        print(json.dumps(result))
    else:
        follow(engine, link)


if __name__ == "__main__":
    main()
