"""What the benchmarks share: transformers kept quiet, device sync, sides taking turns in rounds, the spread of
each side's figures and the ratio of medians, held-out task conversations, and a spread as text."""

import statistics

import torch


def quiet_transformers():
    """transformers reports the MTP weights it does not use on every load; the benchmarks know."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(sides, rounds):
    """{side: [its figure in each round]}: every round measures each side once, in turn, so a change in the
    machine's load hits all sides alike."""
    figures = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            figures[name].append(measure())
    return figures


def spread(figures):
    return {"median": statistics.median(figures), "min": min(figures), "max": max(figures), "rounds": figures}


def compare(ours, theirs):
    """Median and range of each side's figures, and the ratio of the medians."""
    return {"nanoseek": spread(ours), "llama.cpp": spread(theirs),
            "speedup": statistics.median(ours) / statistics.median(theirs)}


def held_out_conversations(tasks, n, difficulty=None):
    """n held-out problems of each task (the ones `nanoseek eval` asks), as chat messages."""
    from nanoseek.evaluate import test_problems
    from nanoseek.tasks import get_task

    return [p.messages() for name in tasks for p in test_problems(get_task(name), n, 0, difficulty)]


def spread_text(f):
    """A spread as printed: median (min-max)."""
    return f"{f['median']:8.1f} ({f['min']:.1f}-{f['max']:.1f})"


