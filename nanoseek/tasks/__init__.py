"""Tasks: problems whose answers a rule can check.

    class Task(Protocol):
        name: str
        difficulties: range
        def sample(self, rng, split, difficulty=None) -> Problem: ...   # train and test never overlap
        def solve(self, problem) -> tuple[str, str]: ...                # (worked reasoning, final answer)
        def score(self, problem, completion) -> Reward: ...             # accuracy, format, and why

What a task is, and the helpers tasks share, live in task.py; this module finds tasks (built in, a JSONL
file, or your own class) and turns their worked problems into training documents.
"""

import importlib.util
import os
import random

from nanoseek.tasks.arithmetic import Addition, Arithmetic
from nanoseek.tasks.countdown import Countdown
from nanoseek.tasks.custom import JsonlTask
from nanoseek.tasks.equations import LinearEquation
from nanoseek.tasks.hf import HFTask
from nanoseek.tasks.smalltalk import smalltalk_turn, thought_kind
from nanoseek.tasks.sorting import SortNumbers
from nanoseek.tasks.task import (  # noqa: F401  what a task file of your own imports from nanoseek.tasks
    NOT_WELL_FORMED,
    GeneratedTask,
    Problem,
    Reward,
    Task,
    as_chat,
    parse_completion,
    parse_int,
    pick_difficulty,
    sample_split,
    score_integer,
    split_of,
)


def builtin_tasks():
    return {t.name: t for t in (Addition(), Arithmetic(), Countdown(), LinearEquation(), SortNumbers())}


def get_task(spec: str, checker: str = "exact"):
    """A built-in task by name, a JSONL file of question/answer pairs, hf:DATASET[:CONFIG] (a Hugging Face dataset
    with question/answer columns, as GSM8K) or path/to/file.py:ClassName."""
    tasks = builtin_tasks()
    if spec in tasks:
        return tasks[spec]
    if spec.startswith("hf:"):
        return HFTask(spec)
    if spec.endswith(".jsonl"):
        return JsonlTask(spec, checker)
    if ".py:" in spec:
        path, _, cls = spec.rpartition(":")
        if not os.path.isfile(path):
            raise ValueError(f"task file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"nanoseek_user_task_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # the user's own code, named on the command line
        if not hasattr(module, cls):
            raise ValueError(f"{path} has no class {cls}")
        task = getattr(module, cls)()
        missing = [m for m in ("name", "sample", "solve", "score") if not hasattr(task, m)]
        if missing:
            raise ValueError(f"{spec} is not a task: it lacks {missing}")
        if not hasattr(task, "difficulties"):
            task.difficulties = range(1, 2)
        return task
    raise ValueError(f"unknown task {spec!r}: use one of {sorted(tasks)}, a .jsonl file, hf:DATASET[:CONFIG] or "
                     "file.py:ClassName")


def get_tasks(specs, checker="exact"):
    """The tasks named in a list of names (empty: none)."""
    return [get_task(spec, checker) for spec in specs]


def task_documents(spec, n, kind="chat", seed=0, difficulty=None, checker="exact"):
    """n training problems of a task, worked by solve, as ("chat", messages with the reasoning) or ("text", str)
    documents for `nanoseek data`."""
    if kind not in ("chat", "text"):
        raise ValueError(f"kind must be 'chat' or 'text', not {kind!r}")
    task, rng = get_task(spec, checker), random.Random(seed)
    for _ in range(n):
        problem = task.sample(rng, "train", difficulty)
        reasoning, answer = task.solve(problem)
        if kind == "chat":
            yield "chat", as_chat(problem, reasoning, answer)
        else:
            yield "text", f"{problem.question}\n{reasoning}\nAnswer: {answer}"


def chat_documents(specs, counts, seed=0, difficulties=None, turns=1, smalltalk=0, checker="exact", fit=None):
    """SFT conversations as ("chat", messages): counts[spec] worked problems of each task and `smalltalk` plain
    conversational turns, in a random order, each asked after 0 to turns - 1 earlier turns (see with_history),
    which fit(messages) -> messages trims as the chat trims a conversation (default: kept whole)."""
    rng = random.Random(seed)
    problems = []
    for i, spec in enumerate(specs):
        level = (difficulties or {}).get(spec) or None
        problems += [m for _, m in task_documents(spec, counts[spec], "chat", seed * 100 + i + 1, level, checker)]
    finals = problems + smalltalk_chats([get_task(spec, checker) for spec in specs], smalltalk, rng)
    rng.shuffle(finals)
    yield from with_history(finals, turns, rng, problems, fit)


def smalltalk_chats(tasks, n, rng):
    """n plain conversational turns about a model trained on `tasks`, as one-turn chats."""
    chats = []
    for _ in range(n):
        question, reasoning, answer = smalltalk_turn(tasks, rng)
        chats.append([{"role": "user", "content": question},
                      {"role": "assistant", "content": answer, "reasoning_content": reasoning}])
    return chats


def with_history(finals, turns, rng, problems=None, fit=None):
    """Each one-turn chat of finals as ("chat", messages), asked after 0 to turns - 1 earlier turns drawn from
    finals. Earlier turns carry only their answers, as chat clients send a conversation back, and are not
    trained on (weight 0): the model learns to answer the latest question, whatever came before it.

    With turns > 1 a smalltalk turn sits where people say it: a greeting opens the conversation, a thanks
    follows an answer to one of `problems` (the task turns among finals), so a short first message reads as a
    greeting and not as thanks for an answer never given. fit(messages) -> messages trims the conversation up to
    its last question as the chat would (dropping its oldest turns), so SFT trains what a long chat sends."""
    for messages in finals:
        earlier = rng.randint(0, turns - 1)
        kind = thought_kind(messages[-1].get("reasoning_content", ""))
        if turns > 1 and kind == "greeting":
            earlier = 0
        pool = finals
        if turns > 1 and kind == "thanks" and problems:
            earlier, pool = max(1, earlier), problems
        history = []
        for _ in range(earlier):
            question, reply = rng.choice(pool)
            history += [question, {"role": "assistant", "content": reply["content"], "weight": 0}]
        if history and fit is not None:
            yield "chat", fit(history + messages[:-1]) + messages[-1:]
        else:
            yield "chat", history + messages
