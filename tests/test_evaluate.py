"""Evaluation beyond greedy pass@1: pass@k on the first k_n problems, truncation counted and warned about, an
automatic token budget from the worked solutions, each problem asked as the second turn of a chat, and what the
report card makes of them."""

import json
import os
import random

import torch

from nanoseek import checkpoint
from nanoseek import evaluate as evaluation
from nanoseek.config import EvalConfig
from nanoseek.evaluate import evaluate, markdown_table, summarize, task_cell, token_budget
from nanoseek.report import chat_section, write_report
from nanoseek.tasks import as_chat, get_task
from nanoseek.tasks.arithmetic import ADDITION_PHRASINGS
from nanoseek.tasks.smalltalk import GREETINGS, THANKS
from nanoseek.tokenizer import Tokenizer


def test_pass_at_k_on_the_first_k_n_problems(random_policy):
    assert {"k_n", "second_turn"} <= set(vars(EvalConfig()))
    results = evaluate([random_policy], ["addition"], n=6, k=2, k_n=3, max_new_tokens=3, device="cpu")
    r = results[random_policy]["addition"]
    assert r["all"]["n"] == 6 and r["all"]["pass@2_n"] == 3 and 0.0 <= r["all"]["pass@2"] <= 1.0
    assert sum(s.get("pass@2_n", 0) for s in r["by_difficulty"].values()) == 3
    assert [e["sample_correct"] is not None for e in r["examples"]] == [True, True, True]


def test_pass_at_1_at_a_temperature_is_one_seeded_sample_a_problem(random_policy, tmp_path):
    common = {"n": 3, "max_new_tokens": 24, "device": "cpu"}
    texts = lambda results: [e["completion"] for e in results[random_policy]["addition"]["examples"]]
    greedy = evaluate([random_policy], ["addition"], **common)
    hot = evaluate([random_policy], ["addition"], temperature=1.0, out=str(tmp_path), **common)
    assert texts(hot) == texts(evaluate([random_policy], ["addition"], temperature=1.0, **common))
    assert texts(hot) != texts(greedy) and hot[random_policy]["addition"]["temperature"] == 1.0
    assert "pass@1 (one sample a problem at temperature 1) with" in (tmp_path / "eval.md").read_text()


def test_truncated_traces_are_counted_and_warned_about(random_policy, tmp_path):
    results = evaluate([random_policy], ["addition"], n=4, max_new_tokens=1, device="cpu", out=str(tmp_path))
    assert results[random_policy]["addition"]["all"]["truncated"] == 1.0
    assert results[random_policy]["addition"]["max_new_tokens"] == 1
    table = markdown_table(results, 1)
    assert "truncated 100%" in table
    warning = [line for line in table.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "100% of" in warning[0] and "addition traces hit max_new_tokens=1" in warning[0]
    assert (tmp_path / "eval.md").read_text() == table


def test_automatic_budget_covers_the_longest_worked_solution(random_policy, tokenizer):
    task = get_task("countdown")
    problems = evaluation.test_problems(task, 4, seed=0)
    longest = 0
    for p in problems:
        full = tokenizer.render_chat(as_chat(p, *task.solve(p)))[0]
        longest = max(longest, len(full) - len(tokenizer.render_chat(p.messages(), add_generation_prompt=True)[0]))
    results = evaluate([random_policy], ["countdown"], n=4, max_new_tokens=0, device="cpu")
    budget = results[random_policy]["countdown"]["max_new_tokens"]
    assert budget >= max(64, longest) and budget == token_budget(task, problems, tokenizer)


def test_tasks_without_worked_solutions_get_the_fallback_budget(tokenizer):
    class Unsolvable:
        def solve(self, problem):
            raise NotImplementedError

    problems = evaluation.test_problems(get_task("addition"), 2)
    assert token_budget(Unsolvable(), problems, tokenizer) == 256
    assert token_budget(object(), problems, tokenizer) == 256


def test_second_turn_asks_after_another_task_and_its_bare_answer(random_policy, monkeypatch):
    seen = []  # (messages, prompt ids) of every generation prompt rendered
    render = Tokenizer.render_chat

    def recording(self, messages, add_generation_prompt=False):
        ids, mask = render(self, messages, add_generation_prompt)
        if add_generation_prompt:
            seen.append((messages, ids, self))
        return ids, mask

    monkeypatch.setattr(Tokenizer, "render_chat", recording)
    results = evaluate([random_policy], ["addition", "countdown"], n=3, max_new_tokens=2, second_turn=True,
                       device="cpu")
    for task in ("addition", "countdown"):
        second = results[random_policy][task]["second_turn"]
        assert second["n"] == 3 and "pass@1_ci" in second and "truncated" in second
    multi = [(m, ids, tok) for m, ids, tok in seen if len(m) == 3]
    assert len(multi) == 6  # each task's 3 problems, once each
    countdown = [p.question for p in evaluation.test_problems(get_task("countdown"), 3, seed=1)]
    addition = [p.question for p in evaluation.test_problems(get_task("addition"), 3, seed=0)]
    for messages, ids, tok in multi:
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert "reasoning_content" not in messages[1] and messages[1]["content"]
        assert ids.count(tok.user_id) == 2 and ids.count(tok.think_id) == 1  # two user turns, no old thinking
    firsts = [m for m, _, _ in multi if m[2]["content"] in addition]  # addition asked second, after countdown
    assert [m[2]["content"] for m in firsts] == addition and [m[0]["content"] for m in firsts] == countdown
    assert "Second turn" in markdown_table(results, 1)


def test_report_shows_rejection_sampling_second_turns_and_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)  # as taskset -c 0,3,5 pins it
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    out = tmp_path / "run"
    paths = {s: str(out / s) for s in ("tokenizer", "pretrain", "sft", "rl", "rs", "eval")}
    row = {"difficulty": 1, "correct": 1.0, "format": 1.0, "truncated": False, "thinking_tokens": 5,
           "sample_correct": None, "question": "What is 1 + 1?", "completion": "1 + 1 = 2</think>2",
           "reason": "correct", "generated_tokens": 7}
    results = {os.path.join(paths[s], "final"): {"addition": evaluation.task_results([row], [row], 1, 64, 1.0)}
               for s in ("rl", "rs")}
    evaluation.write_results(results, 1, paths["eval"])
    os.makedirs(paths["rs"])
    (out / "rs" / "loss.png").write_bytes(b"")
    (out / "stages.json").write_text(json.dumps(
        {"rs": {"seconds": 3.0, "steps": 2, "tokens": 1000, "kept": 5, "sampled": 16}}))
    report = open(write_report({"path": "x.toml", "run": {"out": str(out), "device": "cpu", "dtype": "auto"}},
                               paths)).read()
    assert "| rs | 3 s | 1,000 | 2 | kept 5 of 16 sampled completions |" in report
    assert "![rejection-sampling SFT loss](rs/loss.png)" in report
    assert "| task | checkpoint | first turn pass@1 | second turn pass@1 |" in report
    assert "| addition | rs/final | 100.0% [20.7, 100.0] | 100.0% [20.7, 100.0] |" in report
    assert f"Greedy completions of `{os.path.join(paths['rs'], 'final')}`" in report
    assert " with 3 cores (2 torch threads), torch " in report


def test_chat_replies_end_as_the_terminal_chat_ends_them(random_policy, tmp_path):
    """A greeting, two questions about the model and 20 requests it never trained on, greedy, with the
    repetition stop on: every reply ends (stop, repetition or the limit), and the report counts how."""
    chat = evaluation.chat_replies(random_policy, max_tokens=40, device="cpu")
    replies, kinds = chat["replies"], chat["kinds"]
    assert [r["prompt"] for r in replies[:3]] == ["hello", "who are you?", "what can you do?"] and len(replies) == 23
    assert all(r["finish_reason"] in ("stop", "repetition", "length") and r["tokens"] <= 40 for r in replies)
    text = "\n".join(chat_section({"checkpoint": random_policy, **chat}))
    ends = sum(r["finish_reason"] == "length" for r in replies[3:])
    assert "**you**: hello" in text and f"{ends} ran to the token limit" in text
    # an untrained policy thinks no kind's thought: every smalltalk prompt asked, none recognised, all named
    assert [k["of"] for k in kinds.values()] == [16, 14, 12, 16, 35] and not any(k["right"] for k in kinds.values())
    assert "greeting 0 of 16" in text and "greeting: hello, hi, hey" in text


def test_chat_replies_ask_thanks_after_an_answer(random_policy, monkeypatch):
    """A thanks is asked where people say it, after a question and its answer; the other kinds alone."""
    asked = []
    generate = evaluation.Engine.generate
    monkeypatch.setattr(evaluation.Engine, "generate",
                        lambda self, prompts, params: asked.extend(prompts) or generate(self, prompts, params))
    kinds = evaluation.chat_replies(random_policy, max_tokens=8, device="cpu")["kinds"]
    tokenizer = checkpoint.load(random_policy)[1]
    texts = [tokenizer.decode(p) for p in asked[-sum(k["of"] for k in kinds.values()):]]
    after = [t for t in texts if "What is 340 + 127?" in t]
    assert len(after) == 16 and all(any(f"{thanks}<" in t for t in after) for thanks in ("thank you", "bye"))
    assert "hello<" in "".join(t for t in texts if t not in after)


def test_every_length_pair_is_asked_equally_and_reported_with_the_worst(random_policy):
    problems = evaluation.test_problems(get_task("addition"), 32, seed=0, difficulty=4)
    pairs = [p.data["lengths"] for p in problems]
    assert {pairs.count(f"{x}+{y}") for x in range(1, 5) for y in range(1, 5)} == {2}
    results = evaluate([random_policy], ["addition"], n=32, max_new_tokens=2, device="cpu", difficulty=4)
    r = results[random_policy]["addition"]
    assert sum(s["n"] for s in r["by_lengths"].values()) == sum(s["n"] for s in r["by_phrasing"].values()) == 32
    assert len(r["by_lengths"]) == 16 and set(r["by_phrasing"]) <= set(ADDITION_PHRASINGS)
    table = markdown_table(results, 1)
    assert "addition by digits of the two operands" in table and "| 4+1 |" in table and "| worst |" in table
    assert "addition by phrasing" in table


def test_deep_turns_follow_mixed_conversations_trimmed_to_the_trained_context(random_policy, tokenizer):
    """Turn depth d: the problem after d - 1 earlier turns of mixed kinds (a greeting only first, a thanks only
    after an answer), trimmed as the chat trims; the report shows every depth beside the problem alone."""
    tasks = [get_task("addition"), get_task("countdown")]
    problems = [evaluation.test_problems(t, 6, seed=0, difficulty=d) for t, d in zip(tasks, (4, 3))]
    deep = evaluation.deep_turns(tasks, [4, 3], problems, 6, tokenizer, 192, seed=0)
    assert [len(deep[0][d]) for d in evaluation.DEPTHS] == [2] * 8 + [6]
    assert [j for j, _ in deep[0][10]] == list(range(6))
    for by_depth in deep:
        for asked in by_depth.values():
            for _, messages in asked:
                prompt = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
                assert (len(prompt) + 96 <= 192 or len(messages) == 1) and messages[-1]["role"] == "user"
        assert any(len(m) > 1 for _, m in by_depth[10])  # earlier turns kept where they fit
    history = evaluation.mixed_history(40, tasks, [4, 3], random.Random(0))
    users = [m["content"] for m in history if m["role"] == "user"]
    replies = [m["content"] for m in history if m["role"] == "assistant"]
    assert len(users) == 40 and all("weight" not in m and "reasoning_content" not in m for m in history)
    assert not any(u.lower().rstrip("!.") in GREETINGS for u in users[1:])
    for before, user in zip(replies, users[1:]):
        if user.lower().rstrip("!.") in THANKS:
            assert before[0].isdigit() or before[0] == "("  # an answer to a problem
    results = evaluate([random_policy], ["addition", "countdown"], n=6, max_new_tokens=2, device="cpu", depth_n=6,
                       difficulty={"addition": 4, "countdown": 3})
    r = results[random_policy]["addition"]
    assert list(r["by_depth"]) == [str(d) for d in range(1, 11)] and r["by_depth"]["10"]["n"] == 6
    assert r["deep_replies"]["n"] == 8 * 2 + 6 and r["by_depth"]["1"]["n"] == 6
    assert "Turn depth" in markdown_table(results, 1)


def test_refused_calls_are_counted_apart_from_wrong_steps():
    """A call the calculator refused is reported as refused, not as a step whose result is wrong."""
    row = {"correct": 0.0, "format": 1.0, "truncated": False, "thinking_tokens": 9, "sample_correct": None,
           "steps": 3, "wrong_steps": 1, "refused_calls": 2}
    s = summarize([row, {**row, "wrong_steps": 0, "refused_calls": 0}], 1)
    assert (s["steps"], s["wrong_steps"], s["refused_calls"]) == (6, 1, 2)
    assert ", 1 of 6 steps wrong, 2 calls refused" in task_cell(s, 1)
    assert task_cell(s, 1).count("pass@1") == 0  # pass@1 leads the cell, unnamed, once
