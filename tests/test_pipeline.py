"""End to end: the smoke recipe through every stage, the report, and a final checkpoint that loads in
transformers and answers through the engine."""

import json
import os

import pytest
import torch
from conftest import torchrun
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import nanoseek
from nanoseek import evaluate
from nanoseek.engine import Engine
from nanoseek.pipeline import RecipeError, builtin_recipes, load_recipe, run
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import get_task

hf_logging.set_verbosity_error()

COUNTING_RUN = """
import json, os, sys
from nanoseek import cli, pipeline

calls = []
for name, stage in list(pipeline.STAGE_FUNCS.items()):
    def counted(*args, name=name, stage=stage):
        calls.append(name)
        return stage(*args)
    pipeline.STAGE_FUNCS[name] = counted
code = cli.main(sys.argv[1:])
with open(os.environ["STAGE_CALLS"] + "." + os.environ["RANK"], "w") as f:
    json.dump(calls, f)
sys.exit(code)
"""


def test_smoke_recipe_end_to_end(tmp_path):
    recipe = load_recipe("smoke", {"run.out": str(tmp_path / "run"), "run.device": "cpu"})
    logs = []
    paths = run(recipe, log=logs.append)
    out = tmp_path / "run"
    assert [line for line in logs if line.endswith("running")] == [
        f"[{s}] running" for s in ("tokenizer", "data", "pretrain", "sft", "rl", "rs", "eval", "report")]
    report = (out / "report.md").read_text()
    for section in ("## Stages", "## Held-out accuracy", "## Curves", "## Expert load balance", "## Transcripts",
                    "## Chat"):
        assert section in report
    assert "![pretraining loss](pretrain/loss.png)" in report and (out / "eval" / "eval.png").exists()
    timings = json.loads((out / "stages.json").read_text())
    assert timings["pretrain"]["tokens"] == 30 * 8 * 128 and timings["pretrain"]["params_active"] > 0
    results = json.loads((out / "eval" / "eval.json").read_text())
    assert set(results) == {os.path.join(paths[s], "final") for s in ("pretrain", "sft", "rl", "rs")}
    by_task = results[os.path.join(paths["rl"], "final")]
    assert by_task["countdown"]["second_turn"]["n"] == 16 and by_task["countdown"]["all"]["pass@2_n"] == 8
    assert timings["rs"]["sampled"] == 16 * 4 and "kept" in timings["rs"]
    assert (out / "rs" / "samples.jsonl").exists() and "| rs |" in report
    assert by_task["addition"]["all"]["n"] == 16  # each task at the difficulties the recipe gives it
    assert set(by_task["addition"]["by_difficulty"]) == {"1", "2"}
    assert set(by_task["countdown"]["by_difficulty"]) == {"3"}

    final = out / "rl" / "final"
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(final)
    model, tok = nanoseek.load(final)
    task = get_task("addition")
    problem = evaluate.test_problems(task, 16, seed=0, difficulty=[1, 2])[0]  # the eval stage's first problem
    prompt, _ = tok.render_chat(problem.messages(), add_generation_prompt=True)
    assert hf_tok.apply_chat_template(problem.messages(), add_generation_prompt=True, tokenize=True)[
        "input_ids"] == prompt
    with torch.no_grad():
        ids = torch.tensor([prompt])
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    seq = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=48, temperature=0))[0]
    example = results[str(final)]["addition"]["examples"][0]  # what eval.json says the model answered, and why
    reward = task.score(problem, seq.text)
    assert example["question"] == problem.question and example["completion"] == seq.text
    assert (example["correct"], example["format"], example["reason"]) == (reward.accuracy, reward.format, reward.reason)

    logs.clear()  # a rerun finds every stage complete and only rewrites the report
    run(recipe, log=logs.append)
    assert sum("skipped" in line for line in logs) == 7 and "[report] running" in logs
    logs.clear()
    run(recipe, force=["rl"], log=logs.append)
    assert "[rl] running" in logs and "[sft] complete, skipped (--force sft redoes it)" in logs


def test_two_ranks_run_the_smoke_recipe_with_one_tokenizer_data_and_report(tmp_path, monkeypatch):
    """`nanoseek run` under torchrun on 2 gloo ranks, in bfloat16 autocast as on CUDA: rank 0 alone makes the
    tokenizer and data, evaluates and reports; both ranks train; each stage starts after the one before."""
    script, calls, out = tmp_path / "counting_run.py", tmp_path / "calls", tmp_path / "run"
    script.write_text(COUNTING_RUN)
    monkeypatch.setenv("STAGE_CALLS", str(calls))
    short = ["pretrain.steps=4", "sft.steps=4", "rl.steps=1", "rl.max_new_tokens=16", "rs.problems=4", "rs.steps=1",
             "rs.max_new_tokens=16", "eval.n=4", "eval.k_n=2", "eval.max_new_tokens=16"]  # bf16 is slow on a CPU
    log = torchrun([str(script), "run", "--recipe", "smoke", "--set", f"run.out={out}", "run.device=cpu",
                    "run.dtype=bfloat16", *short], timeout=1800, module=False)
    stages = ["tokenizer", "data", "pretrain", "sft", "rl", "rs", "eval", "report"]
    assert json.loads((tmp_path / "calls.0").read_text()) == stages
    assert json.loads((tmp_path / "calls.1").read_text()) == ["pretrain", "sft", "rl", "rs"]
    assert all(log.count(f"[{s}] running") == 1 for s in stages) and log.count("finished in") == 1
    made = [out / "tokenizer" / "tokenizer.json", out / "data" / "text" / "manifest.json",
            out / "data" / "chat" / "manifest.json", out / "pretrain" / "final", out / "sft" / "final",
            out / "rl" / "final", out / "rs" / "final", out / "eval" / "eval.json", out / "report.md"]
    times = [p.stat().st_mtime for p in made]
    assert times == sorted(times), dict(zip(made, times))
    assert not list(out.glob("*.tmp")) and not list(out.glob("*/*.tmp"))
    assert "device cpu x 2 ranks, compute dtype bfloat16" in (out / "report.md").read_text()
    timings = json.loads((out / "stages.json").read_text())
    assert timings["pretrain"]["tokens"] == 4 * 8 * 128  # the global batch, whatever the ranks
    nanoseek.load(out / "rl" / "final")


def test_recipe_errors_list_what_is_valid(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nsteps = 10\nlearning_rate = 0.1\n")
    with pytest.raises(RecipeError, match=r"unknown keys \['learning_rate'\] in \[pretrain\]; valid keys: .*'lr'"):
        load_recipe(str(bad))
    bad.write_text('[pretrain]\nsteps = "ten"\n')
    with pytest.raises(RecipeError, match=r"\[pretrain\] steps should be int, got 'ten'"):
        load_recipe(str(bad))
    bad.write_text("[training]\nsteps = 1\n")
    with pytest.raises(RecipeError, match=r"unknown section \[training\]"):
        load_recipe(str(bad))
    bad.write_text("[pretrain\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match=r"built-in recipes: \[.*'cpu'.*'smoke'.*run --list"):
        load_recipe("nope")
    recipe = load_recipe("smoke", {"pretrain.steps": 3})
    assert recipe["pretrain"]["steps"] == 3 and recipe["sft"]["steps"] == 20 and recipe["rl"]["mu"] == 1
    with pytest.raises(RecipeError, match=r"\[run\] stages must name training stages once each, in the order"):
        load_recipe("smoke", {"run.stages": ["sft", "pretrain"]})
    with pytest.raises(RecipeError, match=r"\[eval\] stages \['rs'\] are not in \[run\] stages"):
        load_recipe("smoke", {"run.stages": ["pretrain", "sft"], "eval.stages": ["sft", "rs"]})
    counts = load_recipe("smoke", {"data.sft_problems": {"addition": 5, "countdown": 7}})["data"]["sft_problems"]
    assert counts == {"addition": 5, "countdown": 7}
    with pytest.raises(RecipeError, match=r"\[pretrain\] steps should be int"):  # a table only for counts by task
        load_recipe("smoke", {"pretrain.steps": {"addition": 5}})


def test_builtin_recipes_load_and_say_what_they_are_for():
    recipes = builtin_recipes()
    assert {"cpu", "smoke", "gpu-small", "gpu-large", "gpu-chat"} <= set(recipes) and all(recipes.values())
    assert recipes["smoke"] == "every stage in seconds on 2 CPU cores"
    for name in recipes:
        assert os.path.basename(load_recipe(name)["path"]) == f"{name}.toml"


def test_a_recipe_based_on_itself_is_refused(tmp_path):
    loop = tmp_path / "loop.toml"
    loop.write_text(f'base = "{loop}"\n')
    with pytest.raises(RecipeError, match="base must name another recipe"):
        load_recipe(str(loop))


def test_cpu_long_is_the_cpu_recipe_with_longer_training_only():
    cpu, long = load_recipe("cpu"), load_recipe("cpu-long")
    differs = {(section, key) for section in cpu if section != "path"
               for key in cpu[section] if cpu[section][key] != long[section][key]}
    assert differs == {("run", "out"), ("sft", "steps"), ("sft", "unlikelihood"), ("sft", "eval_every"),
                       ("rl", "steps"), ("rl", "eval_every"), ("rl", "ckpt_every")}
    assert long["sft"]["steps"] == 4 * cpu["sft"]["steps"] and long["sft"]["unlikelihood"] > 0


def test_every_set_option_reaches_the_recipe():
    from nanoseek.cli import build_parser

    args = build_parser().parse_args(["run", "--recipe", "smoke", "--set", "run.seed=1", "--set", "run.out=x",
                                      "pretrain.steps=3"])
    assert args.set == ["run.seed=1", "run.out=x", "pretrain.steps=3"]
