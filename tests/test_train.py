"""The training loop: learns, resumes exactly, survives kills, scales to ranks, balances experts."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY, torchrun

import nanoseek
from nanoseek import checkpoint
from nanoseek.config import TrainConfig
from nanoseek.data import DataError, build
from nanoseek.model import DeepSeekV3, config_for_size
from nanoseek.rundir import checkpoints_in, read_metrics
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train import Trainer, TrainingError, lr_at, train


def run(data, out, mode="pretrain", **options):
    return train({**TINY, "data": data, "out": str(out), **options}, mode)


def cli(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nanoseek", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def cli_args(data, out, steps, **options):
    opts = {**TINY, "data": data, "out": str(out), "steps": steps, **options}
    args = ["pretrain"]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)]
    return args


def losses(out):
    return [r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))]


def test_overfits_a_small_batch(text_data, tmp_path, monkeypatch):
    from nanoseek import train as train_module

    original = train_module.Loader.next_batch
    fixed = {}
    monkeypatch.setattr(train_module.Loader, "next_batch", lambda self: fixed.setdefault("b", original(self)))
    last = run(text_data, tmp_path, steps=60, lr=1e-2, warmup=5, mtp_weight=0.0)
    assert losses(tmp_path)[0] > 4.0 and last["main_loss"] < 0.5


def test_schedules():
    o = type("O", (), {"lr": 1.0, "warmup": 10, "steps": 100, "min_lr_ratio": 0.1, "schedule": "cosine",
                       "decay_frac": 0.2})
    assert lr_at(0, o) == pytest.approx(0.1) and lr_at(9, o) == pytest.approx(1.0)
    assert lr_at(99, o) == pytest.approx(0.1, abs=1e-3) and 0.1 < lr_at(50, o) < 1.0
    o.schedule = "wsd"
    assert lr_at(50, o) == 1.0 and lr_at(79, o) == 1.0 and lr_at(99, o) == pytest.approx(0.1)


def test_resume_after_sigkill_gives_the_same_losses(text_data, tmp_path):
    straight = tmp_path / "straight"  # every run in a subprocess with one thread: same arithmetic order
    assert cli(*cli_args(text_data, straight, 12, ckpt_every=0, eval_every=0)).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    proc = cli(*cli_args(text_data, killed, 12, ckpt_every=3, eval_every=0))
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # kill it hard once it is past half way
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()
    assert 3 <= checkpoints_in(str(killed))[-1][0] < 12
    assert cli(*cli_args(text_data, killed, 12, ckpt_every=3, eval_every=0, resume=True)).wait(timeout=300) == 0
    assert losses(killed) == losses(straight)  # exact, step by step


def test_sigkill_during_checkpoint_writes_never_damages_checkpoints(text_data, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(0)
    newest = lambda: max((step for step, _ in checkpoints_in(str(out))), default=0)  # noqa: E731
    for attempt in range(4):
        before, deadline = newest(), time.time() + 300
        proc = cli(*cli_args(text_data, out, 1_000_000, ckpt_every=1, keep=3, eval_every=0, resume=True))
        while newest() <= before:  # until this run has saved a checkpoint of its own, however slow the machine
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"attempt {attempt}: no checkpoint in 300 s: {proc.communicate(timeout=60)[0]}")
            time.sleep(0.05)
        time.sleep(rng.random() * 2)  # checkpointing every step: most kills land inside a write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        found = checkpoints_in(str(out))
        assert found, f"attempt {attempt}: no checkpoint survived"
        for _, path in found:
            nanoseek.load(path)  # every checkpoint on disk is whole
    leftovers = [n for n in os.listdir(out) if n.startswith(".")]
    step = checkpoints_in(str(out))[-1][0]
    run(text_data, out, steps=step + 2, ckpt_every=1, resume=True)
    assert checkpoints_in(str(out))[-1][0] == step + 2
    assert all(n.startswith(".step_") for n in leftovers)  # only abandoned temporary directories


def test_sigterm_writes_a_checkpoint_and_exits(text_data, tmp_path):
    proc = cli(*cli_args(text_data, tmp_path, 10_000, ckpt_every=0, eval_every=0))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"training ended or stalled before step 3: {proc.communicate(timeout=60)[0]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun with --resume" in out
    step = checkpoints_in(str(tmp_path))[-1][0]
    assert step >= 3 and step == len(read_metrics(metrics))


@pytest.mark.parametrize("sharding, mtp_weight, device_batch", [("ddp", 0.3, 2), ("fsdp", 0.3, 0), ("ddp", 0.0, 0)])
def test_two_gloo_ranks_match_one_process(text_data, tmp_path, sharding, mtp_weight, device_batch):
    """Two ranks (each in two micro-steps for device_batch 2, the gradient all-reduced on the last only) train
    as one process does."""
    run(text_data, tmp_path / "one", steps=6, batch=8, mtp_weight=mtp_weight)
    two = tmp_path / "two"
    if sharding == "fsdp":  # stop half way and resume, so sharded checkpoints are exercised too
        out = torchrun(cli_args(text_data, two, 3, batch=8, mtp_weight=mtp_weight, fsdp=True))
        assert out.count("pretrain finished") == 1  # only rank 0 speaks
        torchrun(cli_args(text_data, two, 6, batch=8, mtp_weight=mtp_weight, fsdp=True, resume=True))
        nanoseek.load(two / "final")
    else:  # mtp_weight 0: the MTP weights get no gradient, which DDP must be told
        torchrun(cli_args(text_data, two, 6, batch=8, mtp_weight=mtp_weight, device_batch=device_batch))
    one, two = losses(tmp_path / "one"), losses(two)
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) / abs(a) < 1e-4


def test_micro_batch_does_not_change_training(text_data, tmp_path):
    """batch 8 in one forward, in 4 of 2 rows and in 8 of 1: the same losses, gradient norms and held-out loss
    step by step (Muon's orthogonalised steps make raw weights a poor thing to compare: they blow float noise
    in small singular directions up to a step's size)."""
    runs = []
    for device_batch in (0, 2, 1):
        out = tmp_path / f"db{device_batch}"
        run(text_data, out, steps=4, batch=8, device_batch=device_batch, eval_every=2)
        rows = read_metrics(os.path.join(out, "metrics.jsonl"))
        runs.append([(r["loss"], r["grad_norm"], r.get("val_loss", 0.0)) for r in rows])
    assert len(runs[0]) == 4 and runs[0][-1][2] > 0
    for other in runs[1:]:
        assert [v for row in other for v in row] == pytest.approx([v for row in runs[0] for v in row], rel=1e-3)
    with pytest.raises(ValueError, match="pick a divisor of 8"):
        run(text_data, tmp_path / "bad", steps=1, batch=8, device_batch=3)
    with pytest.raises(ValueError, match="rows per forward"):
        run(text_data, tmp_path / "bad", steps=1, batch=8, device_batch=-1)


def test_bias_update_lowers_expert_imbalance(text_data, tmp_path):
    def imbalance(gamma):
        out = tmp_path / f"g{gamma}"
        run(text_data, out, steps=40, bias_update_speed=gamma, mtp_weight=0.0)
        rows = read_metrics(out / "metrics.jsonl")[-10:]
        return sum(sum(r["expert_imbalance"]) / len(r["expert_imbalance"]) for r in rows) / len(rows)

    balanced, free = imbalance(0.01), imbalance(0.0)
    assert balanced < 0.8 * free, (balanced, free)


def test_sequence_balance_loss_enters_the_loss_and_the_update(text_data, tmp_path):
    def rows(alpha):
        run(text_data, tmp_path / str(alpha), steps=2, balance_alpha=alpha, mtp_weight=0.0)
        return read_metrics(tmp_path / str(alpha) / "metrics.jsonl")

    off, small, large = rows(0.0), rows(0.1), rows(0.2)
    assert off[0]["main_loss"] == small[0]["main_loss"] == large[0]["main_loss"]  # same weights, same batch
    assert off[0]["loss"] == off[0]["main_loss"]
    balance = (small[0]["loss"] - small[0]["main_loss"]) / 0.1  # the loss is main_loss + alpha * balance
    assert balance > 0.5 and large[0]["loss"] - large[0]["main_loss"] == pytest.approx(0.2 * balance, rel=1e-4)
    assert off[1]["main_loss"] != large[1]["main_loss"]  # its gradient changed the first update


def test_sft_learns_on_chat_data(chat_data, text_data, tmp_path):
    run(text_data, tmp_path / "pt", steps=4)
    last = run(chat_data, tmp_path / "sft", mode="sft", steps=20, init=str(tmp_path / "pt" / "final"), seq=64)
    rows = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert last["main_loss"] < rows[0]["main_loss"]
    meta = json.load(open(tmp_path / "sft" / "final" / "nanoseek.json"))
    assert meta["stage"] == "sft" and meta["parent"] == str(tmp_path / "pt" / "final")
    pretrained, tuned = (checkpoint.load_config(tmp_path / stage / "final") for stage in ("pt", "sft"))
    assert (pretrained.trained_context_length, tuned.trained_context_length) == (32, 64)  # each records its seq


def test_wrong_data_kind_tokenizer_and_missing_init(chat_data, text_data, tmp_path):
    with pytest.raises(DataError, match="holds chat data but pretrain trains on text"):
        run(chat_data, tmp_path, steps=1)
    with pytest.raises(ValueError, match="sft needs --init"):
        run(chat_data, tmp_path, mode="sft", steps=1)
    other = train_tokenizer(["completely different text for another vocabulary"] * 10, vocab_size=300)
    checkpoint.save(tmp_path / "other", DeepSeekV3(config_for_size(2, vocab_size=320)).init_weights(0), other)
    with pytest.raises(DataError, match="made with a different tokenizer than the model's"):
        run(chat_data, tmp_path / "sft", mode="sft", steps=1, init=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="unknown training options"):
        run(text_data, tmp_path, steps=1, learning_rate=1)


def test_non_finite_losses_stop_with_a_clear_message(text_data, tmp_path):
    with pytest.raises(TrainingError, match="non-finite steps in a row"):
        run(text_data, tmp_path, steps=20, lr=1e12, warmup=1, clip=0.0, max_bad_steps=3)
    skipped = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("skipped")]
    assert len(skipped) == 3


def test_bits_per_byte_counts_the_bytes_of_the_text(tokenizer, tmp_path):
    text = "12 + 35 = 47."  # 13 bytes; its BOS and EOS stand for no text
    build(None, tokenizer, tmp_path / "data", val_fraction=0.25, documents=[("text", text)] * 20)  # 5 held out
    opts = {**TINY, "data": str(tmp_path / "data"), "out": str(tmp_path / "run"), "steps": 1}
    assert Trainer(TrainConfig(**opts), "pretrain").held_out.bytes == 5 * 13
    last = train(opts, "pretrain")
    targets = 5 * (len(tokenizer.encode(text)) + 1)  # each document's text tokens and its EOS
    assert last["val_bpb"] == pytest.approx(last["val_loss"] * targets / math.log(2) / (5 * 13), rel=1e-6)


def test_plots_and_metrics(text_data, tmp_path):
    run(text_data, tmp_path, steps=4, eval_every=2)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "val_bpb" in rows[1] and "val_bpb" in rows[3] and rows[0]["tokens_per_s"] > 0
    for png in ("loss.png", "experts.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
