"""Unlikelihood on repeated calculator calls: where a call departs from an earlier one, the earlier call's
token is found, and the loss pushes it down."""

import random

import pytest
import torch
from conftest import TINY, random_config

from nanoseek.data import build
from nanoseek.model import DeepSeekV3
from nanoseek.rundir import read_metrics
from nanoseek.tasks import as_chat, get_task
from nanoseek.train import train
from nanoseek.unlikelihood import repeated_call_negatives, repeats_a_call

BEGIN, END = 1, 2
#      0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
IDS = [5, 1, 7, 8, 2, 9, 1, 7, 3, 2, 9, 1, 7, 8, 2, 9]  # calls [7 8] at 1, [7 3] at 6, [7 8] again at 11


def negatives(trained=None, docs=None):
    x = torch.tensor([IDS[:-1]])
    y = torch.tensor([IDS[1:]])
    if trained is not None:
        y = y.masked_fill(~torch.tensor([trained]), -100)
    found = repeated_call_negatives(x, y, None if docs is None else torch.tensor([docs[:-1]]), BEGIN, END)
    return {i: int(t) for i, t in enumerate(found[0].tolist()) if t != -100}


def test_a_call_that_departs_from_an_earlier_one_gets_the_earlier_token_as_negative():
    # [7 3] departs from [7 8] where 8 would come (predicted at position 7); the third call repeats the first
    # (nothing to push down against it) and departs from the second where 3 would come (position 12)
    assert negatives() == {7: 8, 12: 3}


def test_a_call_made_again_token_for_token_is_a_repeat():
    assert repeats_a_call(IDS, BEGIN, END)  # [7 8] at 1 and again at 11
    assert not repeats_a_call(IDS[:11], BEGIN, END)
    assert not repeats_a_call(IDS[:14], BEGIN, END)  # the third call is cut before its end
    assert not repeats_a_call([1, 7, 8, 2, 1, 7, 8, 9, 2], BEGIN, END)  # [7 8 9] is another call


def test_calls_of_other_documents_and_untrained_positions_get_none():
    assert negatives(docs=[0] * 5 + [1] * 11) == {12: 3}  # the first call is another document's
    trained = [True] * 15
    trained[7] = False
    assert negatives(trained) == {12: 3}


def test_the_loss_adds_the_weighted_unlikelihood_of_the_negatives():
    torch.manual_seed(0)
    model = DeepSeekV3(random_config(1))
    model.init_weights(0)
    model.eval()
    x = torch.randint(3, model.config.vocab_size, (2, 12))
    y = torch.randint(3, model.config.vocab_size, (2, 12))
    neg = torch.full_like(y, -100)
    neg[0, 4], neg[1, 7] = 11, 13
    _, plain, _ = model(x, targets=y)
    _, with_ul, _ = model(x, targets=y, negatives=neg, unlikelihood=0.5)
    with torch.no_grad():
        p = model(x).float().softmax(-1)
    expected = -(torch.log1p(-p[0, 4, 11]) + torch.log1p(-p[1, 7, 13])) / y.numel()
    assert float((with_ul - plain).detach()) == pytest.approx(0.5 * float(expected), abs=1e-6)
    (with_ul - plain).backward()  # the term alone: a small step down its gradient lowers p(negative)
    with torch.no_grad():
        for w in model.parameters():
            if w.grad is not None:
                w -= 1e-2 * w.grad / (w.grad.norm() + 1e-12)
        q = model(x).float().softmax(-1)
    assert float(q[0, 4, 11] * q[1, 7, 13]) < float(p[0, 4, 11] * p[1, 7, 13])


def test_sft_trains_with_it_only_where_traces_call_the_calculator(tokenizer, text_data, chat_data, tmp_path):
    task, rng = get_task("countdown"), random.Random(0)
    docs = []
    for _ in range(120):
        problem = task.sample(rng, "train", 3)
        docs.append(("chat", as_chat(problem, *task.solve(problem))))
    data = tmp_path / "countdown"
    build(None, tokenizer, data, val_fraction=0.05, documents=docs)
    train({**TINY, "data": text_data, "out": str(tmp_path / "pt"), "steps": 2}, "pretrain")

    def first_step(data_dir, weight):
        out = tmp_path / f"sft-{len(list(tmp_path.iterdir()))}"
        train({**TINY, "data": str(data_dir), "out": str(out), "steps": 1, "seq": 128, "unlikelihood": weight,
               "init": str(tmp_path / "pt" / "final")}, "sft")
        return read_metrics(out / "metrics.jsonl")[0]["main_loss"]

    assert first_step(data, 1.0) > first_step(data, 0.0)  # searches with misses: negatives to push down
    assert first_step(chat_data, 1.0) == first_step(chat_data, 0.0)  # additions, no calls: nothing added
