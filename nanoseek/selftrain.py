"""Self-training: the model generates, a stage keeps what is worth learning from, and the model fine-tunes on it.

This module owns what `nanoseek rs` (rejection.py) and `nanoseek mtp` (mtp.py) share: the ranks a stage runs
on, the model to generate with, the generation done once (not again on --resume), the kept chats written as
out/data by rank 0, and the fine-tuning on every rank. The stages own how they generate, what they keep, and
what their training trains.
"""

import gc
import os
import time

import torch

from nanoseek import checkpoint, data
from nanoseek.config import FineTune, TrainConfig, values
from nanoseek.device import barrier, choose_compute, from_rank0, stage_ranks, start_ranks
from nanoseek.tasks import get_tasks, with_history
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import train


def on_ranks(o, stage):
    """stage(o, compute, rank, world) on o's device and dtype, in the process group of a torchrun launch."""
    compute = choose_compute(o.device, o.dtype)
    with stage_ranks():
        rank, world = start_ranks(compute.device)
        return stage(o, compute, rank, world)


def load_model(o):
    """The model and tokenizer of o.init, to generate with."""
    model, tokenizer = checkpoint.load(o.init)
    if tokenizer is None:
        raise ValueError(f"{o.init} has no tokenizer")
    return model, tokenizer


def training_tasks(o):
    """The tasks of o.task, whose training problems the model answers."""
    tasks = get_tasks(o.task, o.checker)
    if not tasks:
        raise ValueError("--task names no task: give a built-in task, a .jsonl file or file.py:ClassName")
    return tasks


def generate_once(o, compute, output, generate):
    """generate() on every rank, unless --resume finds `output` (what it writes, or the data made of it) on rank 0;
    then its model and engine are freed and the ranks wait for one another. Returns what generate returned (None
    when resumed) and the seconds it took (0 when resumed)."""
    os.makedirs(o.out, exist_ok=True)
    if o.resume and from_rank0(os.path.exists(output)):
        return None, 0.0
    t0 = time.perf_counter()
    kept = generate()
    seconds = time.perf_counter() - t0
    gc.collect()  # the generating model and its engine are gone before training starts
    if compute.device_type == "cuda":
        torch.cuda.empty_cache()
    barrier()
    return kept, seconds


def write_data(o, chats, rng, out_dir, too_few, problems=None):
    """The one-turn chats, shuffled by rng, each after 0 to o.turns - 1 earlier ones (see tasks.with_history),
    written to out_dir with the model's tokenizer. At least one is held out, since the trainer's final evaluation
    reads the held-out split: fewer than two chats is the error too_few, its {} the number of chats."""
    if len(chats) < 2:
        raise ValueError(too_few.format(len(chats)))
    rng.shuffle(chats)
    docs = list(with_history(chats, o.turns, rng, problems))
    data.build(None, Tokenizer.load(o.init), out_dir, max(o.val_fraction, 1 / len(docs)), documents=docs)


def data_dir(o):
    return os.path.join(o.out, "data")


def finetune(o, rank, write, **config):
    """Rank 0 writes the data, write(data_dir), unless --resume finds it there; then every rank fine-tunes on it
    with o's FineTune options and `config` (more TrainConfig fields). Returns the training's last metrics."""
    if rank == 0 and not (o.resume and os.path.exists(os.path.join(data_dir(o), "manifest.json"))):
        write(data_dir(o))
    barrier()
    return train(TrainConfig(**values(o, FineTune), data=data_dir(o), **config), "sft")
