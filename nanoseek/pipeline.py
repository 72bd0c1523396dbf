"""`nanoseek run --recipe NAME|FILE`: every stage of a recipe, each skipped when its output is complete.

    tokenizer (trained on the task text and corpus) -> data (tokenized with it) -> pretrain -> sft -> rl
    -> eval (of every stage) -> report.md

A recipe is a TOML file: a built-in one (nanoseek/recipes/NAME.toml, shipped in the package) or your own.
Its sections and their keys are the fields of the configs in config.RECIPE (`nanoseek run --help` lists them);
a stage gets its section as its config, with where it starts and writes, the seed, device and dtype of [run].
"""

import functools
import itertools
import json
import os
import shutil
import sys
import time
from datetime import timedelta
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from nanoseek import data as data_module
from nanoseek import evaluate as evaluate_module
from nanoseek import mtp as mtp_module
from nanoseek import rejection as rejection_module
from nanoseek import rl as rl_module
from nanoseek import train as train_module
from nanoseek.config import RECIPE, Scoring, accepts, recipe_keys, type_name, values
from nanoseek.device import barrier, choose_compute, from_rank0, stage_ranks, start_ranks
from nanoseek.hub import check_hf_source, read_hf
from nanoseek.plan import PlanError, plan_recipe
from nanoseek.tasks import chat_documents, get_task, task_documents
from nanoseek.tasks.smalltalk import smalltalk_texts
from nanoseek.tokenizer import trim_conversation

TRAINING_STAGES = ("pretrain", "sft", "rl", "rs", "mtp")
RECIPES = resources.files("nanoseek") / "recipes"  # the built-in recipes, read as package data
RANK0_STAGES = ("tokenizer", "data", "eval", "report")  # under torchrun: rank 0 runs these, the others wait
RANK0_STAGE_TIMEOUT = timedelta(hours=6)  # how long a rank waits at a collective (a large eval is slow)


class RecipeError(ValueError):
    pass


def builtin_recipes():
    """{name: purpose} of the built-in recipes; a purpose is the first sentence of the file's first comment line."""
    recipes = {}
    for file in sorted(RECIPES.iterdir(), key=lambda f: f.name) if RECIPES.is_dir() else ():
        if file.name.endswith(".toml"):
            name, first = file.name[:-5], file.read_text(encoding="utf-8").partition("\n")[0]
            recipes[name] = first.lstrip("# ").removeprefix(f"{name}:").split(". ")[0].strip().rstrip(".:")
    return recipes


def load_recipe(name_or_path, overrides=None):
    """A recipe as {section: {key: value}} with every default filled in; unknown keys and wrong types are errors."""
    path, raw = read_recipe(name_or_path)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    for section in raw:
        if section not in RECIPE:
            raise RecipeError(f"{path}: unknown section [{section}]; valid sections: {sorted(RECIPE)}")
    recipe = {section: _section(path, section, raw.get(section, {})) for section in RECIPE}
    stages = recipe["run"]["stages"]
    if not stages or [s for s in TRAINING_STAGES if s in stages] != stages:
        raise RecipeError(f"{path}: [run] stages must name training stages once each, in the order "
                          f"{list(TRAINING_STAGES)}; got {stages}")
    unknown = [s for s in recipe["eval"]["stages"] if s not in stages]
    if unknown:
        raise RecipeError(f"{path}: [eval] stages {unknown} are not in [run] stages {stages}")
    try:
        recipe["data"]["hf"] = [check_hf_source(source, f"{path}: [data] hf[{i}]")
                                for i, source in enumerate(recipe["data"]["hf"])]
    except data_module.DataError as e:
        raise RecipeError(str(e)) from None
    recipe["path"] = path
    return recipe


def read_recipe(name_or_path, seen=()):
    """(path, {section: {key: value}}) as the file gives them; a top-level `base = "NAME"` (a built-in recipe or a
    .toml file) starts from that recipe's sections, each key the file sets replacing the base's."""
    file = Path(name_or_path) if name_or_path.endswith(".toml") else RECIPES / f"{name_or_path}.toml"
    path = str(file)
    if not file.is_file():
        raise RecipeError(f"recipe {name_or_path!r} not found ({path}); built-in recipes: {list(builtin_recipes())}"
                          " (`nanoseek run --list` says what each is for)")
    try:
        with file.open("rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    base = raw.pop("base", None)
    if base is None:
        return path, raw
    if not isinstance(base, str) or base in seen:
        raise RecipeError(f"{path}: base must name another recipe, once in a chain; got {base!r}")
    merged = read_recipe(base, (*seen, name_or_path))[1]
    for section, keys in raw.items():
        merged.setdefault(section, {}).update(keys)
    return path, merged


def _section(path, section, given):
    """{key: value} of a recipe section, every key there (defaults filled in, list-or-one values as lists)."""
    keys = recipe_keys(section)
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise RecipeError(f"{path}: unknown keys {unknown} in [{section}]; valid keys: {sorted(keys)}")
    for key, value in given.items():
        if value is not None and not accepts(keys[key].type, value):
            raise RecipeError(f"{path}: [{section}] {key} should be {type_name(keys[key].type)}, got {value!r}")
    config = RECIPE[section](**given)
    return {key: getattr(config, key) for key in keys}


# ----------------------------------------------------------------------------- stages


def _say(line):
    print(line, flush=True)


def run(recipe, force=(), stop_after=None, log=_say):
    """Run the recipe's stages in order; a stage whose output is complete is skipped unless named in force.

    Under torchrun every rank trains; rank 0 alone makes the tokenizer and data, evaluates and reports,
    while the others wait, and rank 0 decides what is complete."""
    device = recipe["run"]["device"] or None
    with stage_ranks():
        rank, _ = start_ranks(choose_compute(device, recipe["run"]["dtype"]).device, timeout=RANK0_STAGE_TIMEOUT)
        return _run_stages(recipe, force, stop_after, log if rank == 0 else lambda line: None, rank == 0)


def _run_stages(recipe, force, stop_after, log, main):
    out = recipe["run"]["out"]
    os.makedirs(out, exist_ok=True)
    timings_file = os.path.join(out, "stages.json")
    timings = json.load(open(timings_file)) if os.path.exists(timings_file) else {}
    device = recipe["run"]["device"] or None
    paths = {"text": os.path.join(out, "data", "text"), "chat": os.path.join(out, "data", "chat"),
             "tokenizer": os.path.join(out, "tokenizer"), "eval": os.path.join(out, "eval"),
             **{stage: os.path.join(out, stage) for stage in TRAINING_STAGES}}
    final = lambda stage: os.path.exists(os.path.join(paths[stage], "final", "model.safetensors"))  # noqa: E731
    done = {
        "tokenizer": lambda: os.path.exists(os.path.join(paths["tokenizer"], "tokenizer.json")),
        "data": lambda: all(os.path.exists(os.path.join(paths[k], "manifest.json")) for k in ("text", "chat")),
        **{stage: functools.partial(final, stage) for stage in TRAINING_STAGES},
        "eval": lambda: os.path.exists(os.path.join(paths["eval"], "eval.json")),
        "report": lambda: False,
    }
    # the tokenizer comes first: it is trained on the task text and corpus that the data stage then tokenizes
    for stage in ("tokenizer", "data", *recipe["run"]["stages"], "eval", "report"):
        if main and (stage in force or "all" in force):
            _clear(stage, paths)
        if from_rank0(done[stage]()):
            log(f"[{stage}] complete, skipped (--force {stage} redoes it)")
        else:
            log(f"[{stage}] running")
            t0 = time.time()
            info = STAGE_FUNCS[stage](recipe, paths, device) if main or stage not in RANK0_STAGES else {}
            barrier()
            if main:
                timings[stage] = {"seconds": round(time.time() - t0, 1), **(info or {})}
                _write_json(timings_file, timings)
            log(f"[{stage}] done in {time.time() - t0:.0f} s")
        if stop_after == stage:
            break
    return paths


def _clear(stage, paths):
    targets = {"data": [paths["text"], paths["chat"]], "tokenizer": [paths["tokenizer"]], "eval": [paths["eval"]],
               **{s: [paths[s]] for s in TRAINING_STAGES}}
    for p in targets.get(stage, []):
        shutil.rmtree(p, ignore_errors=True)


def _init(recipe, paths, stage):
    """The final checkpoint of the training stage before `stage` in [run] stages (None for the first)."""
    stages = recipe["run"]["stages"]
    k = stages.index(stage)
    return os.path.join(paths[stages[k - 1]], "final") if k else None


def final_stage(recipe):
    return recipe["run"]["stages"][-1]


def _counts(recipe, key):
    """{task: problems} of [data] key, given as one count for every task or as a table by task."""
    d = recipe["data"]
    value = d[key]
    return {spec: value.get(spec, 0) if isinstance(value, dict) else value for spec in d["tasks"]}


def _text_docs(recipe):
    d, counts = recipe["data"], _counts(recipe, "pretrain_problems")
    for i, spec in enumerate(d["tasks"]):
        yield from task_documents(spec, counts[spec], "text", seed=recipe["run"]["seed"] * 100 + i,
                                  difficulty=d["difficulties"].get(spec) or None)


def _chat_docs(recipe, tok):
    """The SFT conversations, each trimmed as the chat trims one to the context SFT trains at."""
    d = recipe["data"]
    fit = lambda messages: trim_conversation(tok, messages, recipe["sft"]["seq"])[0]  # noqa: E731
    return chat_documents(d["tasks"], _counts(recipe, "sft_problems"), recipe["run"]["seed"], d["difficulties"],
                          turns=d["turns"], smalltalk=d["smalltalk"], fit=fit)


def _hf_docs(recipe, column):
    """The documents of the recipe's Hugging Face sources of one column ("text" or "messages"), streamed."""
    for source in recipe["data"]["hf"]:
        if source["column"] == column:
            yield from read_hf(source)


def stage_tokenizer(recipe, paths, device):
    from nanoseek.tokenizer import first_chars, train_tokenizer

    d = recipe["data"]
    smalltalk = smalltalk_texts([get_task(spec) for spec in d["tasks"]], d["smalltalk"], recipe["run"]["seed"])
    sources = [data_module.document_texts(_text_docs(recipe)), smalltalk, data_module.read_texts(d["corpus"]),
               *(data_module.document_texts(read_hf(source)) for source in d["hf"])]
    texts = itertools.chain.from_iterable(first_chars(texts, d["tokenizer_chars"]) for texts in sources)
    tok = train_tokenizer(texts, vocab_size=d["vocab_size"])
    tmp = paths["tokenizer"] + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    os.replace(tmp, paths["tokenizer"])
    return {"vocab_size": len(tok)}


def stage_data(recipe, paths, device):
    from nanoseek.tokenizer import Tokenizer

    d = recipe["data"]
    tok = Tokenizer.load(paths["tokenizer"])
    text_docs = itertools.chain(_text_docs(recipe), data_module.read_corpus(d["corpus"]), _hf_docs(recipe, "text"))
    chat_docs = itertools.chain(_chat_docs(recipe, tok), _hf_docs(recipe, "messages"))
    text = data_module.build(None, tok, paths["text"], d["val_fraction"], documents=text_docs)
    chat = data_module.build(None, tok, paths["chat"], d["val_fraction"], documents=chat_docs)
    count = lambda m: sum(s["tokens"] for s in m["splits"]["train"])  # noqa: E731
    return {"pretrain_tokens": count(text), "sft_tokens": count(chat)}


def stage_config(recipe, paths, device, stage, **more):
    """A training stage's config: its section, where it starts and writes, and [run]'s seed, device and dtype."""
    return RECIPE[stage](**{**recipe[stage], "init": _init(recipe, paths, stage), "out": paths[stage], "resume": True,
                            "seed": recipe["run"]["seed"], "device": device, "dtype": recipe["run"]["dtype"], **more})


def _train(recipe, paths, device, stage, data):
    last = train_module.train(stage_config(recipe, paths, device, stage, data=data), stage)
    meta = json.load(open(os.path.join(paths[stage], "final", "nanoseek.json")))
    return {"tokens": meta["tokens_seen"], "steps": meta["step"], "loss": last.get("main_loss"),
            "val_loss": last.get("val_loss"), "val_bpb": last.get("val_bpb"),
            "params_total": meta["params_total"], "params_active": meta["params_active"]}


def stage_pretrain(recipe, paths, device):
    return _train(recipe, paths, device, "pretrain", paths["text"])


def stage_sft(recipe, paths, device):
    return _train(recipe, paths, device, "sft", paths["chat"])


def stage_rl(recipe, paths, device):
    last = rl_module.rl(stage_config(recipe, paths, device, "rl"))
    return {"steps": last["step"], "reward": last["reward"], "accuracy": last["accuracy"]}


def stage_rs(recipe, paths, device):
    return rejection_module.rejection_sampling(stage_config(recipe, paths, device, "rs"))


def stage_mtp(recipe, paths, device):
    result = mtp_module.align_mtp(stage_config(recipe, paths, device, "mtp"))
    return {k: result[k] for k in ("conversations", "step", "mtp_loss", "seconds_decoding")}


def stage_eval(recipe, paths, device):
    e, d = recipe["eval"], recipe["data"]
    difficulty = {spec: e["difficulties"].get(spec) or d["difficulties"].get(spec) or None for spec in e["tasks"]}
    evaluate_module.evaluate([os.path.join(paths[s], "final") for s in e["stages"]], e["tasks"], **values(e, Scoring),
                             seed=recipe["run"]["seed"], out=paths["eval"], device=device,
                             dtype=recipe["run"]["dtype"], difficulty=difficulty)
    final = os.path.join(paths[e["stages"][-1]], "final")
    chat = evaluate_module.chat_replies(final, device=device, dtype=recipe["run"]["dtype"])
    _write_json(os.path.join(paths["eval"], "chat.json"), {"checkpoint": final, **chat})
    return {}


def stage_report(recipe, paths, device):
    from nanoseek.report import write_report

    write_report(recipe, paths)
    return {}


STAGE_FUNCS = {"tokenizer": stage_tokenizer, "data": stage_data, "pretrain": stage_pretrain, "sft": stage_sft,
               "rl": stage_rl, "rs": stage_rs, "mtp": stage_mtp, "eval": stage_eval, "report": stage_report}


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main_run(recipe_name, force=(), overrides=None, stop_after=None):
    recipe = load_recipe(recipe_name, overrides)
    text, problem = plan_recipe(recipe, gpus=int(os.environ.get("WORLD_SIZE", "1")))
    if os.environ.get("RANK", "0") == "0":
        print(text + "\n", flush=True)
    if problem:  # before any work
        raise PlanError(problem)
    t0 = time.time()
    paths = run(recipe, force=force, stop_after=stop_after)
    if os.environ.get("RANK", "0") != "0":
        return paths
    final = os.path.join(paths[final_stage(recipe)], "final")
    print(f"\nfinished in {time.time() - t0:.0f} s; report: {os.path.join(recipe['run']['out'], 'report.md')}")
    print(f"chat with it:   nanoseek chat {final}")
    print(f"serve it:       nanoseek serve {final}   (web chat at http://127.0.0.1:8000/)")
    sys.stdout.flush()
    return paths
