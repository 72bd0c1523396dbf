"""`nanoseek plan`: the activation count against what autograd keeps, the GPU recipes sized to fit, and
refusals that name the fix, before any work."""

import os

import pytest
import torch

from nanoseek import hardware
from nanoseek.hardware import GPUS, gpu_named
from nanoseek.model import DeepSeekV3, config_for_size
from nanoseek.pipeline import load_recipe, main_run
from nanoseek.plan import PlanError, activation_bytes, device_for, plan, plan_recipe


def kept_for_backward(model, rows, seq, mtp_weight):
    """Bytes of the tensors autograd keeps for the backward of one training forward, weights excluded."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, model.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    docs = (torch.arange(seq) // 40).expand(rows, seq)  # packed documents, as the loader makes rows
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, targets=x, mtp_weight=mtp_weight, document_ids=docs)
    return sum(kept.values())


@pytest.mark.parametrize("size, mtp_weight", [(4, 0.3), (10, 0.0)])
def test_activation_count_matches_what_autograd_keeps(size, mtp_weight):
    """fp32 on the CPU (attention probabilities kept per head), a CPU size and a GPU size (q low-rank, 16
    experts): within 15%."""
    model = DeepSeekV3(config_for_size(size, vocab_size=1024)).init_weights(0).train()
    measured = kept_for_backward(model, 2, 128, mtp_weight)
    estimate = activation_bytes(model.config, 2, 128, 4, True, mtp_weight > 0)
    assert 0.85 < estimate / measured < 1.15, (estimate, measured)


def test_activation_count_under_bf16_autocast():
    """The bytes a token adds (the difference of 4 and 2 rows: autocast's bf16 copies of the weights are the
    same for both) within 20%."""
    model = DeepSeekV3(config_for_size(4, vocab_size=1024)).init_weights(0).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = kept_for_backward(model, 4, 128, 0.3) - kept_for_backward(model, 2, 128, 0.3)
    estimate = activation_bytes(model.config, 2, 128, 2, True, True)
    assert 0.8 < estimate / measured < 1.2, (estimate, measured)


def test_gpu_recipes_fit_80_gb():
    """gpu-small on one H100, gpu-large on eight, gpu-chat on one or eight (its device_batch caps the rows a
    forward holds, so it serves any number of ranks)."""
    for name, gpus in (("gpu-small", 1), ("gpu-large", 8), ("gpu-chat", 1), ("gpu-chat", 8)):
        recipe = load_recipe(name)
        rows = plan(recipe, device_for("H100", gpus))
        assert [r["stage"] for r in rows] == recipe["run"]["stages"]
        assert all(0 < r["peak"] < 80 * 2**30 for r in rows), [(r["stage"], r["peak"] / 2**30) for r in rows]
        text, problem = plan_recipe(recipe, "H100", gpus)
        assert problem is None and "| rl | micro_batch" in text and "training time at 40% MFU" in text


def test_a_stage_that_cannot_fit_is_refused_with_the_fix():
    recipe = load_recipe("gpu-small", {"rl.micro_batch": 0})  # all 512 rollouts in one forward
    _, problem = plan_recipe(recipe, "H100")
    assert problem.startswith("rl needs") and "set [rl] micro_batch = " in problem
    fix = int(problem.split("micro_batch = ")[1].split()[0])
    assert plan_recipe(load_recipe("gpu-small", {"rl.micro_batch": fix}), "H100")[1] is None
    _, problem = plan_recipe(load_recipe("gpu-small"), "L4")
    assert "set [pretrain] device_batch = " in problem
    fix = int(problem.split("device_batch = ")[1].split()[0])
    assert 128 % fix == 0  # a divisor of the rows per rank
    with pytest.raises(PlanError, match="unknown GPU"):
        device_for("Voodoo 3")
    with pytest.raises(PlanError, match="1 or more GPUs"):
        device_for("H100", 0)


def test_gpu_names_as_drivers_report_them():
    assert gpu_named("NVIDIA H100 80GB HBM3") == "H100" and gpu_named("NVIDIA L40S") == "L40S"
    assert gpu_named("NVIDIA L4") == "L4" and gpu_named("NVIDIA GeForce RTX 4090") == "RTX 4090"
    assert gpu_named("NVIDIA H200") == "H200" and gpu_named("Tesla T4") is None
    assert set(GPUS) >= {"H100", "H200", "A100", "L4", "RTX 4090"}


def test_run_refuses_a_recipe_that_cannot_fit_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(PlanError, match="device_batch"):
        main_run("smoke", overrides={"run.out": str(out), "run.device": "cpu", "pretrain.batch": 2**20,
                                     "pretrain.seq": 4096})
    assert "| pretrain | device_batch" in capsys.readouterr().out  # the plan is printed first
    assert not os.path.exists(out)


def test_a_slow_dtype_is_measured_at_a_smaller_size(monkeypatch):
    """The peak's matmul grows from 128 while ten of the next size fit in half a second: a dtype whose matmuls
    take a second each (bfloat16 emulated on a CPU) is measured small, a fast one at 1024."""
    sizes = []

    def fake_seconds(device, dtype, n, reps):
        sizes.append(n)
        per_flop = 1e-9 if dtype == torch.bfloat16 else 1e-11
        return [2 * n**3 * per_flop] * reps

    monkeypatch.setattr(hardware, "matmul_seconds", fake_seconds)
    assert hardware.matmul_peak_flops.__wrapped__("cpu", torch.float32) == pytest.approx(1e11)
    assert max(sizes) == 1024
    sizes.clear()
    assert hardware.matmul_peak_flops.__wrapped__("cpu", torch.bfloat16) == pytest.approx(1e9)
    assert max(sizes) == 256  # ten of 512 would take 2.7 s
