"""Pretraining and SFT: one loop, two data modes (text shards, or chat shards with an assistant-only mask).

Writes what every training loop writes (see rundir.py: step checkpoints, final/, metrics.jsonl), and loss.png
and experts.png beside them.

Runs on one CPU or GPU, or under `torchrun --nproc_per_node N -m nanoseek pretrain ...` with DDP
(or FSDP2 with --fsdp). The global batch is the same whatever the number of ranks.
"""

import functools
import math
import os
import time
from contextlib import nullcontext

import torch

from nanoseek import checkpoint
from nanoseek.config import TrainConfig, config_from
from nanoseek.data import DataError, Loader, load_manifest, sequential_batches
from nanoseek.device import all_reduce, choose_compute, stage_ranks, start_ranks
from nanoseek.hardware import peak_flops
from nanoseek.model import (
    DeepSeekV3,
    config_for_size,
    flops_per_token,
    param_counts,
    round_up,
    sequence_balance_loss,
    target_counts,
)
from nanoseek.optim import build_optimizer, optimizer_tensors, restore_optimizer
from nanoseek.rundir import Run, plot, read_metrics, resume_point, save_checkpoint
from nanoseek.tokenizer import Tokenizer
from nanoseek.unlikelihood import repeated_call_negatives


class TrainingError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- schedule


def lr_at(step, o):
    """Linear warmup to o.lr, then cosine (or stable, then linear decay for wsd) down to o.lr * o.min_lr_ratio."""
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "wsd":
        decay_start = int(o.steps * (1 - o.decay_frac))
        if step < decay_start:
            return o.lr
        return o.lr - (o.lr - floor) * (step - decay_start + 1) / max(1, o.steps - decay_start)
    progress = (step - o.warmup) / max(1, o.steps - o.warmup)
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- setup


def micro_steps(batch, device_batch, world):
    """Forwards per optimizer step on each rank: batch / (device_batch x world), one when device_batch is 0 or
    holds a rank's whole share; a message when the numbers do not divide."""
    if device_batch < 0:
        raise ValueError(f"--device-batch {device_batch}: give rows per forward, or 0 for a rank's whole share")
    if batch % world:
        raise ValueError(f"--batch {batch} must divide over {world} ranks")
    per_rank = batch // world
    if device_batch <= 0 or device_batch >= per_rank:
        return 1
    if per_rank % device_batch:
        raise ValueError(f"--batch {batch} over {world} rank(s) is {per_rank} rows per rank, which "
                         f"--device-batch {device_batch} does not divide: pick a divisor of {per_rank}")
    return per_rank // device_batch


def load_model(o, mode, point):
    """(model, tokenizer) to train: those of the resume point, else of --init, else a new model of o.size with
    the data's tokenizer (sft needs a checkpoint). Checks that the data is what `mode` trains on."""
    model, tok = None, None
    if point:
        model, tok = point.model, point.tokenizer
    elif o.init:
        model, tok = checkpoint.load(o.init)
    tokenizer = tok if tok is not None else Tokenizer.load(o.data)
    manifest = load_manifest(o.data, tokenizer)  # the shards were made with this model's tokenizer
    want = "chat" if mode == "sft" else "text"
    if manifest["kind"] != want:
        raise DataError(
            f"{o.data} holds {manifest['kind']} data but {mode} trains on {want} data; "
            + ("make chat data from JSONL with a \"messages\" field" if want == "chat" else "use `nanoseek sft`")
        )
    if model is None and mode == "sft":
        raise ValueError("sft needs --init CHECKPOINT (a pretrained model)")
    if model is None:
        cfg = config_for_size(o.size, vocab_size=round_up(len(tokenizer), 64))
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, o.seq)
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
        cfg.pad_token_id = tokenizer.pad_id
        torch.manual_seed(o.seed)
        model = DeepSeekV3(cfg).init_weights(o.seed)
    model.config.trained_context_length = o.seq  # every checkpoint of this run records it: see trained_context
    return model, tokenizer


def freeze_untrained(model, o):
    """Turns off the gradients of the weights this run leaves as they are: the MTP modules when no loss reaches
    them, everything else with --mtp-only."""
    if o.mtp_weight == 0:  # DDP wants a gradient for every weight it holds
        for p in model.mtp.parameters():
            p.requires_grad_(False)
    if o.mtp_only:
        if not len(model.mtp) or o.mtp_weight <= 0:
            raise ValueError("--mtp-only trains the MTP modules: the model needs one (num_nextn_predict_layers) "
                             "and --mtp-weight above 0")
        drafting = {id(p) for p in model.mtp.parameters()}  # shared embedding and head stay frozen
        for p in model.parameters():
            p.requires_grad_(id(p) in drafting)


def wrap(model, o, world):
    """What the forward and backward go through: the model under DDP (or FSDP2 with --fsdp) across ranks, and
    torch.compile with --compile."""
    net = model
    if world > 1 and o.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in list(model.model.layers) + list(model.mtp):
            fully_shard(block)
        net = fully_shard(model)
    elif world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    return torch.compile(net) if o.compile else net


def restore(point, model, opt, loader):
    """Puts the optimizer, the loader's place and torch's RNG back as `point` saved them; -> (its step, tokens
    seen by then)."""
    loader.restore(point.meta["trainer"]["loader"])
    restore_optimizer(opt, model, point.states["optimizer.safetensors"])
    torch.set_rng_state(point.states["rng.safetensors"]["torch"])
    return point.meta["step"], point.meta.get("tokens_seen", 0)


def to_device(compute, *tensors):
    """A batch's tensors (None stays None) on the compute device; on CUDA from pinned memory without waiting, so
    the copy overlaps the work already queued."""
    if compute.device_type != "cuda":
        return tuple(t if t is None else t.to(compute.device) for t in tensors)
    return tuple(t if t is None else t.pin_memory().to(compute.device, non_blocking=True) for t in tensors)


# ----------------------------------------------------------------------------- held-out evaluation


def text_bytes(tokenizer, ids):
    """UTF-8 bytes of the text `ids` stand for, special tokens (BOS, EOS, the chat markers) counting none."""
    return len(tokenizer.decode(ids.tolist(), skip_special_tokens=True).encode())


class HeldOut:
    """The first eval_windows sequences of the data's val split, 8 to a batch."""

    def __init__(self, o, tokenizer, compute):
        self.o, self.tokenizer, self.compute = o, tokenizer, compute

    def batches(self):
        o = self.o
        return sequential_batches(o.data, "val", o.seq, 8, o.eval_windows, rows=o.rows)

    @functools.cached_property
    def bytes(self):
        """UTF-8 bytes of the text the targets stand for, special tokens excluded: bits per byte's denominator,
        counted once."""
        return sum(text_bytes(self.tokenizer, y[y != -100]) for _, y, _ in self.batches())

    def evaluate(self, model):
        """model's loss (nats/token) and bits per byte over these sequences ({} when there are none)."""
        model.eval()
        nats, tokens = 0.0, 0
        with torch.no_grad(), self.compute.autocast():
            for x, y, docs in self.batches():
                x, y, docs = to_device(self.compute, x, y, docs)
                _, main_loss, _ = model(x, targets=y, document_ids=docs)
                n = int((y != -100).sum())
                nats += float(main_loss) * n
                tokens += n
        model.train()
        if not tokens:
            return {}
        return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / max(1, self.bytes)}


# ----------------------------------------------------------------------------- checkpoints


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def full_state(model, opt, sharded):
    """(model state, optimizer state) as whole CPU tensors; when sharded (FSDP) every rank must call it."""
    model_state, opt_state = model.state_dict(), optimizer_tensors(opt, model)
    if sharded:  # gather the shards, tensor by tensor, in the same order everywhere
        model_state = {k: _full(v) for k, v in model_state.items()}
        opt_state = {k: _full(v) for k, v in opt_state.items()}
    cpu = lambda state: {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return cpu(model_state), cpu(opt_state)


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """One rank's part of a pretraining or SFT run: the model and what it runs under (DDP, FSDP, compile), the
    optimizer, the loader of this rank's rows, and the steps over them."""

    def __init__(self, o, mode):
        self.o, self.mode = o, mode
        self.compute = choose_compute(o.device, o.dtype)
        self.device = self.compute.device
        self.rank, self.world = start_ranks(self.device)
        self.rank0 = self.rank == 0
        self.accum = micro_steps(o.batch, o.device_batch, self.world)
        if not o.data or not o.out:
            raise ValueError("--data and --out are required")
        point = resume_point(o.out) if o.resume else None
        model, self.tokenizer = load_model(o, mode, point)
        self.model = model.to(self.device).train()
        freeze_untrained(self.model, o)
        self.params = param_counts(self.model)  # (total, active)
        self.flops = flops_per_token(self.model.config, self.params[1], o.seq)
        self.net = wrap(self.model, o, self.world)  # before the optimizer: FSDP replaces the parameters
        self.opt = build_optimizer(self.model, o.optimizer, o.lr, o.weight_decay, (o.beta1, o.beta2))
        self.loader = Loader(o.data, "train", o.seq, o.batch // self.accum, seed=o.seed, rank=self.rank,
                             world=self.world, rows=o.rows)
        self.held_out = HeldOut(o, self.tokenizer, self.compute)
        self.start_step, self.tokens_seen = restore(point, self.model, self.opt, self.loader) if point else (0, 0)
        if point and self.rank0:
            print(f"resuming from {point.path} at step {self.start_step}")
        self.trained_position = self.loader.state()  # the rows trained on so far: what a checkpoint saves

    def save(self, step, final=False, metrics=None):
        """Write out/step_N (or out/final) on rank 0; every rank must call it (FSDP gathers the shards)."""
        model_state, opt_state = full_state(self.model, self.opt, self.o.fsdp and self.world > 1)
        if not self.rank0:
            return
        meta = {"tokens_seen": self.tokens_seen, "metrics": metrics or {}, "params_total": self.params[0],
                "params_active": self.params[1], "trainer": {"loader": self.trained_position}}
        state = {
            "optimizer.safetensors": opt_state,
            "rng.safetensors": {"torch": torch.get_rng_state()},
        }
        save_checkpoint(self.o, self.mode, step, final, self.model, self.tokenizer, meta, state, model_state)

    def run(self):
        with Run(self.o, self.mode, self.start_step, self.rank0) as run:
            last = self._loop(run)
        if self.rank0:
            plot_metrics(run.metrics_file, self.o.out)
        return last

    def _loop(self, run):
        o = self.o
        peak, source = peak_flops(self.device, self.compute.dtype)
        run.say(f"MFU against the {source}: {peak / 1e12:.1f} TFLOP/s")
        bad_in_row, last = 0, {}
        upcoming = self.next_batches() if self.start_step < o.steps else None
        for step in range(self.start_step, o.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, o)
            for group in self.opt.param_groups:
                group["lr"] = lr
            sums, grad_norm, loads = self.train_step(upcoming)
            self.trained_position = self.loader.state()
            if step + 1 < o.steps:  # the next step's rows, made on the host while a GPU works through this one
                upcoming = self.next_batches()
            if not (math.isfinite(float(sums[0])) and math.isfinite(float(grad_norm))):
                self.opt.zero_grad(set_to_none=True)
                bad_in_row += 1
                run.say(f"step {step}: non-finite loss or gradient; step skipped ({bad_in_row} in a row)")
                run.log({"step": step, "skipped": True, "loss": float(sums[0])})
                if bad_in_row >= o.max_bad_steps:
                    raise TrainingError(
                        f"{bad_in_row} non-finite steps in a row at step {step}: lower --lr, raise --warmup or "
                        f"check the data; the last good checkpoint is in {o.out}"
                    )
                continue
            bad_in_row = 0
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            for m, load in zip(self.model.moe_layers(), loads):
                if m.gate.weight.requires_grad:  # a frozen layer keeps its routing as it is
                    m.gate.balance(load, o.bias_update_speed)
            step_tokens = o.batch * o.seq
            self.tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            last = {
                "step": step + 1, "loss": float(sums[0]), "main_loss": float(sums[1]),
                "mtp_loss": [float(v) for v in sums[2:]], "lr": lr, "grad_norm": float(grad_norm),
                "tokens": self.tokens_seen, "tokens_per_s": step_tokens / dt,
                "mfu": step_tokens / dt * self.flops / peak / self.world,
                "expert_imbalance": [float(load.max() / load.mean()) for load in loads if load.sum() > 0],
            }
            if (o.eval_every and (step + 1) % o.eval_every == 0) or step + 1 == o.steps:
                last.update(self.held_out.evaluate(self.model))
            run.log(last, loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                    mfu=f"{100 * last['mfu']:.1f}%")
            run.end_step(step + 1, last, self.save)
        return last

    def next_batches(self):
        """The next step's micro-batches of this rank, (x, y, document ids, unlikelihood's negatives or None) each,
        on their way to the device: the negatives are read from the ids here, on the host."""
        batches = [self.loader.next_batch() for _ in range(self.accum)]
        return [to_device(self.compute, x, y, docs, self.negatives(x, y, docs)) for x, y, docs in batches]

    def negatives(self, x, y, docs):
        """unlikelihood.repeated_call_negatives of a micro-batch, None when the option is off."""
        if self.o.unlikelihood <= 0:
            return None
        return repeated_call_negatives(x, y, docs, self.tokenizer.call_begin_id, self.tokenizer.call_end_id)

    def train_step(self, batches):
        """Forward and backward over a step's micro-batches (next_batches), gradients summed so that they are
        the whole batch's mean; -> (loss, main loss, MTP losses) summed over ranks, the clipped gradient norm
        and the tokens routed to each expert (MoE layer, expert), summed over ranks. Nothing here waits on the
        device."""
        o = self.o
        moes = self.model.moe_layers()
        sums = torch.zeros(2 + len(self.model.mtp), device=self.device)  # loss, main loss, MTP loss per depth
        loads = torch.zeros(len(moes), moes[0].n_experts if moes else 0, device=self.device)
        depths = len(self.model.mtp) if o.mtp_weight > 0 else 0
        counts = [target_counts(y, docs, depths) for _, y, docs, _ in batches]
        total = all_reduce(sum(counts)).clamp(min=1)  # targets of each loss over every rank and micro-step
        for micro, (x, y, docs, negatives) in enumerate(batches):
            sync = micro == self.accum - 1 or self.world == 1 or o.fsdp
            share = counts[micro] / total  # this micro-batch's part of each loss's mean over the global batch
            routing = {}  # MoE layer -> its Routing in this forward (MTP's layers only when MTP trains)
            with (nullcontext() if sync else self.net.no_sync()), self.compute.autocast():
                _, main_loss, mtp = self.net(x, targets=y, mtp_weight=o.mtp_weight, document_ids=docs,
                                             routing=routing, negatives=negatives, unlikelihood=o.unlikelihood)
                parts = torch.stack([main_loss, *mtp]) * share
                loss = parts[0] + (o.mtp_weight * parts[1:].mean() if mtp else 0.0)
                if o.balance_alpha > 0:
                    balance = sum(sequence_balance_loss(r, x.shape[0]) for r in routing.values())
                    loss = loss + o.balance_alpha * balance / (self.accum * self.world)
                (loss * self.world).backward()  # ranks average their gradients: each gives its share of the sum
            sums[: 1 + len(parts)] += torch.cat([loss[None], parts]).detach().float()
            for i, m in enumerate(moes):
                if m in routing:
                    loads[i] += routing[m].load
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip or float("inf"))
        return all_reduce(sums), grad_norm, all_reduce(loads)


def plot_metrics(metrics_file, out_dir):
    """loss.png (train and held-out loss, bits per byte) and experts.png (max/mean load per MoE layer)."""
    rows = [r for r in read_metrics(metrics_file) if not r.get("skipped")]
    if not rows:
        return
    plot(rows, os.path.join(out_dir, "loss.png"),
         [("loss", "loss (nats/token)", {"train": "main_loss", "held-out": "val_loss"}),
          ("held-out bits per byte", "bits per byte", {"held-out": "val_bpb"})])
    if rows[0]["expert_imbalance"]:
        layers = [{"step": r["step"], **{f"MoE layer {i}": v for i, v in enumerate(r["expert_imbalance"])}}
                  for r in rows]
        plot(layers, os.path.join(out_dir, "experts.png"),
             [("expert load balance", "max / mean tokens per expert", {k: k for k in layers[0] if k != "step"})])


def train(options: TrainConfig | dict, mode: str):
    """Run pretraining or SFT with `options` (a TrainConfig, or a dict of its fields); returns the last step's
    metrics."""
    o = config_from(TrainConfig, options)
    if o.schedule not in ("cosine", "wsd"):
        raise ValueError(f"--schedule must be cosine or wsd, not {o.schedule!r}")
    with stage_ranks():
        return Trainer(o, mode).run()
