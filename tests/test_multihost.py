"""Several processes, one model (model/multihost.py, `--distributed`): two real processes with 4
simulated CPU devices each (XLA_FLAGS, as a user would start them) on 127.0.0.1, compared with one
process on 8 devices over the same 2x4 mesh. Every subprocess has a timeout, so a hang fails."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model.multihost import STOP_CHECK_TOKENS

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
TIMEOUT_S = 240


def free_ports(count: int) -> list[int]:
    """Ports free now, all different (each socket is held until all are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def environment(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = str(TESTS.parent)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([root, str(TESTS), env.get("PYTHONPATH", "")]))
    return env


def cli(*args: str, devices: int = 4, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chat_app", *args], env=environment(devices), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def group_args(port: int, process_id: int) -> list[str]:
    return ["--distributed", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id)]


def headless_args(ckpt: Path, data_dir: Path) -> list[str]:
    return ["--model", str(ckpt), "--headless", "--jsonl", "--no-save", "--data-dir", str(data_dir),
            "--temperature", "0", "--max-new-tokens", "10", "--mesh", "2x4"]


TURNS = "".join(json.dumps({"role": "user", "content": text}) + "\n"
                for text in ("Hello there", "Tell me more", "And again"))


def test_engine_across_processes_matches_one_process(tiny_ckpt):
    """Logits within 1e-5, greedy turns with the kept cache, a seeded sampled reply and a forgotten
    conversation all as in one process; a cancel reaches every process at the same check."""
    import model
    from model.engine import Engine
    from model.sharding import make_mesh
    from multihost_engine import MESH, PROMPT, conversation

    (port,) = free_ports(1)
    processes = [subprocess.Popen([sys.executable, str(TESTS / "multihost_engine.py"), str(tiny_ckpt), str(port), "2",
                                   str(i)], env=environment(4), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in (1, 0)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    together = json.loads(outputs[1][0].splitlines()[-1])  # after the lines gloo prints on stdout

    mesh = make_mesh(MESH)
    alone = np.asarray(model.load(tiny_ckpt, mesh)(np.asarray([PROMPT], np.int32)))[0, -1]
    np.testing.assert_allclose(np.asarray(together.pop("logits")), alone, atol=1e-5, rtol=0)
    expected = conversation(Engine(tiny_ckpt, mesh_shape=MESH, context_length=512))
    assert together.pop("cancelled") == ["cancelled", STOP_CHECK_TOKENS]
    expected.pop("cancelled")
    assert together == expected
    assert [t["prefilled"] < t["prompt"] for t in together["turns"]] == [False, True, True]  # the cache was kept


def test_headless_conversation_across_processes(tiny_ckpt, tmp_path):
    """The CLI: the same greedy replies as one process, stdout holding only the replies; Ctrl-C on
    process 0 then ends every process."""
    (port,) = free_ports(1)
    follower = cli(*headless_args(tiny_ckpt, tmp_path / "f"), *group_args(port, 1))
    driver = cli(*headless_args(tiny_ckpt, tmp_path / "d"), *group_args(port, 0))
    alone = cli(*headless_args(tiny_ckpt, tmp_path / "a"), devices=8)
    try:
        driver.stdin.write(TURNS)
        driver.stdin.flush()
        replies = [json.loads(driver.stdout.readline()) for _ in range(3)]
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=30)
        follower.wait(timeout=30)
        alone_out, alone_err = alone.communicate(TURNS, timeout=TIMEOUT_S)
    finally:
        for p in (driver, follower, alone):
            p.kill()
    assert (driver.returncode, follower.returncode, alone.returncode) == (130, 0, 0), alone_err
    expected = [json.loads(line) for line in alone_out.splitlines()]
    assert [r["text"] for r in replies] == [r["text"] for r in expected] and len(expected) == 3
    assert [r["prefilled_tokens"] for r in replies] == [r["prefilled_tokens"] for r in expected]
    assert driver.stdout.read() == ""  # nothing but the replies on stdout


def test_dead_follower_ends_the_driver_with_one_line(tiny_ckpt, tmp_path):
    (port,) = free_ports(1)
    follower = cli(*headless_args(tiny_ckpt, tmp_path / "f"), *group_args(port, 1))
    driver = cli(*headless_args(tiny_ckpt, tmp_path / "d"), *group_args(port, 0))
    try:
        driver.stdin.write(TURNS.splitlines(keepends=True)[0])
        driver.stdin.flush()
        assert json.loads(driver.stdout.readline())["finish_reason"] in ("stop", "length")
        follower.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        driver.wait(timeout=60)
        took = time.monotonic() - killed
        err = driver.stderr.read()
    finally:
        for p in (driver, follower):
            p.kill()
    assert driver.returncode == 1 and took < 16, (driver.returncode, took)
    # Gloo (XLA's CPU collectives) logs its connections on stderr, from several threads: a line of it can
    # come broken in two ("[Gloo] Rank " and "2 is connected to 3 peer ranks. ...")
    lines = [line for line in err.splitlines() if line and not line.startswith("[Gloo]") and "peer ranks" not in line]
    assert lines == ["mixtral-chat: error: process 1 stopped responding (no sign of life for 10 s); every process stops"]


def test_follower_that_never_starts_or_differs(tiny_ckpt, tmp_path):
    """A driver alone gives up after 15 s; a follower with another context length is refused, and so
    is the group."""
    lonely_port, port = free_ports(2)
    alone = cli(*headless_args(tiny_ckpt, tmp_path / "d"), *group_args(lonely_port, 0))
    follower = cli(*headless_args(tiny_ckpt, tmp_path / "f"), "--context-length", "256", *group_args(port, 1))
    driver = cli(*headless_args(tiny_ckpt, tmp_path / "d2"), *group_args(port, 0))
    try:
        started = time.monotonic()
        _, alone_err = alone.communicate("", timeout=60)
        waited = time.monotonic() - started
        _, driver_err = driver.communicate("", timeout=60)
        _, follower_err = follower.communicate(timeout=60)
    finally:
        for p in (alone, follower, driver):
            p.kill()
    assert alone.returncode == 1 and waited < 25
    assert alone_err.startswith("mixtral-chat: error: not every one of the 2 processes joined within 15 s")
    assert (driver.returncode, follower.returncode) == (1, 1)
    assert driver_err.strip() == ("mixtral-chat: error: process 1 was started with context length 256 (the driver: "
                                  "default): start every process with the same model, --mesh and --context-length")
    assert "refused this process: process 1 was started with context length 256" in follower_err
