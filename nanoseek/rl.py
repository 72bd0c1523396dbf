"""GRPO with rule-checked rewards (DeepSeekMath / R1), with the fixes people rely on.

Per step: P problems, G completions each through the engine; reward = accuracy + format (weights set by
options) minus an optional over-length penalty; group-relative advantages (std-normalised, or mean-only as
in Dr. GRPO); mu passes of the PPO-clipped objective with separate eps_low / eps_high (clip-higher),
token-level normalisation, optional k3 KL to the frozen starting model; dynamic sampling drops groups whose
rewards are all equal and draws more problems in their place. Tokens a tool wrote into a rollout (the engine's
forced tokens) are context only: out of the loss, the log-probabilities scored, the KL and the entropy.
"""

import math
import os
import random
import time
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from nanoseek import checkpoint
from nanoseek.config import RLConfig, config_from, sample_levels
from nanoseek.device import all_reduce, any_rank, choose_compute, stage_ranks, start_ranks
from nanoseek.engine import Engine, Sequence
from nanoseek.evaluate import evaluate_model, test_problems
from nanoseek.model import logit_chunk
from nanoseek.optim import build_optimizer, optimizer_tensors, restore_optimizer
from nanoseek.rundir import Run, plot, read_metrics, resume_point, save_checkpoint
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import Reward, as_chat, get_tasks
from nanoseek.unlikelihood import repeats_a_call

# ----------------------------------------------------------------------------- the math


def group_advantages(rewards: torch.Tensor, mode="std"):
    """rewards (P, G) -> advantages (P, G): minus the group mean, divided by the group std for 'std'."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if mode == "mean":
        return centred
    if mode != "std":
        raise ValueError(f"advantage must be 'std' or 'mean', not {mode!r}")
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4)


def grpo_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28, beta=0.0, ref_logp=None, n_tokens=None):
    """Token-level GRPO objective (to minimise) and its statistics (0-d tensors).

    logp, old_logp, ref_logp, mask: (N, T) per completion token; advantages: (N,) per completion, or (N, T)
    per token where a row holds several completions.
    loss = sum over tokens of -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3, / n_tokens,
    with r = exp(logp - old_logp) and k3 = exp(ref - logp) - (ref - logp) - 1. n_tokens defaults to the mask's
    count; a micro-batch passes the whole step's, so its losses and statistics add up to the step's.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    n = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    loss = (per_token * mask).sum() / n
    clip_frac = ((clipped < unclipped) & mask.bool()).sum() / n
    return loss, {"kl": (kl * mask).sum().detach() / n, "clip_frac": clip_frac.detach()}


def token_logprobs(net, ids, completion_mask, temperature=1.0, positions=None, sees=None):
    """Log-probabilities (N, T - 1) of ids[:, 1:] under the policy that samples at `temperature` (logits / T),
    and that policy's entropy summed over completion tokens (a 0-d tensor, no gradient). positions (N, T) and
    sees (N, T, T), the earlier tokens each token attends to, for rows that pack several sequences (Rows).

    The logits are made logit_chunk tokens at a time along the sequence, and made again in the backward, so
    (N, T, vocab) never exists in fp32 at once."""
    h = net(ids, hidden=True, position_ids=positions, attention_mask=sees)[:, :-1]  # (N, T - 1, D); through
    # the wrapper, so DDP sees the forward
    head = getattr(net, "module", net).lm_head.weight
    width = max(1, logit_chunk(head.shape[0]) // ids.shape[0])  # positions per chunk
    grad = torch.is_grad_enabled()
    pieces = [recompute_in_backward(_chunk_logprobs, hc, head, tc, temperature, use_reentrant=False) if grad
              else _chunk_logprobs(hc, head, tc, temperature)
              for hc, tc in zip(h.split(width, dim=1), ids[:, 1:].split(width, dim=1))]
    logp = torch.cat([lp for lp, _ in pieces], dim=1)
    entropy = torch.cat([e for _, e in pieces], dim=1)
    return logp, (entropy * completion_mask[:, 1:]).sum()


def _chunk_logprobs(h, head, targets, temperature):
    """h (N, C, D), targets (N, C) -> log-probabilities (N, C) and entropies (N, C, no gradient)."""
    logp_all = F.log_softmax(F.linear(h, head).float() / temperature, dim=-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), entropy


PACKED_WIDTH = 512  # tokens up to which a row takes more completions of its problem behind one prompt


class Rows(NamedTuple):
    """One forward's rows (R, W): token ids, positions, which earlier tokens each token sees (R, W, W), 1 where
    the token is a completion's (its log-probability is scored), and that completion's advantage there."""

    ids: torch.Tensor
    positions: torch.Tensor | None
    sees: torch.Tensor | None
    mask: torch.Tensor
    advantages: torch.Tensor

    def logprobs(self, net, temperature):
        """token_logprobs of these rows under net."""
        return token_logprobs(net, self.ids, self.mask, temperature, self.positions, self.sees)


class PackedRow(NamedTuple):
    """One row of shared_prompt_rows, as lists over its tokens; segment 0 is the prompt, i the i-th completion;
    mask 1 on the completions' sampled tokens."""

    ids: list
    positions: list
    segment: list
    mask: list
    advantages: list

    @property
    def completions(self):
        return max(self.segment, default=0)


def shared_prompt_rows(groups, per_row=0):
    """Rows that hold a problem's prompt once and several of its completions after it, each completion seeing
    the prompt and itself only, at the positions it was sampled at, so its log-probabilities are those of the
    completion alone while the prompt is computed once: prompt[:-1], then for each completion the prompt's last
    token (whose hidden state predicts the completion's first token) and the completion.

    groups: [(prompt ids, [(completion ids, advantage, trained)])], trained 1 on each token the policy sampled and
    0 on one a tool wrote (Sequence.forced), which is context, never scored. A row takes at most per_row
    completions (0: any) and more than one only while it stays within PACKED_WIDTH tokens, so long completions
    keep a row each.
    -> [PackedRow]."""
    rows = []
    for prompt, completions in groups:
        start, row = len(prompt) - 1, None
        for tokens, advantage, trained in completions:
            if row is None or row.completions == per_row or len(row.ids) + 1 + len(tokens) > PACKED_WIDTH:
                row = PackedRow(list(prompt[:-1]), list(range(start)), [0] * start, [0] * start, [0.0] * start)
                rows.append(row)
            segment = row.completions + 1
            row.ids.extend([prompt[-1], *tokens])
            row.positions.extend(range(start, start + 1 + len(tokens)))
            row.segment.extend([segment] * (1 + len(tokens)))
            row.mask.extend([0, *trained])
            row.advantages.extend([0.0] + [advantage] * len(tokens))
    return rows


def micro_batches(rows, per_forward):
    """rows in pieces of at most per_forward completions (0: one piece), a row never split."""
    pieces, count = [], 0
    for row in rows:
        if not pieces or (per_forward and count + row.completions > per_forward):
            pieces.append([])
            count = 0
        pieces[-1].append(row)
        count += row.completions
    return pieces


def pack(rows, device):
    """Rows of shared_prompt_rows as tensors, padded on the right to the longest. Where no row holds more than
    one completion, positions and sees are None: each row is a prompt and a completion, plain causal attention
    (no (R, W, W) mask to hold for long completions)."""
    width = max(len(row.ids) for row in rows)
    padded = [[part + [0] * (width - len(part)) for part in row] for row in rows]
    ids, positions, segment, mask, advantages = (torch.tensor(list(column), device=device) for column in zip(*padded))
    if max(row.completions for row in rows) <= 1:
        return Rows(ids, None, None, mask.float(), advantages.float())
    segment = torch.where(torch.arange(width, device=device) < torch.tensor([len(row.ids) for row in rows],
                                                                            device=device)[:, None], segment, -1)
    index = torch.arange(width, device=device)
    sees = (index[:, None] >= index[None, :]) & (segment[:, None, :] >= 0) & (
        (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0))
    sees |= torch.eye(width, dtype=torch.bool, device=device)  # padding sees itself: finite, never scored
    return Rows(ids, positions, sees, mask.float(), advantages.float())


# ----------------------------------------------------------------------------- rollouts and their rewards


def steps_share(task, problem, completion):
    """The share of the completion's reasoning steps a rule finds right (0 without steps or check_steps)."""
    if not hasattr(task, "check_steps"):
        return 0.0
    right, steps = task.check_steps(problem, completion)
    return right / steps if steps else 0.0


class Group(NamedTuple):
    """One problem's G rollouts: the prompt's ids, the completions, their scores, total rewards and whether each
    repeats a calculator call."""

    prompt: list[int]
    completions: list[Sequence]
    rewards: list[Reward]
    totals: list[float]
    repeats: list[bool]


def score_group(o, task, problem, prompt, completions, call_ids):
    """A problem's Group: each completion scored by the task, and its total reward: accuracy, format and (with
    step_weight) the share of right reasoning steps, weighted, less the over-length penalty when it ran out of
    tokens and the repeat penalty when it made a calculator call twice (call_ids: the call's begin and end ids)."""
    rewards = [task.score(problem, s.text) for s in completions]
    repeats = [repeats_a_call(s.tokens, *call_ids) for s in completions]
    totals = [o.accuracy_weight * r.accuracy + o.format_weight * r.format
              + (o.step_weight * steps_share(task, problem, s.text) if o.step_weight else 0.0)
              - (o.overlong_penalty if s.finish_reason == "length" else 0.0)
              - (o.repeat_penalty if repeated else 0.0)
              for r, s, repeated in zip(rewards, completions, repeats)]
    return Group(prompt, completions, rewards, totals, repeats)


def advantage_groups(kept, mode):
    """[(prompt ids, [(completion ids, advantage, 1 where sampled / 0 where forced)])] of the kept Groups, the
    advantages group-relative (group_advantages with `mode`)."""
    if not kept:
        return []
    advantages = group_advantages(torch.tensor([g.totals for g in kept]), mode).tolist()
    return [(g.prompt, [(s.tokens, a, [int(not f) for f in s.forced]) for s, a in zip(g.completions, adv)])
            for g, adv in zip(kept, advantages)]


def update_batches(groups, micro_batch, drop_zero, bos_id, device):
    """The update's forwards for groups (advantage_groups): Rows of at most micro_batch completions each, the
    completions of advantage 0 left out with drop_zero (without the KL term they add nothing to the loss or
    gradient). With nothing to train, one row of two BOS tokens that scores none."""
    if drop_zero:
        groups = [(p, [c for c in completions if c[1] != 0]) for p, completions in groups]
    rows = shared_prompt_rows(groups, micro_batch)
    return [pack(piece, device) for piece in micro_batches(rows, micro_batch)] or \
        [pack([PackedRow([bos_id] * 2, [0, 1], [0, 0], [0, 0], [0.0, 0.0])], device)]


def replay_batch(tokenizer, tasks, levels, rows, rng):
    """Inputs and targets (rows, T) of fresh worked solutions of tasks at levels, the targets -100 but on the
    assistant's tokens."""
    chats = []
    for i in range(rows):
        task = tasks[i % len(tasks)]
        problem = task.sample(rng, "train", levels)
        chats.append(tokenizer.render_chat(as_chat(problem, *task.solve(problem))))
    width = max(len(ids) for ids, _ in chats)
    x = torch.full((len(chats), width), tokenizer.pad_id)
    y = torch.full((len(chats), width), -100)
    for i, (ids, mask) in enumerate(chats):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    return x, y


def rollout_metrics(kept, seen):
    """Reward, accuracy, format, the share that repeats a calculator call and response length as means over every
    completion the ranks kept, and the groups they kept and saw."""
    sums = {  # over this rank's kept groups, then summed over the ranks
        "reward": sum(t for g in kept for t in g.totals),
        "accuracy": sum(r.accuracy for g in kept for r in g.rewards),
        "format": sum(r.format for g in kept for r in g.rewards),
        "repeats": sum(sum(g.repeats) for g in kept),
        "response_length": sum(len(s.tokens) for g in kept for s in g.completions),
        "completions": sum(len(g.completions) for g in kept),
        "groups_kept": len(kept),
        "groups_seen": seen,
    }
    sums = dict(zip(sums, all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    n = max(1.0, sums.pop("completions"))
    return {**{key: sums[key] / n for key in ("reward", "accuracy", "format", "repeats", "response_length")},
            "groups_kept": int(sums["groups_kept"]), "groups_seen": int(sums["groups_seen"])}


def greedy_accuracy(engine, tasks, o):
    """{"heldout_TASK": greedy accuracy, and "attempts_TASK": the attempts a searching task's answers take} on
    a fixed set of o.eval_n test problems of each (task, levels) in tasks."""
    accuracy = {}
    for task, levels in tasks:
        rows = evaluate_model(engine, task, test_problems(task, o.eval_n, o.seed, levels),
                              max_new_tokens=o.max_new_tokens)
        accuracy[f"heldout_{task.name}"] = sum(r["correct"] for r in rows) / len(rows)
        if rows[0]["attempts"] is not None:
            accuracy[f"attempts_{task.name}"] = sum(r["attempts"] for r in rows) / len(rows)
    return accuracy


def check_options(o, world):
    """A ValueError for options GRPO cannot run with."""
    if not o.init or not o.out:
        raise ValueError("--init (an SFT checkpoint) and --out are required")
    if o.temperature <= 0:
        raise ValueError(f"--temperature {o.temperature}: GRPO samples its groups, give a temperature above 0")
    if o.micro_batch < 0:
        raise ValueError(f"--micro-batch {o.micro_batch}: give rollouts per forward, or 0 for all at once")
    if o.prompts % world:
        raise ValueError(f"--prompts {o.prompts} must divide over {world} ranks")


def load_policy(o, point, device):
    """(policy, tokenizer, reference) on device: the policy and tokenizer of the resume point, else of --init,
    its MTP modules frozen (GRPO trains the main model only; DDP wants a gradient for every weight it holds);
    the reference, the frozen --init model of the KL term, when beta > 0 (else None)."""
    source = point.path if point else o.init
    model, tokenizer = (point.model, point.tokenizer) if point else checkpoint.load(source)
    model.to(device)
    if tokenizer is None:
        raise ValueError(f"{source} has no tokenizer")
    ref = None
    if o.beta > 0:
        ref = checkpoint.load(o.init, device)[0].eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    for p in model.mtp.parameters():
        p.requires_grad_(False)
    return model, tokenizer, ref


# ----------------------------------------------------------------------------- the loop


class GRPO:
    """One rank's part of a GRPO run: the policy (and the reference of the KL term), its optimizer, the engine
    that samples its rollouts, and the steps."""

    def __init__(self, o):
        self.o = o
        self.compute = choose_compute(o.device, o.dtype)
        self.device = self.compute.device
        self.rank, self.world = start_ranks(self.device)
        self.rank0 = self.rank == 0
        check_options(o, self.world)
        self.tasks, self.replay_tasks = get_tasks(o.task, o.checker), get_tasks(o.replay, o.checker)
        self.difficulty = o.levels
        self.replay_difficulty = sample_levels(o.replay_difficulty) or self.difficulty
        if not self.tasks:
            raise ValueError("--task names no task: give a built-in task, a .jsonl file or file.py:ClassName")
        levels = {**{t.name: self.replay_difficulty for t in self.replay_tasks},
                  **{t.name: self.difficulty for t in self.tasks}}  # held out: each task once, at its levels
        self.eval_tasks = [(t, levels[t.name]) for t in {t.name: t for t in self.tasks + self.replay_tasks}.values()]
        point = resume_point(o.out) if o.resume else None
        self.model, self.tokenizer, self.ref = load_policy(o, point, self.device)
        self.net = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.opt = build_optimizer(self.model, o.optimizer, o.lr, o.weight_decay, (0.9, 0.99))
        self.engine = Engine(self.model, self.tokenizer, max_batch=max(1, o.prompts // self.world) * o.group,
                             dtype=o.dtype)
        self.start_step = point.meta["step"] if point else 0
        if point:
            restore_optimizer(self.opt, self.model, point.states["optimizer.safetensors"])
            if self.rank0:
                print(f"resuming from {point.path} at step {self.start_step}")

    def draw(self, step, draw):
        """This rank's problems of one draw at `step`, G completions each through the engine, scored: [Group]
        and the tokens generated."""
        o, per_rank = self.o, self.o.prompts // self.world
        rng = random.Random(hash((o.seed, step, draw, self.rank)) & 0xFFFFFFFF)
        tasks = [self.tasks[(self.rank * per_rank + i) % len(self.tasks)] for i in range(per_rank)]
        problems = [task.sample(rng, "train", self.difficulty) for task in tasks]
        prompts = [self.tokenizer.render_chat(p.messages(), add_generation_prompt=True)[0] for p in problems]
        params = [SamplingParams(max_tokens=o.max_new_tokens, temperature=o.temperature,
                                 seed=(o.seed * 7919 + step * 104729 + draw * 1299709 + self.rank * 15485863
                                       + i) & 0x7FFFFFFF)
                  for i in range(per_rank * o.group)]
        seqs = self.engine.generate([p for p in prompts for _ in range(o.group)], params)
        call_ids = (self.tokenizer.call_begin_id, self.tokenizer.call_end_id)
        groups = [score_group(o, task, problem, prompts[i], seqs[i * o.group : (i + 1) * o.group], call_ids)
                  for i, (task, problem) in enumerate(zip(tasks, problems))]
        return groups, sum(len(s.tokens) for s in seqs)

    def rollouts(self, step):
        """This rank's Groups, how many groups it drew and how many tokens it generated; dynamic sampling drops
        groups whose rewards are all equal and draws others instead."""
        o, per_rank = self.o, self.o.prompts // self.world
        kept, draws, seen, generated = [], 0, 0, 0
        while len(kept) < per_rank and draws <= (o.max_draws if o.dynamic_sampling else 0):
            groups, tokens = self.draw(step, draws)
            kept += [g for g in groups if not (o.dynamic_sampling and max(g.totals) == min(g.totals))]
            seen, generated, draws = seen + len(groups), generated + tokens, draws + 1
        return kept[:per_rank], seen, generated

    def update(self, kept, step):
        """mu passes of the clipped objective over this step's rollouts, in rows that hold each prompt once with
        its completions (shared_prompt_rows), at most micro_batch rollouts per forward with gradients
        accumulated (the update does not depend on the micro-batch), then the replay loss; statistics.

        Ranks agree first: when no rank kept a group, none trains; otherwise every rank runs the same
        passes, one that kept none on an empty batch (zero loss and gradient), so DDP's all-reduce finds it."""
        o = self.o
        if not any_rank(bool(kept)):
            return {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0}
        groups = advantage_groups(kept, o.advantage)
        n_tokens = torch.tensor(float(sum(sum(m) for _, completions in groups for _, _, m in completions)) or 1.0,
                                device=self.device)  # the loss is a mean over every sampled completion token
        batches = update_batches(groups, o.micro_batch, o.beta == 0, self.tokenizer.bos_id, self.device)
        n_trained = sum(b.mask[:, 1:].sum() for b in batches).clamp(min=1)
        with torch.no_grad(), self.compute.autocast():  # with one pass the policy that sampled is the one updated
            old = [b.logprobs(self.model, o.temperature)[0] if o.mu > 1 else None for b in batches]
            ref = [b.logprobs(self.ref, o.temperature)[0] if self.ref is not None else None for b in batches]
        self.model.train()
        for _ in range(o.mu):
            totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0}
            for i, b in enumerate(batches):
                sync = self.world == 1 or (i == len(batches) - 1 and not self.replay_tasks)
                with (nullcontext() if sync else self.net.no_sync()), self.compute.autocast():
                    logp, entropy = b.logprobs(self.net, o.temperature)
                    old_logp = logp.detach() if old[i] is None else old[i]
                    loss, stats = grpo_loss(logp, old_logp, b.advantages[:, 1:], b.mask[:, 1:], o.eps_low,
                                            o.eps_high, o.beta, ref[i], n_tokens)
                    loss.backward()
                for key, value in {"loss": loss.detach(), "entropy": entropy / n_trained, **stats}.items():
                    totals[key] = totals[key] + value
            if self.replay_tasks:
                with self.compute.autocast():
                    replay = self.replay_loss(step)
                    replay.backward()
                totals["replay_loss"] = replay.detach()
                totals["loss"] = totals["loss"] + totals["replay_loss"]
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip or float("inf"))
            if math.isfinite(float(grad_norm)):
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        return {**{key: float(value) for key, value in totals.items()}, "grad_norm": float(grad_norm)}

    def replay_loss(self, step):
        """Next-token loss on the assistant tokens of fresh worked solutions of the replay tasks."""
        rng = random.Random(hash((self.o.seed, step, self.rank, -1)) & 0xFFFFFFFF)
        x, y = replay_batch(self.tokenizer, self.replay_tasks, self.replay_difficulty, self.o.replay_rows, rng)
        return self.net(x.to(self.device), targets=y.to(self.device))[1]

    def heldout_accuracy(self):
        """{"heldout_TASK": greedy accuracy} on a fixed set of eval_n test problems of each task and replay task
        (rank 0 alone; the others get {})."""
        if not self.rank0 or not self.o.eval_every:
            return {}
        return greedy_accuracy(self.engine, self.eval_tasks, self.o)

    def save(self, step, final=False, metrics=None):
        if not self.rank0:
            return
        meta = {"metrics": metrics or {}, "trainer": {"task": self.o.task}}
        state = {"optimizer.safetensors": optimizer_tensors(self.opt, self.model)}
        save_checkpoint(self.o, "rl", step, final, self.model, self.tokenizer, meta, state)

    def run(self):
        o, last = self.o, {}
        self.model.eval()
        with Run(o, "rl", self.start_step, self.rank0) as run:
            if self.start_step == 0 and o.eval_every:
                run.log({"step": 0, **self.heldout_accuracy()})
            for step in range(self.start_step, o.steps):
                t0 = time.perf_counter()
                kept, seen, generated = self.rollouts(step)
                rollout_seconds = time.perf_counter() - t0
                for group in self.opt.param_groups:
                    group["lr"] = o.lr * min(1.0, (step + 1) / o.warmup) if o.warmup else o.lr
                stats = self.update(kept, step)
                last = {"step": step + 1, **rollout_metrics(kept, seen), "lr": self.opt.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - t0, "rollout_seconds": rollout_seconds,
                        "rollout_tokens_per_s": generated / rollout_seconds, **stats}
                if o.eval_every and ((step + 1) % o.eval_every == 0 or step + 1 == o.steps):
                    last.update(self.heldout_accuracy())
                run.log(last, reward=f"{last['reward']:.3f}", acc=f"{last['accuracy']:.2f}")
                run.end_step(step + 1, last, self.save)
        if self.rank0:
            plot_rl(run.metrics_file, o.out)
        return last


def plot_rl(metrics_file, out_dir):
    """rl.png: rollout reward, accuracy and format; greedy accuracy on held-out problems (and the attempts a
    searching task's answers take); response length; entropy, clip fraction and KL."""
    rows = read_metrics(metrics_file)
    if not rows:
        return
    heldout = sorted({k for r in rows for k in r if k.startswith("heldout_")})
    attempts = sorted({k for r in rows for k in r if k.startswith("attempts_")})
    plot(rows, os.path.join(out_dir, "rl.png"),
         [("rollout reward", "", {"reward": "reward", "accuracy": "accuracy", "format": "format",
                                  "repeats a call": "repeats"}),
          ("held-out accuracy (greedy)", "", {k.removeprefix("heldout_"): k for k in heldout}),
          *([("attempts per answer (held-out, greedy)", "", {k.removeprefix("attempts_"): k for k in attempts})]
            if attempts else []),
          ("response length (tokens)", "", {"length": "response_length"}),
          ("policy", "", {"entropy": "entropy", "clip fraction": "clip_frac", "KL": "kl"})])


def rl(options: RLConfig | dict):
    """Run GRPO with `options` (an RLConfig, or a dict of its fields); returns the last step's metrics."""
    o = config_from(RLConfig, options)
    with stage_ranks():
        return GRPO(o).run()

