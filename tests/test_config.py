"""One typed config per stage is the single source of its flags, --help, recipe keys, defaults and type checks."""

import dataclasses
from pathlib import Path

import pytest

from nanoseek import config
from nanoseek.cli import build_parser, from_args
from nanoseek.config import RECIPE, FineTune, RLConfig, RSConfig, TrainConfig, recipe_keys, values
from nanoseek.pipeline import RECIPES, TRAINING_STAGES, RecipeError, load_recipe, read_recipe, stage_config

ROOT = Path(__file__).resolve().parent.parent

STAGES = {"pretrain": TrainConfig, "sft": TrainConfig, "rl": RLConfig, "rs": RSConfig, "mtp": config.MTPConfig,
          "eval": config.EvalConfig, "data": config.DataConfig, "tokenizer": config.HFSource}


def squeezed(text):
    return "".join(text.split())  # argparse wraps help text wherever it likes


def help_of(command, capsys):
    """What `nanoseek COMMAND --help` prints."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return squeezed(capsys.readouterr().out)


@pytest.mark.parametrize("path", sorted(Path(str(RECIPES)).glob("*.toml")), ids=lambda p: p.stem)
def test_every_key_of_a_builtin_recipe_is_a_field_of_its_sections_config(path):
    for section, given in read_recipe(str(path))[1].items():  # a base's keys too
        names = {f.name for f in dataclasses.fields(RECIPE[section])}
        assert set(given) <= set(recipe_keys(section)) <= names, (section, set(given) - set(recipe_keys(section)))


@pytest.mark.parametrize("section", sorted(RECIPE))
def test_a_recipe_section_is_its_configs_fields_with_their_defaults(section, tmp_path):
    bare = tmp_path / "bare.toml"
    bare.write_text('[run]\nstages = ["pretrain", "sft", "rl", "rs", "mtp"]\n')
    recipe = load_recipe(str(bare))
    defaults = {f.name: getattr(RECIPE[section](), f.name) for f in dataclasses.fields(RECIPE[section])
                if f.metadata["recipe"]}
    assert recipe[section] == {**defaults, **({"stages": recipe["run"]["stages"]} if section == "run" else {})}
    assert set(load_recipe("smoke")[section]) == set(defaults)
    if section != "run":  # the recipe chains the stages itself, and [run] gives their seed, device and dtype
        assert not {"init", "out", "resume", "data", "seed", "device", "dtype"} & set(defaults)


def test_the_pipeline_passes_a_stage_its_section_and_what_the_recipe_chains():
    recipe = load_recipe("smoke", {"run.stages": list(TRAINING_STAGES), "run.seed": 3, "run.dtype": "float32",
                                   "rl.group": 2, "mtp.task": "addition"})
    paths = {stage: f"out/{stage}" for stage in TRAINING_STAGES}
    for k, stage in enumerate(TRAINING_STAGES):
        o = stage_config(recipe, paths, "cpu", stage, **({"data": "d"} if RECIPE[stage] is TrainConfig else {}))
        assert type(o) is RECIPE[stage] and {key: getattr(o, key) for key in recipe[stage]} == recipe[stage]
        assert (o.init, o.out, o.resume) == (k and f"out/{TRAINING_STAGES[k - 1]}/final" or None, paths[stage], True)
        assert (o.seed, o.device, o.dtype) == (3, "cpu", "float32")
        chained = {f.name for f in dataclasses.fields(o)} - set(recipe_keys(stage))
        assert chained <= {"init", "out", "resume", "data", "seed", "device", "dtype"}, chained
    assert recipe["rl"]["group"] == 2 and recipe["mtp"]["task"] == ["addition"]


def test_a_stage_key_that_run_gives_is_an_error_in_the_stage():
    with pytest.raises(RecipeError, match=r"unknown keys \['seed'\] in \[rl\]"):
        load_recipe("smoke", {"rl.seed": 1})


def test_the_recipe_reference_in_docs_is_generated_from_the_configs():
    text = (ROOT / "docs" / "RECIPES.md").read_text()
    assert text == config.recipe_markdown(), "regenerate it: python -m nanoseek.config > docs/RECIPES.md"
    for section in RECIPE:
        assert all(f"| `{key}` |" in text for key in recipe_keys(section)), section


@pytest.mark.parametrize("command", sorted(STAGES))
def test_stage_help_lists_every_field_with_its_help(command, capsys):
    text = help_of(command, capsys)
    for f in dataclasses.fields(STAGES[command]):
        assert squeezed("--" + f.name.replace("_", "-")) in text and squeezed(f.metadata["help"]) in text, f.name


def test_run_help_lists_every_key_of_run_data_and_eval(capsys):
    text = help_of("run", capsys)
    for section in ("run", "data", "eval"):
        for key, f in recipe_keys(section).items():
            assert squeezed(f"{key} = ") in text and squeezed(f.metadata["help"]) in text, (section, key)


def test_flags_keep_their_names_types_and_defaults():
    args = build_parser().parse_args(["pretrain", "--device-batch", "4", "--lr", "0.01", "--no-progress"])
    o = from_args(TrainConfig, args)
    assert (o.device_batch, o.lr, o.progress, o.steps, o.schedule, o.device) == (4, 0.01, False, 200, "cosine", None)
    args = build_parser().parse_args(["eval", "ckpt", "--task", "addition", "countdown", "--difficulty", "2"])
    assert (args.ckpt, from_args(config.EvalConfig, args).task, args.difficulty) == (
        ["ckpt"], ["addition", "countdown"], [2])


def test_tasks_and_difficulties_are_lists_given_either_way():
    assert RLConfig(task="addition, countdown").task == ["addition", "countdown"]
    assert RLConfig(task=["addition,countdown"]).task == RLConfig(task=["addition", "countdown"]).task
    assert RSConfig(replay="").replay == [] and RSConfig().replay == ["addition"]
    assert RSConfig(difficulty=3).difficulty == [3] and RSConfig(difficulty=0).difficulty == []
    assert RSConfig(difficulty=3).levels == 3 and RLConfig(difficulty=[2, 3]).levels == [2, 3]
    assert RLConfig().levels is None and config.MTPConfig().task == ["addition", "countdown"]
    args = build_parser().parse_args(["rl", "--task", "addition,countdown", "--replay-difficulty", "1", "2"])
    o = from_args(RLConfig, args)
    assert o.task == ["addition", "countdown"] and o.replay_difficulty == [1, 2] and o.replay == []
    recipe = load_recipe("smoke", {"rl.task": "addition,countdown", "rs.difficulty": 2})
    assert recipe["rl"]["task"] == ["addition", "countdown"] and recipe["rs"]["difficulty"] == [2]
    assert load_recipe("smoke", {"rl.task": ["addition"]})["rl"]["task"] == ["addition"]


def test_recipe_values_of_the_wrong_type_are_named():
    with pytest.raises(RecipeError, match=r"\[rl\] task should be list or str, got 3"):
        load_recipe("smoke", {"rl.task": 3})
    with pytest.raises(RecipeError, match=r"\[rl\] dynamic_sampling should be bool, got 1"):
        load_recipe("smoke", {"rl.dynamic_sampling": 1})
    with pytest.raises(RecipeError, match=r"\[data\] sft_problems should be int or dict"):
        load_recipe("smoke", {"data.sft_problems": {"addition": "many"}})
    assert load_recipe("smoke", {"rl.lr": 1})["rl"]["lr"] == 1  # an int serves for a float


def test_rs_fine_tunes_with_its_own_training_fields_and_trainings_defaults_elsewhere():
    o = RSConfig(init="ck", out="o", steps=7, lr=0.5, keep=9, seed=3, device="cpu")
    sft = TrainConfig(**values(o, FineTune), data="d")
    assert (sft.init, sft.out, sft.steps, sft.lr, sft.seed, sft.device, sft.eval_every) == ("ck", "o", 7, 0.5, 3,
                                                                                             "cpu", 0)
    assert sft.keep == TrainConfig().keep  # rs's keep counts completions, not checkpoints
    with pytest.raises(ValueError, match=r"unknown rs options \['group'\]"):
        config.config_from(RSConfig, {"group": 8})
