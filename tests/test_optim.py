"""Muon + AdamW: orthogonal updates, experts orthogonalised one by one, AdamW as torch's, exact resume."""

import os
import shutil

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from nanoseek import optim
from nanoseek.hardware import fast_bfloat16
from nanoseek.model import DeepSeekV3, config_for_size
from nanoseek.optim import build_optimizer, muon_scale, newton_schulz
from nanoseek.train import read_metrics, train


def test_batched_newton_schulz_is_per_matrix_newton_schulz():
    g = torch.randn(8, 96, 40, generator=torch.Generator().manual_seed(0))  # (experts, in, out): tall matrices
    bf16 = {"atol": 2e-2, "rtol": 2e-2}  # the iteration may run in bfloat16: batched and single kernels may round apart
    torch.testing.assert_close(newton_schulz(g), torch.stack([newton_schulz(m) for m in g]), **bf16)
    torch.testing.assert_close(newton_schulz(g.mT), torch.stack([newton_schulz(m) for m in g.mT]), **bf16)
    scaled = g * torch.logspace(-3, 3, 8)[:, None, None]  # experts whose gradients differ 10^6 in size
    torch.testing.assert_close(newton_schulz(scaled), newton_schulz(g), **bf16)  # each is normalised on its own


def assert_nearly_orthogonal(update, grad):
    """Most singular values of update near 1 (a random square gradient has a few near 0 that five
    iterations cannot lift), and update close to the polar factor U V^T of grad."""
    singular = torch.linalg.svdvals(update)
    assert singular.quantile(0.1) > 0.5 and singular.max() < 1.3, singular
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(update.flatten(), (u @ vh).flatten(), dim=0) > 0.95


def test_muon_update_of_a_matrix_is_nearly_orthogonal():
    model = DeepSeekV3(config_for_size(2, vocab_size=128)).init_weights(0)
    opt = build_optimizer(model, "muon", lr=1.0, weight_decay=0.0, betas=(0.9, 0.95))
    w = model.model.layers[0].self_attn.o_proj.weight  # a hidden 2-D matrix: Muon's
    expert = model.model.layers[1].mlp.gate_up  # (experts, in, 2 x out): Muon's, [gate | up] expert by expert
    head = model.lm_head.weight  # the output head: AdamW's
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = {p: p.detach().clone() for p in (w, expert, head)}
    opt.step()
    assert_nearly_orthogonal((before[w] - w.detach()) / muon_scale(w.shape), w.grad)  # lr 1, no decay
    inter = expert.shape[-1] // 2
    step = (before[expert] - expert.detach()) / muon_scale((*expert.shape[:-1], inter))
    for e in range(expert.shape[0]):  # each expert's gate and up matrices apart, not the stack as one
        for part in (slice(None, inter), slice(inter, None)):
            assert_nearly_orthogonal(step[e][:, part], expert.grad[e][:, part])
    assert set(opt.state[head]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[w]) == {"momentum_buffer"}


def test_adamw_option_is_torch_fused_adamw():
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ours, theirs = (DeepSeekV3(config_for_size(2, vocab_size=128)).init_weights(0) for _ in range(2))
    opt = build_optimizer(ours, "adamw", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    matrices = [p for p in theirs.parameters() if p.dim() >= 2]
    vectors = [p for p in theirs.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), fused=True)
    for _ in range(3):
        for model, o in ((ours, opt), (theirs, ref)):
            model(x[:, :-1], targets=x[:, 1:])[0].backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_unknown_optimizer_is_a_clear_error():
    model = DeepSeekV3(config_for_size(2, vocab_size=128))
    with pytest.raises(ValueError, match="--optimizer must be one of muon, adamw"):
        build_optimizer(model, "sgd", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))


def test_muon_run_resumed_half_way_equals_the_uninterrupted_run(text_data, tmp_path):
    opts = {**TINY, "data": text_data, "steps": 8, "optimizer": "muon", "mtp_weight": 0.3}
    train({**opts, "out": str(tmp_path / "straight"), "ckpt_every": 0}, "pretrain")
    resumed = tmp_path / "resumed"
    train({**opts, "out": str(resumed), "ckpt_every": 4}, "pretrain")
    state = load_file(resumed / "step_000004" / "trainer_state" / "optimizer.safetensors")
    assert any(k.endswith(".mlp.gate_up.momentum_buffer") for k in state)  # the experts' Muon momentum is saved
    shutil.rmtree(resumed / "final")
    train({**opts, "out": str(resumed), "ckpt_every": 4, "resume": True}, "pretrain")  # steps 5..8 again
    straight_w = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed_w = load_file(resumed / "final" / "model.safetensors")
    assert straight_w.keys() == resumed_w.keys()
    assert all(torch.equal(straight_w[k], resumed_w[k]) for k in straight_w)  # bit for bit
    loss = lambda out: [r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))]  # noqa: E731
    assert loss(resumed) == loss(tmp_path / "straight")


def test_resuming_with_the_other_optimizer_is_a_clear_error(text_data, tmp_path):
    opts = {**TINY, "data": text_data, "out": str(tmp_path), "ckpt_every": 2}
    train({**opts, "steps": 2, "optimizer": "adamw"}, "pretrain")
    with pytest.raises(ValueError, match="resume with the --optimizer the run started with"):
        train({**opts, "steps": 4, "optimizer": "muon", "resume": True}, "pretrain")


def test_newton_schulz_runs_in_float32_where_bfloat16_is_emulated(monkeypatch):
    """On a CPU without bfloat16 units the iteration runs in float32 (bfloat16 there is ~17x slower); where
    bfloat16 is fast it runs in bfloat16, as the reference Muon does. Either way the result is near-orthogonal."""
    g = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(0))
    results = {}
    for fast in (False, True):
        monkeypatch.setattr(optim, "fast_bfloat16", lambda device_type, fast=fast: fast)
        results[fast] = optim.newton_schulz(g)
        singular = torch.linalg.svdvals(results[fast])
        assert results[fast].dtype == torch.float32 and 0.5 < singular.min() and singular.max() < 1.3
    assert not torch.equal(results[False], results[True])  # float32 and bfloat16 round differently
    assert fast_bfloat16("cuda") and fast_bfloat16("cpu") in (True, False)
