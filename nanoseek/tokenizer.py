"""Byte-level BPE trained from scratch, with DeepSeek-R1's chat format.

The chat renderer builds token ids piece by piece: control tokens come only from the template, and
every message's text is encoded with special tokens split into plain bytes, so a user who types
"<｜Assistant｜>" or "</think>" gets text, never a control token.

Tool calls (calculator.py) live inside an assistant's reasoning: <｜tool▁call▁begin｜>6*7<｜tool▁call▁end｜>, then
the result the engine writes, <｜tool▁output▁begin｜>42<｜tool▁output▁end｜>. There, and only there, these four
strings are control tokens; the output block is never trained on. A tokenizer made before they existed loads
without them, and a model on it has no tools.
"""

import bisect
import functools
import json
import os
import re
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK]  # ids 0..6
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_TOKENS = [TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END]  # ids 7..10, where present
# how chat and the web page show the markup to people: a call and its result read "[calc 6*7 = 42]"
TOOL_DISPLAY = {TOOL_CALL_BEGIN: "[calc ", TOOL_CALL_END: "", TOOL_OUTPUT_BEGIN: " = ", TOOL_OUTPUT_END: "]"}

# The same rendering as Tokenizer.render_chat, for Hugging Face's apply_chat_template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
    "{% if m.get('reasoning_content') %}{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


class Tokenizer:
    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        self.tok.encode_special_tokens = True  # plain encode() never makes control tokens
        missing = [s for s in SPECIAL_TOKENS if tok.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train one with `nanoseek tokenizer`")
        ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.user_id, self.assistant_id = ids[USER], ids[ASSISTANT]
        self.think_id, self.end_think_id = ids[THINK], ids[END_THINK]
        tool_ids = [tok.token_to_id(s) for s in TOOL_TOKENS]
        self.tools = None not in tool_ids  # False: a tokenizer from before tool tokens, so no tools
        self.tool_ids = dict(zip(TOOL_TOKENS, tool_ids)) if self.tools else {}
        self.call_begin_id, self.call_end_id, self.output_begin_id, self.output_end_id = (
            tool_ids if self.tools else [None] * 4)

    def __len__(self):
        return self.tok.get_vocab_size()

    @functools.cached_property
    def max_token_bytes(self):
        """The most UTF-8 bytes one token's text covers: text of more than n times this has more than n tokens."""
        return max(len(self.decode([i]).encode()) for i in range(len(self)))

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in the text stay text."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode of many texts at once (tokenizers spreads a batch over the cores)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt=False):
        """Messages in OpenAI format -> (ids, mask); mask is 1 on assistant tokens (thinking and EOS included)
        except those of a message with "weight": 0 (as in OpenAI's fine-tuning format)."""
        return self.render_chats([messages], add_generation_prompt)[0]

    def render_chats(self, conversations: list[list[dict]], add_generation_prompt=False):
        """render_chat of many conversations, their text encoded in one batch."""
        parts = [self._chat_parts(messages, add_generation_prompt) for messages in conversations]
        texts = iter(self.encode_batch([piece for p in parts for piece, _ in p if isinstance(piece, str)]))
        rendered = []
        for p in parts:
            ids, mask = [], []
            for piece, is_assistant in p:
                piece_ids = [piece] if isinstance(piece, int) else next(texts)
                ids += piece_ids
                mask += [int(is_assistant)] * len(piece_ids)
            rendered.append((ids, mask))
        return rendered

    def _chat_parts(self, messages, add_generation_prompt):
        """The conversation as (control id or text, is a trained assistant token) pieces."""
        parts = []
        parts.append((self.bos_id, False))
        for m in messages:
            if m.get("role") == "system":
                parts.append((_content(m), False))
        for m in messages:
            role = m.get("role")
            if role == "user":
                parts += [(self.user_id, False), (_content(m), False)]
            elif role == "assistant":
                trained = m.get("weight", 1) != 0  # weight 0: in the conversation, not trained on
                parts.append((self.assistant_id, False))
                if m.get("reasoning_content"):
                    parts.append((self.think_id, trained))
                    parts += self._reasoning_parts("\n" + m["reasoning_content"] + "\n", trained)
                    parts += [(self.end_think_id, trained), ("\n\n", trained)]
                parts += [(_content(m), trained), (self.eos_id, trained)]
            elif role != "system":
                raise ValueError(f"unknown chat role {role!r}: use 'system', 'user' or 'assistant'")
        if add_generation_prompt:
            parts += [(self.assistant_id, False), (self.think_id, False), ("\n", False)]
        return _merge_text(parts)

    def _reasoning_parts(self, text, trained):
        """An assistant's reasoning as pieces: its tool markers as control tokens, and a tool's output, from
        output-begin to output-end, never trained on (the engine wrote it, not the model)."""
        if not self.tools:
            return [(text, trained)]
        parts, in_output = [], False
        for piece in re.split("(" + "|".join(map(re.escape, TOOL_TOKENS)) + ")", text):
            in_output = in_output or piece == TOOL_OUTPUT_BEGIN
            parts.append((self.tool_ids.get(piece, piece), trained and not in_output))
            in_output = in_output and piece != TOOL_OUTPUT_END
        return parts

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Plain-text documents to ids, tool markup (a worked solution's calls and results) as control tokens:
        how pretraining reads the tasks' worked solutions, so it sees the tokens the engine runs tools on."""
        parts = [self._reasoning_parts(text, True) for text in texts]
        encoded = iter(self.encode_batch([piece for p in parts for piece, _ in p if isinstance(piece, str)]))
        return [[i for piece, _ in p for i in ([piece] if isinstance(piece, int) else next(encoded))] for p in parts]

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt as every reader of a checkpoint encodes it: BOS, then the text (see save)."""
        return [self.bos_id] + self.encode(text)

    def save(self, out_dir, model_max_length=2048):
        """tokenizer.json and tokenizer_config.json (with the chat template) for AutoTokenizer.

        Like DeepSeek's own, the files add BOS in front of raw text (a post-processor, so every reader of
        tokenizer.json does it) and the chat template starts with BOS, rendered with no second one.
        """
        os.makedirs(out_dir, exist_ok=True)
        self.tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, self.bos_id)])
        self.tok.encode_special_tokens = False  # Hugging Face's readers treat special tokens as control tokens
        try:
            self.tok.save(os.path.join(out_dir, "tokenizer.json"))
        finally:
            self.tok.encode_special_tokens = True
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    @classmethod
    def load(cls, path):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} is missing: pass a directory made by `nanoseek tokenizer` or `init`")
        try:
            return cls(HFTokenizer.from_file(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            if isinstance(e, ValueError) and "special tokens" in str(e):
                raise
            msg = f"{file} is not a valid tokenizer file ({e}); retrain it with `nanoseek tokenizer`"
            raise ValueError(msg) from None


def split_thinking(text):
    """(reasoning, answer) of a completion that began inside <think>, split at the first </think> (a later one
    is part of the answer), without the newlines the chat template puts around it. No </think>: all reasoning."""
    reasoning, _, answer = text.partition(END_THINK)
    return reasoning.strip("\n"), answer.lstrip("\n")


def show_tools(text):
    """text with tool markup as people read it (TOOL_DISPLAY): a call and its result as "[calc 6*7 = 42]"."""
    for marker, shown in TOOL_DISPLAY.items():
        text = text.replace(marker, shown)
    return text


class ThinkingStream:
    """A streamed completion, piece by piece, as (reasoning, answer) deltas that add up to split_thinking of the
    whole text; `answering` turns true at the first </think>. (Only a </think> spelled out in pieces that
    arrive apart, "</th" then "ink>", leaves its first part streamed as thinking.)"""

    def __init__(self):
        self.text, self.reasoning, self.answer, self.answering = "", "", "", False

    def add(self, piece):
        self.text += piece
        reasoning, answer = split_thinking(self.text)
        self.answering = self.answering or END_THINK in self.text
        new_reasoning = reasoning[len(self.reasoning) :] if reasoning.startswith(self.reasoning) else ""
        new_answer = answer[len(self.answer) :]
        self.reasoning, self.answer = reasoning, answer
        return new_reasoning, new_answer


class ConversationTooLong(ValueError):
    """The system messages and the last user message alone leave no room for a reply."""


def trim_conversation(tokenizer, messages, context, reply_room=None):
    """(messages, turns dropped): the conversation without as few of its oldest turns (a user message and what
    follows it up to the next one) as it takes for its prompt (render_chat with the generation prompt) to leave
    `reply_room` tokens (default: half of `context`) for the reply within `context`. The system messages and the
    last user message always stay: when they alone leave less, they are what comes back, and when they leave no
    room at all, ConversationTooLong. Dropping a turn never lengthens the prompt, so a binary search finds how
    many to drop, and text too long by its bytes alone is never tokenized."""
    reply_room = context // 2 if reply_room is None else reply_room
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    cuts = [0] + users[1:]  # k turns dropped: the messages from cuts[k] on stay, and every system message

    def kept(k):
        return [m for i, m in enumerate(messages) if i >= cuts[k] or m.get("role") == "system"]

    @functools.cache
    def prompt_length(k):  # None: more than `context` tokens by the bytes of its text alone
        conversation = kept(k)
        size = sum(len(_content(m).encode()) + len((m.get("reasoning_content") or "").encode()) for m in conversation)
        if size > context * tokenizer.max_token_bytes:
            return None
        return len(tokenizer.render_chat(conversation, add_generation_prompt=True)[0])

    def leaves_room(k):
        length = prompt_length(k)
        return length is not None and length + reply_room <= context

    dropped = bisect.bisect_left(range(len(cuts) - 1), True, key=leaves_room)  # len(cuts) - 1: only the last turn
    length = prompt_length(dropped)
    if length is None or length >= context:
        taken = f"more than {context}" if length is None else length
        raise ConversationTooLong(f"the system messages and the last user message take {taken} tokens, leaving no "
                                  f"room for a reply within {context}")
    return kept(dropped), dropped


def _content(m):
    content = m.get("content")
    if not isinstance(content, str):
        raise ValueError(f"message content must be a string, got {type(content).__name__}")
    return content


def _merge_text(parts):
    """Join neighbouring text pieces of the same role, as a tokenizer reading the rendered string would."""
    merged = []
    for piece, flag in parts:
        if isinstance(piece, str) and merged and isinstance(merged[-1][0], str) and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + piece, flag)
        elif piece != "":
            merged.append((piece, flag))
    return merged


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, max_chars: int = 0) -> Tokenizer:
    """Train a byte-level BPE on an iterator of strings, read as it goes: the first max_chars characters of them
    (0: all). vocab_size counts the 256 bytes and the special tokens."""
    floor = 256 + len(SPECIAL_TOKENS + TOOL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab size {vocab_size} is too small: it must be at least {floor} (bytes + special tokens)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TOOL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(first_chars(texts, max_chars) if max_chars else texts, trainer=trainer)
    return Tokenizer(tok)


def pre_tokenizer():
    """Every digit its own token, so column arithmetic sees digits, never merged chunks of numbers; then
    GPT-2's byte-level split. llama.cpp knows this split as its "refact" pre-tokenizer."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def first_chars(texts, max_chars):
    """The texts until max_chars characters are read, the last one cut at the limit: a bounded sample of a
    stream, read no further than needed."""
    for text in texts:
        yield text[:max_chars]
        max_chars -= len(text)
        if max_chars <= 0:
            return
