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
"""

import gc
import os
import random
import time

from tqdm import tqdm

from nanoseek import checkpoint, data
from nanoseek.config import FineTune, MTPConfig, TrainConfig, config_from, values
from nanoseek.device import barrier, choose_compute, from_rank0, stage_ranks, start_ranks
from nanoseek.engine import Engine
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import as_chat, get_tasks, parse_completion, with_history
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import train

BATCH = 128  # sequences the engine decodes together


def own_answers(o, compute, show):
    """One-turn chats: o.problems training problems of each task and the model's greedy answer to each (the
    finished ones, with their reasoning as the model wrote it)."""
    model, tokenizer = checkpoint.load(o.init)
    if tokenizer is None:
        raise ValueError(f"{o.init} has no tokenizer")
    tasks = get_tasks(o.task, o.checker)
    if not tasks:
        raise ValueError("--task names no task: give a built-in task, a .jsonl file or file.py:ClassName")
    rng = random.Random(o.seed)
    problems = [task.sample(rng, "train", o.levels) for task in tasks for _ in range(o.problems)]
    engine = Engine(model.to(compute.device), tokenizer, max_batch=BATCH, dtype=o.dtype)
    chats = []
    with tqdm(total=len(problems), disable=not show, desc="mtp answers", dynamic_ncols=True) as bar:
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


def build_data(o, chats, out_dir):
    """The chats, each after 0 to turns - 1 earlier ones, written to out_dir with the model's tokenizer."""
    rng = random.Random(o.seed)
    rng.shuffle(chats)
    docs = list(with_history(chats, o.turns, rng))
    if len(docs) < 2:
        raise ValueError(f"the model finished only {len(docs)} of its answers: answer more problems (--problems) "
                         "or allow longer answers (--max-new-tokens)")
    data.build(None, Tokenizer.load(o.init), out_dir, max(o.val_fraction, 1 / len(docs)), documents=docs)


def align_mtp(options: MTPConfig | dict):
    """Decode the model's own answers, then train its MTP module on them with `options` (an MTPConfig, or a dict
    of its fields). Returns the number of conversations, the training's last metrics and seconds_decoding (0 when
    resumed)."""
    o = config_from(MTPConfig, options)
    if not o.init or not o.out:
        raise ValueError("--init (the final checkpoint) and --out are required")
    if o.problems < 1 or o.turns < 1:
        raise ValueError("--problems and --turns must be at least 1")
    compute = choose_compute(o.device, o.dtype)
    with stage_ranks():
        rank, _ = start_ranks(compute.device)
        return run_stage(o, compute, rank == 0)


def run_stage(o, compute, rank0):
    """Rank 0 decodes and writes the data (unless resumed with it there); every rank trains."""
    data_dir = os.path.join(o.out, "data")
    os.makedirs(o.out, exist_ok=True)
    t0, seconds = time.perf_counter(), 0.0
    if not (o.resume and from_rank0(os.path.exists(os.path.join(data_dir, "manifest.json")))):
        if rank0:
            build_data(o, own_answers(o, compute, o.progress), data_dir)
        seconds = time.perf_counter() - t0
        gc.collect()  # the decoding model and its engine are gone before training starts
        barrier()
    last = train(TrainConfig(**values(o, FineTune), data=data_dir, mtp_only=True, mtp_weight=1.0), "sft")
    conversations = sum(shard["documents"] for split in data.load_manifest(data_dir)["splits"].values()
                        for shard in split)
    return {"conversations": conversations, **last, "seconds_decoding": seconds}
