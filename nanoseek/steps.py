"""The plain decode step, and how the engine runs its steps: eager, under torch.compile, or for one sequence
on a CPU as a package compiled ahead of time (aot.py), where torch.compile's runtime would be most of a step
(docs/BENCHMARKS.md, "steps compiled ahead of time").

A step is fn(model, *tensors, *caches); the engine's are decode_step here and speculation.speculative_step.
"""

import os

import torch

from nanoseek.aot import AotStep
from nanoseek.kv_cache import forward_logits

COMPILE = os.environ.get("NANOSEEK_COMPILE", "1") != "0"  # compile the decode step; NANOSEEK_COMPILE=0: eager
COMPILE_NOTE = "compiling the decode step (seconds, once; NANOSEEK_COMPILE=0 decodes without)"


def decode_step(model, ints, latent, rope):
    """The plain decode step: one token a row, ints (B, 3) = (token, its position, slot), one tensor so that a
    step makes one from the host -> hidden states (B, 1, D) and float logits (B, V)."""
    h, logits = forward_logits(model, ints[:, :1], ints[:, 1], ints[:, 2], latent, rope)
    return h, logits[:, 0]


def compile_options(device):
    """torch.compile arguments for the decode step (batch and cache length are marked dynamic where the
    engine makes them): on a CPU the generated C++ calls its kernels directly, no Python between them."""
    return {"options": {"cpp_wrapper": device.type == "cpu"}}


def compiler(model, compute, slots, compile=True, ahead_of_time=None):
    """How an engine of `slots` slots running model under the compute policy runs its steps -> a function
    step -> what to call instead: the step itself where compile is off, else torch.compile's, and with
    ahead_of_time on a CPU in float32 an AotStep for one sequence (no guards, weights bound once), so the
    model's weights must then change only in place. ahead_of_time defaults to an engine of one slot (chat)."""
    device = next(model.parameters()).device
    ahead_of_time = slots == 1 if ahead_of_time is None else ahead_of_time
    ahead_of_time = ahead_of_time and device.type == "cpu" and compute.dtype == torch.float32

    def build(step):
        if not compile:
            return step
        jit = torch.compile(step, **compile_options(device))
        if not ahead_of_time:
            return jit
        one = AotStep(step, model, fallback=jit)
        return one if slots == 1 else OneOrMore(one, jit)

    return build


class OneOrMore:
    """A step that runs `one` for a single sequence (its first input's batch of 1) and `more` for several."""

    def __init__(self, one, more):
        self.one, self.more = one, more

    def __call__(self, model, first, *rest):
        return (self.one if first.shape[0] == 1 else self.more)(model, first, *rest)
