"""`nanoseek mtp`: the MTP module learns to draft what the finished model writes.

Self-speculative decoding (speculation.Speculator) keeps a drafted token only where the main model agrees, so the
draft is worth what it predicts of the model's own greedy output. After GRPO the main model has moved away
from the text the MTP module was trained on (GRPO trains the main model only), and a recipe may not train it
at all before. This stage decodes the model's greedy answers to training problems of its tasks through the
engine, then trains the MTP module alone on them (the main model, its embedding and output head frozen), as
SFT conversations of one to `turns` turns.

    out/data/   the model's own conversations, as `nanoseek data` writes them
    out/final/  the model with its new MTP module; step checkpoints, metrics.jsonl and loss.png as rundir.py writes

--resume reuses out/data and continues training from the newest checkpoint in out.

This module owns the decoding, what is kept of it and the MTP-only training; selftrain.py the stage's steps
(generation once, data, training) that `nanoseek rs` shares.
"""

import os
import random

from tqdm import tqdm

from nanoseek import data
from nanoseek.config import MTPConfig, config_from
from nanoseek.engine import Engine
from nanoseek.sampling import SamplingParams
from nanoseek.selftrain import data_dir, finetune, generate_once, load_model, on_ranks, training_tasks, write_data
from nanoseek.tasks import as_chat, parse_completion

BATCH = 128  # sequences the engine decodes together
TOO_FEW = ("the model finished only {} of its answers: answer more problems (--problems) or allow longer answers "
           "(--max-new-tokens)")


def own_answers(o, compute):
    """One-turn chats: o.problems training problems of each task and the model's greedy answer to each (the
    finished ones, with their reasoning as the model wrote it)."""
    model, tokenizer = load_model(o)
    tasks = training_tasks(o)
    rng = random.Random(o.seed)
    problems = [task.sample(rng, "train", o.levels) for task in tasks for _ in range(o.problems)]
    engine = Engine(model.to(compute.device), tokenizer, max_batch=BATCH, dtype=o.dtype)
    chats = []
    with tqdm(total=len(problems), disable=not o.progress, desc="mtp answers", dynamic_ncols=True) as bar:
        for start in range(0, len(problems), BATCH):
            batch = problems[start : start + BATCH]
            prompts = [tokenizer.render_chat(p.messages(), add_generation_prompt=True)[0] for p in batch]
            greedy = SamplingParams(max_tokens=o.max_new_tokens, temperature=0)
            for problem, seq in zip(batch, engine.generate(prompts, greedy)):
                reasoning, answer, formed = parse_completion(seq.text)
                if seq.finish_reason == "stop" and formed:  # right or wrong: what the model writes
                    chats.append(as_chat(problem, reasoning, answer))
            bar.update(len(batch))
    return chats


def run_stage(o, compute, rank, world):
    """Rank 0 decodes (unless resumed with the data there) and writes the data; every rank trains the MTP module."""
    manifest = os.path.join(data_dir(o), "manifest.json")
    chats, seconds = generate_once(o, compute, manifest, lambda: own_answers(o, compute) if rank == 0 else None)
    last = finetune(o, rank, lambda out_dir: write_data(o, chats, random.Random(o.seed), out_dir, TOO_FEW),
                    mtp_only=True, mtp_weight=1.0)
    conversations = sum(shard["documents"] for split in data.load_manifest(data_dir(o))["splits"].values()
                        for shard in split)
    return {"conversations": conversations, **last, "seconds_decoding": seconds}


def align_mtp(options: MTPConfig | dict):
    """Decode the model's own answers, then train its MTP module on them with `options` (an MTPConfig, or a dict
    of its fields). Returns the number of conversations, the training's last metrics and seconds_decoding (0 when
    resumed)."""
    o = config_from(MTPConfig, options)
    if not o.init or not o.out:
        raise ValueError("--init (the final checkpoint) and --out are required")
    if o.problems < 1 or o.turns < 1:
        raise ValueError("--problems and --turns must be at least 1")
    return on_ranks(o, run_stage)
