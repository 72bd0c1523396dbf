"""Every option of every stage, typed, each with its default and its meaning written once.

Options are grouped by concern (Compute, RunDir, Optim, Batches, Sampling, TaskSpec, ...); a stage's config
composes the concerns it has and adds its own options, restating a default where the stage's differs
(`override`). TrainConfig is pretrain's and sft's, then RLConfig, RSConfig, MTPConfig, EvalConfig and DataConfig;
a recipe's [run], [data] and [eval] are RunSection, DataSection and EvalSection, and its other sections the
stages' configs but for what the recipe sets itself (recipe=False: where a stage starts and writes, and the seed,
device and dtype that [run] gives every stage). From the fields come every stage's flags and --help (cli.py), the
recipe's sections, defaults and type checks (RECIPE, pipeline.py) and the recipe reference in `nanoseek run --help`
(recipe_reference) and docs/RECIPES.md (recipe_markdown: `python -m nanoseek.config > docs/RECIPES.md`).

A field typed as a list or one value (a task's `task` and `difficulty`, `replay`) takes either, as the command line
and older recipes give them: names, comma-separated, or one difficulty (0: the task's whole range). Inside it is
always a list.
"""

import copy
import functools
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields


def opt(default, help, recipe=True):
    """A field with its default and its help text; recipe=False: not a recipe key (the recipe sets it)."""
    metadata = {"help": help, "recipe": recipe}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def override(concern, name, default, help=None, recipe=None):
    """The field `name` of `concern` with a stage's own default (and help, where the stage narrows its meaning;
    recipe, where a recipe section takes what a stage's does not)."""
    metadata = {f.name: f for f in fields(concern)}[name].metadata
    return opt(default, help or metadata["help"], metadata["recipe"] if recipe is None else recipe)


def default(f):
    """A field's default (a fresh copy of a list or table)."""
    return f.default_factory() if callable(f.default_factory) else f.default


def list_type(kind):
    """list[X] of a field typed list[X] or list[X] | Y; None for any other type."""
    if isinstance(kind, types.UnionType):
        return next(filter(None, map(list_type, typing.get_args(kind))), None)
    return kind if typing.get_origin(kind) is list else None


def as_list(value):
    """A list-or-one-value option as a list: names split at commas (blanks dropped), one difficulty d as [d]
    (0, the task's whole range, as none)."""
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    if isinstance(value, list):
        return [n for v in value for n in as_list(v)] if all(isinstance(v, str) for v in value) else [
            v for v in value if v != 0]
    return [value] if value else []


def sample_levels(difficulty):
    """A difficulty list as Task.sample takes it: one level, a list to draw from, or None (the whole range)."""
    return difficulty[0] if len(difficulty) == 1 else difficulty or None


@dataclass
class Options:
    """The base of every concern: a list-or-one-value option becomes a list."""

    def __post_init__(self):
        for f in fields(self):
            if isinstance(f.type, types.UnionType) and list_type(f.type):
                setattr(self, f.name, as_list(getattr(self, f.name)))


# ----------------------------------------------------------------------------- concerns


@dataclass
class Compute(Options):
    device: str | None = opt(None, "cpu or cuda (default: cuda when available)", recipe=False)
    dtype: str = opt("auto", "compute dtype under autocast: auto (bfloat16 on cuda, float32 on cpu), bfloat16, "
                             "float32", recipe=False)


@dataclass
class RunDir(Options):
    """Where a training stage starts and writes, and the loop around its steps (rundir.Run)."""

    init: str | None = opt(None, "checkpoint to start from (sft, rl, rs, mtp: required)", recipe=False)
    out: str | None = opt(None, "output directory", recipe=False)
    resume: bool = opt(False, "continue from the newest checkpoint in --out", recipe=False)
    seed: int = opt(0, "seed for initialisation, problems, sampling and data order", recipe=False)
    steps: int = opt(200, "optimizer steps")
    eval_every: int = opt(50, "steps between held-out evaluations (0: only at the end)")
    ckpt_every: int = opt(100, "steps between checkpoints (0: only at the end)")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class StepCheckpoints(Options):
    keep: int = opt(2, "step checkpoints to keep")


@dataclass
class Optim(Options):
    optimizer: str = opt("muon", "muon: Muon on the hidden matrices, AdamW on the rest (see optim.py); adamw: AdamW "
                                 "on every weight")
    lr: float = opt(3e-3, "peak learning rate")
    warmup: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.1, "weight decay on matrices")
    clip: float = opt(1.0, "gradient-norm clipping (0: off)")


@dataclass
class Batches(Options):
    batch: int = opt(16, "sequences per optimizer step, over all ranks and micro-steps")
    seq: int = opt(256, "tokens per sequence")


@dataclass
class FineTune(Compute, Batches, Optim, RunDir):
    """What train.train takes from a stage that fine-tunes through it (rs, mtp): these fields, by name."""


@dataclass
class Decoding(Options):
    max_new_tokens: int = opt(256, "longest completion")


@dataclass
class Sampling(Decoding):
    temperature: float = opt(1.0, "sampling temperature")


@dataclass
class TaskSpec(Options):
    """Which problems a stage draws: the tasks take turns, each at the difficulties given."""

    task: list[str] | str = opt(["countdown"], "tasks: built-in names, problems.jsonl files or file.py:ClassName "
                                               "(or one comma-separated string); several take turns")
    checker: str = opt("exact", "answer checker for a JSONL task: exact, numeric or math")
    difficulty: list[int] | int = opt([], "difficulties to draw problems from (empty or 0: the task's whole range)")

    @property
    def levels(self):
        return sample_levels(self.difficulty)


@dataclass
class HeldOut(Options):
    val_fraction: float = opt(0.01, "share of documents held out")


@dataclass
class Conversations(HeldOut):
    """SFT conversations of several turns, as [data], rs and mtp write them."""

    turns: int = opt(1, "most turns in an SFT conversation: earlier turns are other conversations' questions and "
                        "answers")


@dataclass
class Scoring(Decoding):
    """How `nanoseek eval` and a recipe's [eval] score a checkpoint."""

    n: int = opt(500, "held-out problems per task")
    k: int = opt(1, "samples per problem for pass@k (1: greedy pass@1 only)")
    k_n: int = opt(0, "problems, the first of the n, that get the k samples (0: all n)")
    max_new_tokens: int = override(Decoding, "max_new_tokens", 256, "longest completion (0: per task, twice its "
                                   "longest worked solution, at least 64)")
    second_turn: bool = opt(False, "also ask each problem as the second turn, after one of another task and its "
                                   "answer")
    depth_n: int = opt(0, "also ask the last checkpoint the first depth_n problems as turn 10 of a chat of mixed "
                          "turns, and a third as many at each turn 2..9, trimmed as `nanoseek chat` trims (0: not)")
    temperature: float = opt(0.0, "pass@1 of one seeded sample a problem at this temperature, as a chat samples "
                                  "(0: greedy)")


@dataclass
class HFSource(Options):
    hf: str = opt("", "a Hugging Face dataset instead, streamed: a Hub id or a local directory or file")
    name: str = opt("", "--hf: the dataset's configuration")
    split: str = opt("train", "--hf: the split to read")
    column: str = opt("text", "--hf: text (pretraining) or messages (chat, OpenAI style)")
    max_documents: int = opt(0, "--hf: stop after this many documents (0: all)")


# ----------------------------------------------------------------------------- stages


@dataclass
class TrainConfig(StepCheckpoints, FineTune):
    """`nanoseek pretrain` and `nanoseek sft` (train.py)."""

    stage = "training"
    size: int = opt(6, "size dial for a fresh model when there is no --init")
    data: str | None = opt(None, "data directory made by `nanoseek data`", recipe=False)
    device_batch: int = opt(0, "rows per forward on each rank; gradients accumulate over batch / (device_batch x "
                               "ranks) micro-steps (0: a rank's whole share of the batch in one forward)")
    rows: str = opt("documents", "documents: rows of whole documents, each attending to itself only; windows: plain "
                                 "windows of the token stream (long free text)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")
    schedule: str = opt("cosine", "cosine, or wsd (warmup-stable-decay)")
    decay_frac: float = opt(0.2, "wsd: fraction of steps spent decaying")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    mtp_weight: float = opt(0.3, "lambda: weight of the multi-token-prediction loss")
    mtp_only: bool = opt(False, "train the MTP modules alone, the main model frozen: they learn to draft what it "
                                "writes")
    bias_update_speed: float = opt(0.001, "gamma: aux-loss-free expert bias step")
    balance_alpha: float = opt(0.0, "alpha: sequence-wise balance loss weight")
    unlikelihood: float = opt(0.0, "weight of unlikelihood on repeating a calculator call: where a call departs "
                                   "from an earlier one, the earlier call's token is pushed down (unlikelihood.py)")
    eval_windows: int = opt(32, "held-out sequences per evaluation")
    max_bad_steps: int = opt(5, "stop after this many non-finite steps in a row")
    compile: bool = opt(False, "torch.compile the model")
    fsdp: bool = opt(False, "shard with FSDP2 instead of replicating with DDP (under torchrun)")


@dataclass
class RLConfig(StepCheckpoints, TaskSpec, Sampling, Compute, Optim, RunDir):
    """`nanoseek rl`: GRPO (rl.py)."""

    stage = "rl"
    init: str | None = override(RunDir, "init", None, "checkpoint to start from (an SFT model)")
    steps: int = override(RunDir, "steps", 50, "GRPO steps")
    eval_every: int = override(RunDir, "eval_every", 10, "steps between greedy evaluations on held-out problems, "
                               "for the curve in rl.png (0: none)")
    ckpt_every: int = override(RunDir, "ckpt_every", 25)
    optimizer: str = override(Optim, "optimizer", "adamw")
    lr: float = override(Optim, "lr", 1e-4, "learning rate")
    warmup: int = override(Optim, "warmup", 0, "steps over which the learning rate rises linearly to --lr (Adam's "
                           "first steps are full-size)")
    weight_decay: float = override(Optim, "weight_decay", 0.0)
    prompts: int = opt(8, "problems per step, over all ranks")
    group: int = opt(8, "G: completions per problem")
    replay: list[str] | str = opt([], "tasks whose worked solutions keep training beside GRPO (empty: none), so "
                                      "that a skill learned in SFT is not lost")
    replay_rows: int = opt(16, "worked solutions per step for --replay")
    replay_difficulty: list[int] | int = opt([], "difficulties of the --replay tasks' problems (empty: those of "
                                                 "--difficulty)")
    mu: int = opt(1, "update passes over each batch of rollouts")
    micro_batch: int = opt(0, "rollouts per forward in the update, gradients accumulated (0: all of this rank's at "
                              "once); bounds the update's memory, not its result")
    eps_low: float = opt(0.2, "PPO clip below 1")
    eps_high: float = opt(0.28, "PPO clip above 1 (clip-higher)")
    beta: float = opt(0.0, "k3 KL penalty to the starting model (0: no reference model)")
    advantage: str = opt("std", "std (GRPO) or mean (Dr. GRPO: no division by the group's std)")
    accuracy_weight: float = opt(1.0, "reward for a right answer")
    format_weight: float = opt(0.1, "reward for <reasoning></think><answer>")
    step_weight: float = opt(0.0, "reward for the share of reasoning steps that compute what they say (a process "
                                  "reward; tasks with check_steps)")
    overlong_penalty: float = opt(0.0, "subtracted when a completion hits max_new_tokens")
    repeat_penalty: float = opt(0.0, "subtracted when a completion calls the calculator with a call it made before "
                                     "(a search that retries an attempt it has checked)")
    dynamic_sampling: bool = opt(True, "drop groups with equal rewards and draw more problems")
    max_draws: int = opt(3, "dynamic sampling: rounds of extra problems per step at most")
    eval_n: int = opt(100, "held-out problems per task (and per replay task) in those evaluations")


@dataclass
class RSConfig(Conversations, TaskSpec, Sampling, FineTune):
    """`nanoseek rs`: rejection sampling, then SFT on what was kept (rejection.py)."""

    stage = "rs"
    init: str | None = override(RunDir, "init", None, "checkpoint to sample from and fine-tune (the RL model)")
    resume: bool = override(RunDir, "resume", False, "reuse out/samples.jsonl and out/data, and continue from the "
                            "newest checkpoint in --out")
    steps: int = override(RunDir, "steps", 60, "fine-tuning optimizer steps")
    eval_every: int = override(RunDir, "eval_every", 0)
    ckpt_every: int = override(RunDir, "ckpt_every", 0)
    lr: float = override(Optim, "lr", 3e-4)
    warmup: int = override(Optim, "warmup", 5)
    val_fraction: float = override(HeldOut, "val_fraction", 0.02, "share of the conversations held out (at least "
                                   "one)")
    problems: int = opt(600, "training-split problems to sample")
    samples: int = opt(8, "completions sampled per problem")
    keep: int = opt(2, "distinct accepted completions kept per problem at most")
    require_steps: bool = opt(False, "accept only completions whose every reasoning step is right as well (a "
                                     "process check, for tasks with check_steps)")
    replay: list[str] | str = opt(["addition"], "tasks whose worked solutions are mixed into the fine-tuning data "
                                                "(empty: none)")
    replay_problems: int = opt(200, "worked solutions per replay task")
    smalltalk: int = opt(0, "plain conversational turns mixed in: greetings, who the model is, what it cannot do")


@dataclass
class MTPConfig(Conversations, Decoding, TaskSpec, FineTune):
    """`nanoseek mtp`: the MTP module learns to draft the model's own greedy answers (mtp.py)."""

    stage = "mtp"
    init: str | None = override(RunDir, "init", None, "checkpoint whose MTP module learns to draft its greedy "
                                "output (the final model)")
    resume: bool = override(RunDir, "resume", False, "reuse out/data, and continue from the newest checkpoint in "
                            "--out")
    steps: int = override(RunDir, "steps", 60)
    eval_every: int = override(RunDir, "eval_every", 0)
    ckpt_every: int = override(RunDir, "ckpt_every", 0)
    lr: float = override(Optim, "lr", 1e-3)
    warmup: int = override(Optim, "warmup", 5)
    task: list[str] | str = override(TaskSpec, "task", ["addition", "countdown"])
    max_new_tokens: int = override(Decoding, "max_new_tokens", 256, "longest answer")
    turns: int = override(Conversations, "turns", 2)
    val_fraction: float = override(HeldOut, "val_fraction", 0.02, "share of the conversations held out (at least "
                                   "one)")
    problems: int = opt(400, "training-split problems per task the model answers greedily")


@dataclass
class EvalConfig(Compute, Scoring, TaskSpec):
    """`nanoseek eval` beside the checkpoints (evaluate.py)."""

    stage = "eval"
    seed: int = opt(0, "seed of the held-out problems and the pass@k samples")
    out: str | None = opt(None, "directory for eval.json, eval.md and eval.png")


@dataclass
class DataConfig(HeldOut, HFSource, TaskSpec):
    """`nanoseek data` beside --tokenizer and --out (data.py)."""

    stage = "data"
    input: list[str] = opt([], "files or globs: .txt, .jsonl ({text} or {messages}), .parquet")
    task: list[str] | str = override(TaskSpec, "task", [], "make data from tasks instead (worked solutions as "
                                     "<think> traces)")
    n: int = opt(10000, "--task: problems per task")
    kind: str = opt("chat", "--task: chat (SFT) or text data")
    seed: int = opt(0, "--task: seed of the problems")


# ----------------------------------------------------------------------------- recipes


@dataclass
class RunSection(Compute):
    """A recipe's [run]: where every stage writes, their seed, device and dtype, and which training stages run."""

    out: str = opt("runs/default", "directory every stage writes into")
    seed: int = opt(0, "seed for data, initialisation and sampling")
    stages: list[str] = opt(["pretrain", "sft", "rl"], "training stages to run, in this order; add \"rs\" for "
                            "rejection sampling and SFT after GRPO (R1's third stage), \"mtp\" last to train the MTP "
                            "module to draft the final model's answers")
    device: str = override(Compute, "device", "", "cpu or cuda (empty: cuda when available)", recipe=True)
    dtype: str = override(Compute, "dtype", "auto", recipe=True)


@dataclass
class DataSection(Conversations):
    """A recipe's [data]: the tokenizer and the pretraining and SFT data."""

    tasks: list[str] = opt(["addition", "countdown"], "tasks whose worked solutions make the training data")
    difficulties: dict[str, list[int] | int] = opt({}, "per task, the difficulties to draw (empty: the task's "
                                                       "whole range)")
    pretrain_problems: int | dict[str, int] = opt(20000, "problems per task rendered as plain text for pretraining "
                                                         "(or {task: count})")
    sft_problems: int | dict[str, int] = opt(5000, "problems per task rendered as chat with <think> for SFT (or "
                                                   "{task: count})")
    smalltalk: int = opt(0, "plain conversational turns in SFT: greetings, who the model is, what it cannot do")
    corpus: list[str] = opt([], "your own text/JSONL/Parquet files, added to the pretraining data")
    hf: list[dict] = opt([], "Hugging Face datasets, streamed: [{ path, name, split, column, max_documents }]; "
                             "column \"text\" adds to the pretraining data, \"messages\" to the SFT data")
    vocab_size: int = opt(1024, "tokenizer vocabulary")
    tokenizer_chars: int = opt(1_000_000_000, "the tokenizer trains on the first this many characters of each "
                                              "source (the tasks' text, the smalltalk, the corpus, each hf dataset)")


@dataclass
class EvalSection(Scoring):
    """A recipe's [eval]: what every stage's checkpoint is evaluated on."""

    tasks: list[str] = opt(["addition", "countdown"], "tasks to evaluate every stage on")
    difficulties: dict[str, list[int] | int] = opt({}, "per task, the difficulties to evaluate (empty: those of "
                                                       "[data])")
    stages: list[str] = opt(["pretrain", "sft", "rl"], "stages whose checkpoints are evaluated")


RECIPE = {"run": RunSection, "data": DataSection, "eval": EvalSection, "pretrain": TrainConfig, "sft": TrainConfig,
          "rl": RLConfig, "rs": RSConfig, "mtp": MTPConfig}  # a recipe's sections


def recipe_keys(section):
    """{key: field} of a recipe section: its config's fields but those the recipe sets itself."""
    return {f.name: f for f in fields(RECIPE[section]) if f.metadata["recipe"]}


def config_from(cls, options):
    """A stage's config from itself or from a dict of options (the rest take their defaults); unknown ones are
    an error."""
    if isinstance(options, cls):
        return options
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown {cls.stage} options {unknown}; valid: {sorted(valid)}")
    return cls(**options)


def values(config, concern):
    """{name: value} of the fields of one concern in a config (or a recipe section's dict): what it hands on to a
    function or stage of that concern."""
    get = config.__getitem__ if isinstance(config, dict) else functools.partial(getattr, config)
    return {f.name: get(f.name) for f in fields(concern)}


# ----------------------------------------------------------------------------- types


def accepts(kind, value):
    """Whether a value is of a field's type: an int serves for a float, a bool for nothing but a bool; a table's
    values are checked, a list's items not (a difficulty may be a pair)."""
    if isinstance(kind, types.UnionType):
        return any(accepts(k, value) for k in typing.get_args(kind))
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if (kind is bool) != isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    if origin is dict and args:
        return isinstance(value, dict) and all(accepts(args[1], v) for v in value.values())
    return isinstance(value, origin)


def type_name(kind):
    if isinstance(kind, types.UnionType):
        return " or ".join(type_name(k) for k in typing.get_args(kind) if k is not type(None))
    return (typing.get_origin(kind) or kind).__name__


def recipe_entries(section):
    """(key, default, help) of each key of a recipe section, the section's own first."""
    own = RECIPE[section].__annotations__
    keys = sorted(recipe_keys(section).items(), key=lambda item: item[0] not in own)
    return [(key, json.dumps(default(f)), f.metadata["help"]) for key, f in keys]


CHAINED = ("the recipe chains the stages itself: init, out, resume and data are not keys of a stage's section, and "
           "[run] gives every stage its seed, device and dtype.")


def recipe_reference():
    """The keys of a recipe's [run], [data] and [eval], each with its default and meaning (`nanoseek run --help`)."""
    lines = ["recipe sections, each key with its default (a key not given takes it):"]
    for section in ("run", "data", "eval"):
        lines.append(f"\n[{section}]")
        lines += [textwrap.fill(f"{key} = {value}: {meaning}", 100, initial_indent="  ", subsequent_indent="      ")
                  for key, value, meaning in recipe_entries(section)]
    lines.append("\n" + textwrap.fill("[pretrain] and [sft] take the options of `nanoseek pretrain --help`, [rl], [rs] "
                                      "and [mtp] those of `nanoseek rl --help`, `nanoseek rs --help` and `nanoseek mtp "
                                      "--help`, as key = value; " + CHAINED, 100))
    return "\n".join(lines)


def recipe_markdown():
    """docs/RECIPES.md: every section of a recipe, each key with its default and meaning."""
    lines = ["# Recipe reference", "", "Every key of every section of a recipe, with its default (a key not given "
             "takes it) and meaning. A stage's section takes the options of its command (`--max-new-tokens` is "
             "`max_new_tokens`); " + CHAINED, "", "Generated from `nanoseek/config.py` by `python -m nanoseek.config "
             "> docs/RECIPES.md`; `tests/test_config.py` checks that it is current."]
    sections = {}
    for section, cls in RECIPE.items():
        sections.setdefault(cls, []).append(section)
    for cls, names in sections.items():
        lines += ["", "## " + " and ".join(f"[{name}]" for name in names), "", cls.__doc__.splitlines()[0], "",
                  "| key | default | meaning |", "|---|---|---|"]
        lines += [f"| `{key}` | `{value}` | {meaning.replace('<', '&lt;')} |"
                  for key, value, meaning in recipe_entries(names[0])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(recipe_markdown(), end="")
