"""One generation in the engine: its prompt, its tokens (sampled, and forced where a tool wrote them), and what
a new token does to it: the tool call it ends (tools.py), its text (text.py), and the stop conditions that
finish it.
"""

import math
from dataclasses import dataclass, field

from nanoseek.sampling import SamplingParams
from nanoseek.text import RepetitionStop, TextStream
from nanoseek.tools import answer_call


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    slot: int
    tokens: list[int] = field(default_factory=list)  # generated: sampled, and forced by a tool
    forced: list[bool] = field(default_factory=list)  # per token: True where a tool wrote it, not the model
    logprobs: list[float] = field(default_factory=list)  # with params.logprobs, per token; nan where forced
    finish_reason: str | None = None  # "stop", "length", "repetition" or "abort"
    text_state: TextStream | None = None  # how text is made from tokens
    repeats: RepetitionStop | None = None  # with params.repetition_stop > 0
    phase: int = 0  # where the reply is in the chat template (template.py), where the engine runs tools

    @property
    def text(self):  # decoded generated text, cut at a stop string
        return self.text_state.text if self.text_state is not None else ""

    @property
    def length(self):  # tokens in the cache
        return len(self.prompt) + len(self.tokens) - 1 if self.tokens else len(self.prompt)

    def room(self, context):
        """New tokens it may still take: its max_tokens, and a context of that many tokens (its next token
        needs a position)."""
        return min(self.params.max_tokens - len(self.tokens), context - self.length - 1)

    def append(self, tokens, logprobs=None, forced=False):
        """New tokens: the model's, with their log-probabilities where params.logprobs asks, or a tool's."""
        self.tokens += tokens
        self.forced += [forced] * len(tokens)
        if self.params.logprobs:
            self.logprobs += [math.nan] * len(tokens) if forced else logprobs  # forced: not drawn

    def take(self, token, logprob, stop_ids, context, tool_tokenizer=None) -> list[int]:
        """Append the model's token and, where it ends a tool call and tools run (tool_tokenizer), the tool's
        output; update the text; set finish_reason where a stop condition holds -> the new tokens."""
        self.append([token], [logprob])
        new_tokens = [token]
        if token in stop_ids:
            self.finish_reason = "stop"
        elif tool_tokenizer is not None and token == tool_tokenizer.call_end_id:
            output = answer_call(self, tool_tokenizer, self.room(context))
            new_tokens += output or []
            if output is None:  # no room for it
                self.finish_reason = "length"
        if self.text_state.update(self.tokens, len(self.tokens) - (self.finish_reason == "stop")):
            self.finish_reason = "stop"
        if self.finish_reason is None and self.repeats is not None and any([self.repeats.add(t) for t in new_tokens]):
            self.finish_reason = "repetition"  # the text stays as generated
        if self.finish_reason is None and self.room(context) < 1:
            self.finish_reason = "length"
        return new_tokens


@dataclass
class Event:
    """What a step produced for one sequence: new token ids, the new text, and whether it finished."""

    seq: Sequence
    token_ids: list[int]
    text: str
    finished: bool
