"""Multi-node training as README launches it: two `torchrun` agents (`--nnodes 2`, one process
each, c10d rendezvous on 127.0.0.1, gloo on the CPU) train the same weights as one process
accumulating the same global batch (micro_batch × grad_accum × world size)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sllm.run import load_latest

from .test_distributed import _train_args as distributed_train_args

STEPS = 6
TIMEOUT_S = 240


def _train_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """test_distributed's tiny run, shorter, with no evaluation."""
    shorter = (f"train.max_steps={STEPS}", f"train.checkpoint_interval={STEPS}", "train.eval_interval=0")
    return distributed_train_args(data_dir, run_dir, *shorter, "train.dist_timeout_s=60", *extra)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _agent(port: int, train_args: list[str]) -> list[str]:
    """README's command for each node. No --node-rank: c10d numbers the nodes itself (torchrun
    ignores the flag with a warning)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"sllm-test-{port}",
        "-m", "sllm", *train_args,
    ]  # fmt: skip


def _workers(agent: subprocess.Popen) -> list[int]:
    """The agent's worker processes (torchrun starts each in its own session, so they must be
    named one by one to be sure they end)."""
    children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in children.split()]


def _stop(agents: list[subprocess.Popen]) -> None:
    """End agents still running and their workers: SIGTERM (the agent stops its workers), then
    SIGKILL for whatever is left after a grace period."""
    running = [agent for agent in agents if agent.poll() is None]
    workers = [pid for agent in running for pid in _workers(agent)]
    for agent in running:
        agent.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for agent in running:
        try:
            agent.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            agent.kill()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):  # it ended with its agent
            os.kill(pid, signal.SIGKILL)


def _run_two_agents(train_args: list[str], log_dir: Path) -> list[tuple[int, str]]:
    """Both agents' exit codes and output; they are stopped (and the output says so) if not
    done within TIMEOUT_S."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(log_dir / f"node{node}.log", "w+") for node in (0, 1)]  # noqa: SIM115
    agents: list[subprocess.Popen] = []
    try:
        for log in logs:
            agents.append(
                subprocess.Popen(_agent(port, train_args), stdout=log, stderr=subprocess.STDOUT, env=env)
            )
        deadline = time.monotonic() + TIMEOUT_S
        for agent in agents:
            agent.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for log in logs:
            log.write(f"\n[test] stopped after {TIMEOUT_S} s\n")
    finally:
        _stop(agents)
    results = []
    for agent, log in zip(agents, logs, strict=True):
        log.seek(0)
        results.append((agent.returncode, log.read()))
        log.close()
    return results


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(load_latest(run_dir).path / "model.safetensors")


def test_two_torchrun_agents_train_the_weights_of_one_process_with_the_same_global_batch(
    tmp_path, prepared_dir
):
    results = _run_two_agents(_train_args(prepared_dir, tmp_path / "two-nodes"), tmp_path)
    for node, (code, output) in enumerate(results):
        assert code == 0, f"node {node} exited with {code}:\n{output[-3000:]}"
    one = subprocess.run(
        [sys.executable, "-m", "sllm", *_train_args(prepared_dir, tmp_path / "one", "train.grad_accum=2")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr
    assert load_latest(tmp_path / "two-nodes").path.name == f"step-{STEPS:06d}"
    reference, trained = _weights(tmp_path / "one"), _weights(tmp_path / "two-nodes")
    assert reference.keys() == trained.keys()
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], rtol=0, atol=1e-5)
