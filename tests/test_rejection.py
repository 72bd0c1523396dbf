"""Rejection sampling: the stage keeps only accepted completions (right and well formed, distinct, at most `keep`
per problem), writes exactly those (and the replay tasks' worked solutions) as chat data, fine-tunes on them,
reuses its samples on resume, and says clearly when the model solves nothing."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import documents

from nanoseek import checkpoint, rejection
from nanoseek.cli import build_parser, cmd_rs, from_args
from nanoseek.config import RSConfig
from nanoseek.rejection import rejection_sampling
from nanoseek.tasks import Problem, as_chat, get_task, parse_completion
from nanoseek.tokenizer import Tokenizer

TASKS = '''
from nanoseek.tasks import Problem, Reward, parse_completion

class EvenStart:
    """Right when the completion's first character has an even code point (about half of a random model's
    completions), and always well formed: a rule the test controls."""
    name = "even"

    def sample(self, rng, split, difficulty=None):
        return Problem(f"Problem {rng.randint(0, 999)}", "0")

    def solve(self, problem):
        return "think", "0"

    def score(self, problem, completion):
        right = completion[:1] != "" and ord(completion[0]) % 2 == 0
        return Reward(float(right), 1.0, "even start" if right else "odd start")

class EvenFormed(EvenStart):
    """EvenStart, and well formed only as <reasoning></think><answer>."""

    def score(self, problem, completion):
        formed = float(parse_completion(completion)[2])
        return Reward(super().score(problem, completion).accuracy, formed, "")

class Never(EvenStart):
    def score(self, problem, completion):
        return Reward(0.0, 1.0, "never right")
'''

# what the scripted engine answers to a problem with an even number: 4 accepted (two the same), 1 wrong,
# 1 right but not well formed
EVEN_ANSWERS = ["bright</think>2", "awful</think>3", "bright</think>2", "bold, no answer", "brave</think>6",
                "bold</think>4"]



@pytest.fixture
def tasks(tmp_path):
    file = tmp_path / "tasks.py"
    file.write_text(TASKS)
    return str(file)


FAST = {"max_new_tokens": 6, "batch": 4, "seq": 64, "warmup": 1, "lr": 1e-2, "progress": False, "device": "cpu"}


class ScriptedEngine:
    """Stands in for the engine: a problem with an even number gets EVEN_ANSWERS, an odd one only wrong answers."""

    def __init__(self, model, tokenizer, max_batch=16, dtype=None):
        self.tokenizer = tokenizer

    def generate(self, prompts, params):
        out = []
        for k, prompt in enumerate(prompts):
            number = int(re.search(r"Problem (\d+)", self.tokenizer.decode(prompt)).group(1))
            answers = EVEN_ANSWERS if number % 2 == 0 else ["awful</think>1", "odd</think>2"]
            out.append(SimpleNamespace(text=answers[k % len(answers)], tokens=[], finish_reason="stop"))
        return out


def rendered(tokenizer, question, reasoning, answer):
    return tuple(tokenizer.render_chat(as_chat(Problem(question, "0"), reasoning, answer))[0])


def weights_changed(a, b):
    ta, tb = checkpoint.read_tensors(a), checkpoint.read_tensors(b)
    return any(not torch.equal(ta[k], tb[k]) for k in ta)


def test_keeps_only_accepted_distinct_completions_and_trains_on_exactly_them(random_policy, tasks, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(rejection, "Engine", ScriptedEngine)
    out = tmp_path / "rs"
    result = rejection_sampling({**FAST, "init": random_policy, "task": f"{tasks}:EvenFormed", "out": str(out),
                                 "problems": 6, "samples": 6, "keep": 2, "replay": "", "steps": 2})
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    even = [r for r in lines if int(r["question"].split()[1]) % 2 == 0]
    assert len(lines) == 6 and 0 < len(even) < 6
    for r in lines:
        if r in even:  # duplicates, the wrong answer and the badly formed one are gone; the two shortest kept
            assert r["completions"] == ["bold</think>4", "brave</think>6"] and r["accepted"] == 4
        else:
            assert r["completions"] == [] and r["accepted"] == 0
        assert r["sampled"] == 6
    assert {k: result[k] for k in ("problems", "sampled", "accepted", "kept", "problems_solved")} == {
        "problems": 6, "sampled": 36, "accepted": 4 * len(even), "kept": 2 * len(even), "problems_solved": len(even)}

    tok = Tokenizer.load(random_policy)
    expected = [rendered(tok, r["question"], reasoning, answer)
                for r in even for reasoning, answer in (("bold", "4"), ("brave", "6"))]
    assert sorted(documents(out / "data", tok.bos_id)) == sorted(expected)
    assert result["steps"] == 2 and result["tokens"] == 2 * 4 * 64
    assert weights_changed(random_policy, out / "final")


class StopsOften(rejection.Engine):
    """The real engine, with every odd token id ending a completion: a random model then finishes most of its
    completions within a few tokens, about half of them with an even first character."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_ids = set(range(3, self.model.config.vocab_size, 2))


def test_real_sampling_with_replay_and_resume_without_sampling_again(random_policy, tasks, tmp_path, monkeypatch):
    monkeypatch.setattr(rejection, "Engine", StopsOften)
    opts = {**FAST, "init": random_policy, "task": f"{tasks}:EvenStart", "problems": 8, "samples": 4, "keep": 2,
            "replay": "addition", "replay_problems": 3, "steps": 2, "ckpt_every": 1}
    out = tmp_path / "rs"
    result = rejection_sampling({**opts, "out": str(out)})
    task = get_task(f"{tasks}:EvenStart")
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    kept = [(r["question"], c) for r in lines for c in r["completions"]]
    assert 0 < result["accepted"] < result["sampled"] == 32 and result["kept"] == len(kept)
    for r in lines:
        assert len(r["completions"]) == len(set(r["completions"])) <= min(2, r["accepted"])
        assert all(task.score(Problem(r["question"], "0"), c).accuracy == 1 for c in r["completions"])

    tok = Tokenizer.load(random_policy)
    docs = documents(out / "data", tok.bos_id)
    mine = [rendered(tok, q, *parse_completion(c)[:2]) for q, c in kept]
    assert len(docs) == len(kept) + 3
    others = list(docs)
    for doc in mine:
        others.remove(doc)  # every kept completion is there once
    assert all(re.search(r"\d\+\d\+\d=\d\d", tok.decode(doc)) for doc in others)  # the rest: replayed additions
    assert weights_changed(random_policy, out / "final")

    again = tmp_path / "again"  # the same options sample the same completions
    rejection_sampling({**opts, "out": str(again), "steps": 1})
    assert (again / "samples.jsonl").read_bytes() == (out / "samples.jsonl").read_bytes()

    def no_engine(*args, **kwargs):
        raise AssertionError("resume sampled again")

    monkeypatch.setattr(rejection, "Engine", no_engine)
    samples, manifest = (out / "samples.jsonl").read_bytes(), (out / "data" / "manifest.json").stat().st_mtime_ns
    resumed = rejection_sampling({**opts, "out": str(out), "steps": 3, "resume": True})
    assert (out / "samples.jsonl").read_bytes() == samples
    assert (out / "data" / "manifest.json").stat().st_mtime_ns == manifest
    assert resumed["steps"] == 3 and resumed["seconds_sampling"] == 0.0
    assert {k: resumed[k] for k in ("sampled", "accepted", "kept")} == {k: result[k] for k in
                                                                       ("sampled", "accepted", "kept")}


def test_no_accepted_completion_is_a_clear_error(random_policy, tasks, tmp_path):
    with pytest.raises(ValueError, match="solves none of the 2 sampled problems.*--samples.*--difficulty"):
        rejection_sampling({**FAST, "init": random_policy, "task": f"{tasks}:Never", "out": str(tmp_path / "rs"),
                            "problems": 2, "samples": 2, "replay": ""})
    assert not (tmp_path / "rs" / "final").exists()
    result = rejection_sampling({**FAST, "init": random_policy, "task": f"{tasks}:Never", "out": str(tmp_path / "rp"),
                                 "problems": 2, "samples": 2, "replay": "addition", "replay_problems": 4, "steps": 2})
    assert result["kept"] == 0 and result["steps"] == 2  # a pipeline goes on with the replay alone
    assert (tmp_path / "rp" / "final" / "model.safetensors").exists()


def test_cli_and_options(random_policy, tmp_path):
    args = build_parser().parse_args(["rs", "--init", "ck", "--out", "o", "--samples", "4", "--replay", "",
                                      "--temperature", "0.7", "--no-progress"])
    o = from_args(RSConfig, args)
    assert args.func is cmd_rs and o.samples == 4 and o.replay == [] and o.temperature == 0.7
    assert o.keep == 2 and o.progress is False and o.task == ["countdown"] and o.difficulty == []
    with pytest.raises(ValueError, match="unknown rs options"):
        rejection_sampling({"init": random_policy, "out": str(tmp_path), "group": 8})
    with pytest.raises(ValueError, match="--init"):
        rejection_sampling({"out": str(tmp_path)})
