"""The MTP stage: the model's own greedy answers become the data, and only the MTP module learns from them."""

import random

import pytest
from conftest import documents

from nanoseek import checkpoint
from nanoseek.engine import Engine
from nanoseek.mtp import align_mtp
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import as_chat, get_task, parse_completion
from nanoseek.train import train

SUMS = '''
from nanoseek.tasks import Problem, Reward

class Sum:
    """Two-digit sums asked as the test chat model learned them."""
    name = "sum"

    def sample(self, rng, split, difficulty=None):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return Problem(f"What is {a} + {b}?", str(a + b))

    def solve(self, problem):
        a, b = problem.question[8:-1].split(" + ")
        return f"{a} + {b} = {problem.answer}", problem.answer

    def score(self, problem, completion):
        return Reward(float(completion.split("</think>")[-1].strip() == problem.answer), 1.0, "")
'''

FAST = {"max_new_tokens": 24, "batch": 4, "seq": 64, "warmup": 1, "lr": 1e-2, "progress": False, "device": "cpu",
        "turns": 1, "problems": 12}


@pytest.fixture
def sums(tmp_path):
    file = tmp_path / "sums.py"
    file.write_text(SUMS)
    return f"{file}:Sum"


def test_mtp_stage_trains_the_mtp_module_alone_on_the_models_own_answers(chat_model, sums, tmp_path):
    out = tmp_path / "mtp"
    result = align_mtp({**FAST, "init": chat_model, "task": sums, "out": str(out), "steps": 3})

    model, tok = checkpoint.load(chat_model)
    task = get_task(sums)
    rng = random.Random(0)
    problems = [task.sample(rng, "train") for _ in range(12)]
    answers = Engine(model, tok, max_batch=12).generate(
        [tok.render_chat(p.messages(), add_generation_prompt=True)[0] for p in problems],
        SamplingParams(max_tokens=24, temperature=0))
    expected = sorted(tuple(tok.render_chat(as_chat(p, *parse_completion(s.text)[:2]))[0])
                      for p, s in zip(problems, answers) if s.finish_reason == "stop")
    assert len(expected) >= 6  # the chat model finishes its sums
    assert sorted(documents(out / "data", tok.bos_id)) == expected
    assert result["conversations"] == len(expected) and result["step"] == 3

    before, after = checkpoint.read_tensors(chat_model), checkpoint.read_tensors(str(out / "final"))
    changed = {k for k in before if not (before[k] == after[k]).all()}
    mtp = f"model.layers.{model.config.num_hidden_layers}."  # the MTP module, after the main layers by name
    assert changed and all(k.startswith(mtp) for k in changed)  # the embedding and head are shared: frozen
    assert mtp + "eh_proj.weight" in changed


def test_mtp_only_needs_an_mtp_module_and_its_loss(chat_model, tmp_path):
    data = tmp_path / "data"
    from nanoseek.data import build

    _, tok = checkpoint.load(chat_model)
    build(None, tok, data, val_fraction=0.5, documents=[("chat", [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}])] * 4)
    opts = {"init": chat_model, "data": str(data), "out": str(tmp_path / "o"), "steps": 1, "batch": 2, "seq": 32,
            "progress": False, "device": "cpu", "mtp_only": True}
    with pytest.raises(ValueError, match="mtp-weight above 0"):
        train({**opts, "mtp_weight": 0.0}, "sft")
