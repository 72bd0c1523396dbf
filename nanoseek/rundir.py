"""What the training loops (train.py: pretrain and SFT; rl.py: GRPO) share around their steps.

    out/step_000100/   resumable checkpoints (Hugging Face directories with trainer_state/)
    out/final/         the finished model
    out/metrics.jsonl  one line per step; a resumed run rewrites the lines after its step
    out/*.png          plots of the metrics

The checkpoints in an output directory (listing, pruning, the newest whole one to resume from, writing one with
the record every stage keeps); metrics lines and plots; and `Run`, the part of the loop around the steps: SIGINT
or SIGTERM asks the run to save and stop, a progress bar, and at the end of each step a checkpoint when one is due.
"""

import json
import os
import re
import shutil
import signal
from typing import NamedTuple

from tqdm import tqdm

from nanoseek import checkpoint
from nanoseek.device import any_rank, barrier

# ----------------------------------------------------------------------------- checkpoints


def checkpoints_in(out):
    """(step, path) of the resumable checkpoints in out, oldest first (damaged ones included, by their name)."""
    found = []
    if os.path.isdir(out):
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if not ((re.fullmatch(r"step_\d+", name) or name == "final") and os.path.isdir(path)):
                continue
            try:
                meta = checkpoint.load_meta(path)
                if "trainer" not in meta:
                    continue
                step = meta["step"]
            except checkpoint.CheckpointError:
                step = int(name[5:]) if name != "final" else 1 << 60
            found.append((step, name == "final", path))
    return [(s, p) for s, _, p in sorted(found)]


def prune_checkpoints(out, keep):
    """Remove all but the newest `keep` step checkpoints in out (final/ is never removed)."""
    steps = [p for _, p in checkpoints_in(out) if os.path.basename(p) != "final"]
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


class ResumePoint(NamedTuple):
    path: str
    model: object  # DeepSeekV3
    tokenizer: object  # Tokenizer
    meta: dict  # nanoseek.json
    states: dict  # trainer_state/ file name -> named tensors


def resume_point(out, say=print):
    """The newest checkpoint in out that loads whole, as a ResumePoint; None when out has none.

    A damaged checkpoint is reported and the one before it is tried."""
    found = checkpoints_in(out)
    for _, path in reversed(found):
        try:
            model, tok = checkpoint.load(path)
            meta = checkpoint.load_meta(path)
            names = sorted(os.listdir(os.path.join(path, "trainer_state")))
            states = {n: checkpoint.load_trainer_state(path, n) for n in names}
            return ResumePoint(path, model, tok, meta, states)
        except (checkpoint.CheckpointError, OSError, KeyError) as e:
            say(f"warning: cannot resume from {path}: {e}; falling back to the checkpoint before it")
    if found:
        raise checkpoint.CheckpointError(f"every checkpoint in {out} is damaged; start again without --resume")
    return None


def save_checkpoint(o, stage, step, final, model, tokenizer, meta, trainer_state, state_dict=None):
    """Write o.out/step_N (or o.out/final) recording what made it, then keep the newest o.keep step checkpoints.

    nanoseek.json holds the stage, step, parent checkpoint and every option, plus `meta` (which must hold
    "metrics" and "trainer": what resume needs beyond trainer_state/)."""
    path = os.path.join(o.out, "final" if final else f"step_{step:06d}")
    meta = {"stage": stage, "step": step, "parent": o.init, "options": vars(o), **meta}
    checkpoint.save(path, model, tokenizer, meta, trainer_state=trainer_state, state_dict=state_dict)
    prune_checkpoints(o.out, o.keep)


# ----------------------------------------------------------------------------- metrics


def append_metrics(file, row):
    with open(file, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(file, start_step):
    """Keep the lines of steps up to start_step: a resumed run rewrites what came after."""
    if not os.path.exists(file):
        return
    with open(file) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, file)


def read_metrics(file):
    with open(file) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows, path, panels):
    """A PNG of side-by-side panels over the steps of `rows`; a panel is (title, y label, {label: key}).

    A key only some rows hold (held-out figures, every few steps) is drawn as points on the steps that have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 4 * len(panels), 4), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        for label, key in series.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), "-" if len(points) == len(rows) else "o-", label=label)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


class Run:
    """The loop around a run's steps, on every rank: `with Run(o, stage, start_step, rank0) as run:`.

    SIGINT or SIGTERM lets the step under way finish, writes a checkpoint and stops (KeyboardInterrupt: the
    CLI exits with 130); metrics.jsonl is cut back to start_step on entry. Rank 0 alone writes and shows."""

    def __init__(self, o, stage, start_step, rank0):
        self.o, self.stage, self.start_step, self.rank0 = o, stage, start_step, rank0
        self.metrics_file = os.path.join(o.out, "metrics.jsonl")
        self.stop_signal = None

    def __enter__(self):
        os.makedirs(self.o.out, exist_ok=True)
        if self.rank0:
            truncate_metrics(self.metrics_file, self.start_step)
        self.previous = {sig: signal.signal(sig, self._ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.bar = tqdm(total=self.o.steps, initial=self.start_step, disable=not (self.rank0 and self.o.progress),
                        desc=self.stage, dynamic_ncols=True)
        return self

    def __exit__(self, *exc):
        self.bar.close()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _ask_to_stop(self, signum, frame):
        self.stop_signal = signum

    def log(self, row, **shown):
        """Append a line to metrics.jsonl; with `shown` (name=text), a finished step: the bar advances."""
        if not self.rank0:
            return
        append_metrics(self.metrics_file, row)
        if shown:
            self.bar.set_postfix(refresh=False, **shown)
            self.bar.update(1)

    def say(self, text):
        if self.rank0:
            tqdm.write(text)

    def end_step(self, step, metrics, save):
        """After `step` steps: save(step, final=..., metrics=...) on every rank when a checkpoint is due (every
        o.ckpt_every steps, at the last step, or when any rank was asked to stop); then stop if asked."""
        done = step == self.o.steps
        stop = any_rank(self.stop_signal is not None)
        if done or (self.o.ckpt_every and step % self.o.ckpt_every == 0) or stop:
            save(step, final=done, metrics=metrics)
            barrier()
        if stop and not done:
            self.bar.close()
            if self.rank0:
                print(f"interrupted: checkpoint written at step {step} in {self.o.out}; rerun with --resume")
            raise KeyboardInterrupt
