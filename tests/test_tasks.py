"""Tasks: disjoint splits, worked solutions that score, and rewards for crafted completions."""

import json
import random
import re
from collections import Counter
from dataclasses import replace

import pytest

from nanoseek.tasks import (
    as_chat,
    builtin_tasks,
    chat_documents,
    get_task,
    parse_completion,
    split_of,
    task_documents,
)
from nanoseek.tasks.arithmetic import ADDITION_PHRASINGS
from nanoseek.tasks.countdown import MISSES, evaluate_expression, expressions, refused_calls, steps_right
from nanoseek.tasks.countdown import PHRASINGS as COUNTDOWN_PHRASINGS
from nanoseek.tasks.smalltalk import HELD_OUT_PROMPTS, smalltalk_turn, thought_kind
from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, split_thinking


@pytest.mark.parametrize("name", sorted(builtin_tasks()))
def test_splits_never_overlap_and_solutions_score(name):
    task = get_task(name)
    rng = random.Random(0)
    train = {task.sample(rng, "train").key for _ in range(1500)}  # the problem, whatever its phrasing
    test = {task.sample(rng, "test").key for _ in range(300)}
    assert train and test and not train & test
    for d in task.difficulties:
        p = task.sample(rng, "train", d)
        reasoning, answer = task.solve(p)
        assert reasoning.strip()
        reward = task.score(p, f"{reasoning}\n</think>\n\n{answer}")
        assert (reward.accuracy, reward.format) == (1.0, 1.0), (p, reasoning, answer, reward)


def test_rewards_for_crafted_completions():
    add = get_task("addition")
    p = add.make(random.Random(1), 3)
    right, wrong = p.answer, str(int(p.answer) + 1)
    assert add.score(p, f"steps\n</think>\n\n{right}").accuracy == 1
    assert add.score(p, f"steps\n</think>\n\n{right}.").accuracy == 1
    r = add.score(p, f"steps\n</think>\n\n{wrong}")
    assert (r.accuracy, r.format) == (0, 1) and "expected" in r.reason
    assert add.score(p, f"steps {right}").format == 0  # no </think>
    two = add.score(p, f"a</think>\n{right}</think>\n{right}")  # split at the first: the answer holds the second
    assert (two.accuracy, two.format) == (0, 0) and f"'{right}</think>" in two.reason
    assert add.score(p, "steps\n</think>\n\n").format == 0  # no answer
    assert add.score(p, "steps\n</think>\n\nforty-two").format == 0


@pytest.mark.parametrize("attack", [
    "__import__('os').system('touch pwned')",
    "(lambda: 1)()",
    "open('/etc/passwd')",
    "[1, 2][0] + 3",
    "2 ** 10",
    "9" * 300,
])
def test_countdown_answers_are_parsed_never_run(attack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cd = get_task("countdown")
    p = cd.make(random.Random(3), 3)
    r = cd.score(p, f"search\n</think>\n\n{attack}")
    assert r.accuracy == 0 and r.format == 0 and "not usable" in r.reason
    assert not (tmp_path / "pwned").exists()


def test_countdown_rules():
    cd = get_task("countdown")
    p = cd.make(random.Random(5), 4)
    a, b = p.data["numbers"][:2]
    assert evaluate_expression(f"({a} + {b}) / 1")[1] == [a, b, 1]
    used_twice = f"{a} + {a} + {a} + {a} + {a}"
    assert cd.score(p, f"x\n</think>\n\n{used_twice}").accuracy == 0
    reasoning, answer = cd.solve(p)
    assert cd.score(p, f"{reasoning}\n</think>\n\n{answer} = {p.answer}").accuracy == 1


def test_jsonl_task_and_checkers(tmp_path):
    path = tmp_path / "capitals.jsonl"
    rows = [{"question": f"What is {i} squared?", "answer": str(i * i)} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    exact, numeric = get_task(str(path), "exact"), get_task(str(path), "numeric")
    p = exact.sample(random.Random(0), "test")
    assert exact.score(p, f"x</think>{p.answer}").accuracy == 1
    assert numeric.score(p, f"x</think> {p.answer}.0").accuracy == 1
    assert exact.score(p, f"x</think> {p.answer}.0").accuracy == 0
    train = {exact.sample(random.Random(i), "train").question for i in range(200)}
    assert p.question not in train
    path.write_text('{"q": 1}\n')
    with pytest.raises(ValueError, match=r"capitals.jsonl:1: expected"):
        get_task(str(path))
    with pytest.raises(ValueError, match="unknown checker"):
        get_task(str(tmp_path / "x.jsonl"), "fuzzy")
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")


def test_addition_trace_needs_only_the_line_before():
    """Each column line carries the answer's digits so far: the new digit, then the previous line's digits;
    a last carry is a column of its own, and the answer is the last line's digits."""
    add = get_task("addition")
    rng = random.Random(7)
    for _ in range(200):
        p = add.make(rng, rng.randint(1, 4))
        reasoning, answer = add.solve(p)
        a, b = sorted([p.data["a"], p.data["b"]], reverse=True)
        lines, previous = reasoning.split("\n"), ""
        assert len(lines) == len(str(a + b))  # one line per column of the sum
        for line in lines:
            column, written = line.split(" ")
            x, y, carry_sum = column.split("+")
            carry, total = carry_sum.split("=")
            assert int(x) + int(y) + int(carry) == int(total) and len(total) == 2
            assert written == total[1] + previous
            previous = written
        assert answer == previous == str(a + b) and total[0] == "0"


def test_countdown_trace_of_three_numbers_always_reaches_the_answer():
    """The worked solution never falls back to a bare answer for three numbers; its last attempt is one
    calculator call that takes the answer, of numbers given, from the target; over many problems the hits use
    every operator."""
    cd = get_task("countdown")
    rng = random.Random(11)
    ops = set()
    for _ in range(500):
        p = cd.make(rng, 3)
        reasoning, answer = cd.solve(p)
        assert "..." not in reasoning
        assert cd.score(p, f"{reasoning}\n</think>\n\n{answer}").accuracy == 1
        if reasoning.endswith("is given"):
            continue
        [(expression, value)] = re.findall(f"{re.escape(TOOL_CALL_BEGIN)}(.*?){re.escape(TOOL_CALL_END)}"
                                           f"{re.escape(TOOL_OUTPUT_BEGIN)}(.*?){re.escape(TOOL_OUTPUT_END)}",
                                           reasoning.splitlines()[-1])
        assert expression == f"{p.data['target']}-({answer})" and value == "0"
        ops |= set(answer) & set("+-*/")
    assert ops == {"+", "-", "*", "/"}
    assert cd.solve(p) == cd.solve(p)  # one worked solution per problem


@pytest.mark.parametrize("completion", ["a\n</think>\n\n42", "a</think>42</think>", "a</think>\n</think>42",
                                        "</think>42", "a\n</think>\n\n", "no end 42", "a</think> 4</think>2 "])
def test_scoring_judges_the_answer_the_api_shows(completion):
    """Scoring and the server split a completion with one function, at its first </think>: the answer
    scored is the `content` the API returns, and it is right only when that content is."""
    reasoning, content = split_thinking(completion)
    scored_reasoning, answer, well_formed = parse_completion(completion)
    assert (scored_reasoning, answer) == (reasoning, content.strip())
    assert well_formed == (bool(reasoning.strip()) and bool(content.strip()))
    p = get_task("addition").make(random.Random(1), 2)
    right = get_task("addition").score(p, completion.replace("42", p.answer)).accuracy == 1
    assert right == (split_thinking(completion.replace("42", p.answer)) == ("a", p.answer))


def test_task_documents_are_worked_training_problems():
    chats = list(task_documents("addition", 5, "chat", seed=3, difficulty=2))
    texts = list(task_documents("addition", 5, "text", seed=3, difficulty=2))
    assert chats == list(task_documents("addition", 5, "chat", seed=3, difficulty=2))  # seeded
    for (kind, messages), (text_kind, text) in zip(chats, texts):
        question, reply = messages[0]["content"], messages[1]
        a, b = map(int, re.findall(r"\d+", question))
        assert (kind, text_kind) == ("chat", "text") and split_of(f"{a} + {b}") == "train"  # the split ignores phrasing
        assert reply["content"] == str(a + b) and reply["reasoning_content"].strip()
        assert text == f"{question}\n{reply['reasoning_content']}\nAnswer: {a + b}"  # the same problem
    with pytest.raises(ValueError, match="kind must be 'chat' or 'text'"):
        list(task_documents("addition", 1, "prose"))


def test_sft_conversations_train_only_their_last_turn(tokenizer):
    """Multi-turn SFT documents: earlier turns are other problems (or smalltalk) with their answers only,
    weight 0; the last turn carries its reasoning and is the only one the mask trains."""
    docs = [m for _, m in chat_documents(["addition", "countdown"], {"addition": 30, "countdown": 30}, seed=3,
                                         difficulties={"addition": [2], "countdown": [3]}, turns=3, smalltalk=20)]
    assert len(docs) == 80 and {len(m) for m in docs} == {2, 4, 6}  # one to three turns
    for messages in docs:
        *history, question, last = messages
        assert question["role"] == "user" and last.get("reasoning_content") and "weight" not in last
        assert all(m["weight"] == 0 and "reasoning_content" not in m for m in history if m["role"] == "assistant")
        ids, mask = tokenizer.render_chat(messages)
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        thought = re.sub(f"{re.escape(TOOL_OUTPUT_BEGIN)}.*?{re.escape(TOOL_OUTPUT_END)}", "",
                         last["reasoning_content"])  # the calculator's results are the engine's, not trained
        assert trained == f"<think>\n{thought}\n</think>\n\n{last['content']}<｜end▁of▁sentence｜>"
    questions = [m[-2]["content"] for m in docs]
    assert sum("Countdown" in m[-1]["content"] for m in docs) >= 5  # smalltalk says what the model can do
    assert sum(len(re.findall(r"\d+", q)) == 2 for q in questions) == 30  # a + b, in any phrasing
    assert sum(len(re.findall(r"\d+", q)) == 4 for q in questions) == 30  # three numbers and a target


def test_smalltalk_sits_where_people_say_it():
    """With several turns a greeting opens its conversation and a thanks follows an answer to a task's
    problem; the other kinds come alone or after other turns, like the problems."""
    docs = [m for _, m in chat_documents(["addition", "countdown"], {"addition": 100, "countdown": 100}, seed=1,
                                         difficulties={"addition": [2], "countdown": [3]}, turns=2, smalltalk=300)]
    placed = {}
    for messages in docs:
        kind = thought_kind(messages[-1]["reasoning_content"])
        earlier = [m["content"] for m in messages[:-2] if m["role"] == "user"]
        placed.setdefault(kind, []).append(earlier)
    assert all(earlier == [] for earlier in placed["greeting"]) and len(placed["greeting"]) > 20
    assert all(len(e) == 1 and len(re.findall(r"\d+", e[0])) in (2, 4) for e in placed["thanks"])  # a problem
    for kind in ("who", "cannot", None):  # None: a task's problem
        assert {len(e) for e in placed[kind]} == {0, 1}
    alone = [m for _, m in chat_documents(["addition"], {"addition": 10}, seed=1, turns=1, smalltalk=60)]
    assert all(len(m) == 2 for m in alone)  # one turn: nothing to place


def test_smalltalk_describes_the_tasks_trained():
    rng = random.Random(0)
    turns = [smalltalk_turn([get_task("addition")], rng) for _ in range(200)]
    assert all(reasoning and answer for _, reasoning, answer in turns)
    about = [answer for _, _, answer in turns if "I can" in answer]
    assert about and all("add whole numbers" in a and "Countdown" not in a for a in about)
    assert set(HELD_OUT_PROMPTS).isdisjoint(q.lower().rstrip("?!.") for q, _, _ in turns)


def test_countdown_steps_are_checked_one_by_one():
    cd = get_task("countdown")
    p = cd.make(random.Random(2), 3)
    assert cd.check_steps(p, "14+6=20,20-2=18\n14-6=8,8+2=11\n</think>\n\n14") == (3, 4)
    assert cd.check_steps(p, "no steps here\n</think>\n\n14") == (0, 0)


def test_addition_covers_every_length_pair_in_every_phrasing():
    """Each operand's length is drawn on its own (1 + 4 digits as often as 4 + 4, 0 and single digits included),
    every phrasing comes up, the split hashes the sum whatever its phrasing, and the score reads the answer."""
    task, rng = get_task("addition"), random.Random(0)
    problems = [task.sample(rng, "train", 4) for _ in range(4000)]
    pairs = {p.data["lengths"] for p in problems}
    assert pairs == {f"{x}+{y}" for x in range(1, 5) for y in range(1, 5)}
    assert {p.data["phrasing"] for p in problems} == set(ADDITION_PHRASINGS) and len(ADDITION_PHRASINGS) >= 5
    assert min(p.data["a"] for p in problems) == 0 and max(p.data["b"] for p in problems) <= 9999
    for p in problems[:300]:
        a, b = p.data["a"], p.data["b"]
        assert list(map(int, re.findall(r"\d+", p.question))) == [a, b]
        assert p.data["lengths"] == f"{len(str(a))}+{len(str(b))}" and split_of(f"{a} + {b}") == "train"
        reasoning, answer = task.solve(p)
        assert answer == str(a + b) == reasoning.splitlines()[-1].split()[-1]  # the last line holds the sum
        assert task.score(p, f"{reasoning}\n</think>\n\n{answer}").accuracy == 1
    short = next(p for p in problems if p.data["lengths"] == "1+4")
    assert task.solve(short)[0].splitlines()[1].startswith("0+")  # the short operand is padded with 0
    by_pair = [task.sample(rng, "test", (1, 3)) for _ in range(20)]
    assert {p.data["lengths"] for p in by_pair} == {"1+3"} and task.strata(4)[:2] == [(1, 1), (1, 2)]


def test_countdown_comes_in_several_phrasings_with_one_split():
    task, rng = get_task("countdown"), random.Random(0)
    problems = [task.sample(rng, "test", 3) for _ in range(200)]
    assert {p.data["phrasing"] for p in problems} == set(COUNTDOWN_PHRASINGS) and len(COUNTDOWN_PHRASINGS) >= 3
    for p in problems:
        numbers = list(map(int, re.findall(r"\d+", p.question)))
        assert sorted(numbers) == sorted(p.data["numbers"] + [p.data["target"]])
        assert split_of(p.key) == "test" and task.solve(p) == task.solve(replace(p, question="other words"))
        reasoning, answer = task.solve(p)
        assert task.score(p, f"{reasoning}\n</think>\n\n{answer}").accuracy == 1


def test_countdown_traces_search_with_the_calculator_and_check_each_attempt(tokenizer):
    """A worked Countdown solution: attempts that miss, then one that hits, each a calculator call that takes
    the attempt from the target, yes when it says 0; rendered for SFT, the results are never trained on."""
    task, rng = get_task("countdown"), random.Random(0)
    misses = []
    for _ in range(200):
        p = task.sample(rng, "train", 3)
        reasoning, answer = task.solve(p)
        lines = reasoning.splitlines()
        if p.data["target"] in p.data["numbers"]:
            continue
        target = p.data["target"]
        assert all(line.endswith(" no") for line in lines[:-1]) and lines[-1].endswith(" yes")
        assert lines[-1] == (f"{TOOL_CALL_BEGIN}{target}-({answer}){TOOL_CALL_END}{TOOL_OUTPUT_BEGIN}0"
                             f"{TOOL_OUTPUT_END} yes")  # the check: the calculator says 0
        assert task.attempts(f"{reasoning}\n</think>\n\n{answer}") == len(lines)
        right, steps = steps_right(reasoning)
        assert right == steps == reasoning.count(TOOL_CALL_BEGIN) == len(lines)  # every result is the tool's
        tried = [re.findall(f"{re.escape(TOOL_CALL_BEGIN)}{target}-\\((.*)\\){re.escape(TOOL_CALL_END)}", line)[0]
                 for line in lines]
        assert len(set(tried)) == len(tried)  # no attempt twice
        for line, expression in zip(lines[:-1], tried):
            checked = re.findall(f"{re.escape(TOOL_OUTPUT_BEGIN)}(-?\\d+)", line)[-1]
            assert int(checked) == target - evaluate_expression(expression)[0] != 0
            assert not Counter(evaluate_expression(expression)[1]) - Counter(p.data["numbers"])  # numbers given
        distances = [abs(target - evaluate_expression(expression)[0]) for expression in tried]
        assert distances == sorted(distances, reverse=True)  # each attempt nearer the target than the last
        assert task.score(p, f"{reasoning}\n</think>\n\n{answer}").accuracy == 1
        misses.append(len(lines) - 1)
    assert set(misses) == set(MISSES)
    ids, mask = tokenizer.render_chat(as_chat(p, reasoning, answer))
    begin, end = tokenizer.output_begin_id, tokenizer.output_end_id
    inside = [m for i, m in enumerate(mask) if begin in ids[:i + 1] and ids[:i + 1].count(begin) > ids[:i].count(end)]
    assert inside and not any(inside) and ids.count(tokenizer.call_begin_id) == reasoning.count(TOOL_CALL_BEGIN)


def test_countdown_expressions_are_written_with_the_parentheses_they_need():
    found = expressions([2, 3, 4])
    assert all(evaluate_expression(text)[0] == value for text, value in found.items())
    assert {"3+2", "4*3-2", "3*(4-2)", "4-(3-2)", "3+4/2", "4*3/2"} <= set(found) and "(4*3)-2" not in found


def test_wrong_steps_are_counted_in_calls_and_in_plain_text():
    call = lambda e, v: f"{TOOL_CALL_BEGIN}{e}{TOOL_CALL_END}{TOOL_OUTPUT_BEGIN}{v}{TOOL_OUTPUT_END}"  # noqa: E731
    assert steps_right(f"{call('14-6', 8)}, {call('8+2', 11)} (target 10) no\n3+4=7,7*2=15") == (2, 4)
    assert steps_right(f"{call('1/0', 'error: division by zero')} (target 5) no") == (0, 1)
    refused = f"{call('2)', 'error: not an arithmetic expression')}\n{call('1/0', 'error: division by zero')}"
    assert refused_calls(refused + f"\n{call('8+2', 10)} yes") == 2 and refused_calls(call("8+2", 11)) == 0


def test_pretraining_text_carries_tool_markup_as_control_tokens(tokenizer):
    text = f"a {TOOL_CALL_BEGIN}6*7{TOOL_CALL_END}{TOOL_OUTPUT_BEGIN}42{TOOL_OUTPUT_END} b"
    [ids] = tokenizer.encode_documents([text])
    assert [i for i in ids if i in tokenizer.tool_ids.values()] == list(tokenizer.tool_ids.values())
    assert tokenizer.decode(ids) == text and tokenizer.encode(text) != ids  # plain encode keeps them text


@pytest.mark.parametrize("name", sorted(builtin_tasks()))
def test_every_builtin_task_is_asked_several_ways(name):
    """Problems come in several phrasings (five or more for arithmetic), each scored whatever the wording."""
    task, rng = get_task(name), random.Random(0)
    problems = [task.sample(rng, "train") for _ in range(300)]
    assert len({p.data["phrasing"] for p in problems}) >= (5 if name in ("addition", "arithmetic") else 3)
    for p in problems[:50]:
        reasoning, answer = task.solve(p)
        assert task.score(p, f"{reasoning}\n</think>\n\n{answer}").accuracy == 1
        assert split_of(p.key) == "train"  # the split hashes the problem, not its wording
