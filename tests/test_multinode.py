"""Multi-node for real: two `torchrun` agents (`--nnodes 2`, one process each) meet through a
c10d rendezvous on 127.0.0.1 and train on gloo what one process accumulating two
micro-batches trains, as two machines sharing a run directory would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sllm.run import load_latest

from .test_distributed import _losses, _train_args


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _agent(port: int, is_host: bool, args: list[str]) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=sllm-test",
        f"--rdzv-conf=is_host={int(is_host)}", "-m", "sllm", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_torchrun_agents_equal_one_process_with_accumulation(tmp_path: Path, prepared_dir: Path):
    reference = tmp_path / "one"
    single = subprocess.run(
        [sys.executable, "-m", "sllm", *_train_args(prepared_dir, reference, "train.grad_accum=2")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert single.returncode == 0, single.stderr

    run_dir = tmp_path / "two-nodes"
    port = _free_port()
    agents = [_agent(port, is_host, _train_args(prepared_dir, run_dir)) for is_host in (True, False)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, stderr) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, stderr
    assert sum(stdout.count("val loss") for stdout, _ in outputs) == 1  # only global rank 0 reports

    one, two = _losses(reference), _losses(run_dir)
    assert sorted(one) == sorted(two)
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    a = load_file(load_latest(reference).path / "model.safetensors")
    b = load_file(load_latest(run_dir).path / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
