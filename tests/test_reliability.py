"""Faults: training killed at random moments (checkpoint writes included) resumes onto the very same
trajectory; damaged checkpoints are named, and resume falls back to the one before, out loud.

`make test` runs one kill per stage; `make reliability` sets NANOSEEK_FAULTS=7 (21 kills in all). Every kill
lands however fast the machine is: the killed runs are given more steps than they can reach.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY

from nanoseek.rundir import checkpoints_in, read_metrics
from nanoseek.train import train

KILLS = int(os.environ.get("NANOSEEK_FAULTS", "1"))
UNREACHABLE = 1_000_000  # steps of a run that is to be killed: it cannot finish before its kill
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(stage, data, out, steps, init=None, task=None):
    if stage == "rl":
        args = ["rl", "--init", init, "--task", task, "--out", str(out), "--steps", str(steps), "--prompts", "2",
                "--group", "4", "--max-new-tokens", "12", "--device", "cpu", "--no-progress", "--ckpt-every", "1",
                "--lr", "0.001", "--resume", "--eval-every", "0"]  # the held-out curve: test_rl
    else:
        args = [stage, "--data", data, "--out", str(out), "--steps", str(steps), "--ckpt-every", "1", "--keep", "2",
                "--eval-every", "0", "--no-progress", "--resume", "--min-lr-ratio", "1"]  # no decay: the
        # trajectory does not depend on --steps (GRPO's learning rate is constant too)
        for k in ("size", "batch", "seq", "warmup", "lr", "device"):
            args += [f"--{k}", str(TINY[k])]
        if init:
            args += ["--init", init]
    return [sys.executable, "-m", "nanoseek", *args]


def trajectory(out, key):
    return [(r["step"], r[key]) for r in read_metrics(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def sft_init(text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_init")
    train({**TINY, "data": text_data, "out": str(out), "steps": 2}, "pretrain")
    return str(out / "final")


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rl"])
def test_random_kills_resume_onto_the_same_trajectory(stage, text_data, chat_data, sft_init, chat_model, tmp_path):
    data = {"pretrain": text_data, "sft": chat_data, "rl": None}[stage]
    init = {"pretrain": None, "sft": sft_init, "rl": chat_model}[stage]
    steps, key = (80 if KILLS > 1 else 30, "loss") if stage != "rl" else (16 if KILLS > 1 else 8, "reward")
    out, rng = tmp_path / "killed", random.Random(stage)
    metrics, log = out / "metrics.jsonl", tmp_path / "killed.log"
    for kill in range(KILLS):
        with open(log, "w") as f:
            proc = subprocess.Popen(command(stage, data, out, UNREACHABLE, init, "addition"), env=ENV,
                                    stdout=f, stderr=subprocess.STDOUT)
        try:
            lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            deadline = time.time() + 300
            while proc.poll() is None and (len(metrics.read_text().splitlines()) if metrics.exists() else 0) <= lines:
                assert time.time() < deadline, f"kill {kill}: no step in 300 s"
                time.sleep(0.02)  # wait until this run has made a step of its own
            time.sleep(rng.random() * 0.5)  # then a random moment of training or checkpoint writing
            assert proc.poll() is None, f"kill {kill}: the run ended before it:\n{log.read_text()[-3000:]}"
            proc.send_signal(signal.SIGKILL)  # lands: the run is under way, training or saving
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    steps = max(steps, checkpoints_in(str(out))[-1][0] + 1)  # a fast machine may have gone past `steps`
    result = subprocess.run(command(stage, data, out, steps, init, "addition"), env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    straight = tmp_path / "straight"
    assert subprocess.run(command(stage, data, straight, steps, init, "addition"), env=ENV,
                          capture_output=True, timeout=600).returncode == 0
    assert [s for s, _ in trajectory(out, key)] == list(range(1, steps + 1))
    assert trajectory(out, key) == trajectory(straight, key)
    print(f"{stage}: {KILLS} SIGKILLs, trajectory of {steps} steps identical to the uninterrupted run")


def test_damaged_checkpoints_fall_back_out_loud(text_data, tmp_path, monkeypatch):
    opts = {**TINY, "data": text_data, "out": str(tmp_path), "ckpt_every": 2, "keep": 3}
    train({**opts, "steps": 6}, "pretrain")
    weights = tmp_path / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    (tmp_path / "step_000004" / "trainer_state" / "optimizer.safetensors").write_bytes(b"\x00" * 64)
    lines = []
    from nanoseek import train as train_module

    original = train_module.resume_point
    monkeypatch.setattr(train_module, "resume_point", lambda out, say=print: original(out, say=lines.append))
    last = train({**opts, "steps": 8, "resume": True}, "pretrain")
    assert "final/model.safetensors" in lines[0] and "damaged or truncated" in lines[0]
    assert "step_000004/trainer_state/optimizer.safetensors" in lines[1]  # then step_000002 resumes
    assert last["step"] == 8
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))
