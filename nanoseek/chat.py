"""`nanoseek chat CKPT`: a terminal chat that streams the thinking (dimmed, tool calls read as "[calc 6*7 = 42]")
and then the answer."""

import sys

from nanoseek.checkpoint import load
from nanoseek.device import choose_compute
from nanoseek.engine import COMPILE, COMPILE_NOTE, Engine
from nanoseek.model import trained_context
from nanoseek.sampling import SamplingParams
from nanoseek.text import CHAT_TEMPERATURE, DEFAULT_REPETITION_STOP
from nanoseek.tokenizer import ConversationTooLong, ThinkingStream, show_tools, trim_conversation

DIM, RESET = "\033[2m", "\033[0m"
HELP = ("commands: /reset (new conversation), /temp X, /max N, /repeat N (stop a reply that repeats itself over N "
        "tokens; 0: off), /quit")
REPEATING = "(stopped: the reply was repeating itself; /repeat 0 lets it run)"


def chat(path, temperature=CHAT_TEMPERATURE, max_tokens=512, repetition_stop=DEFAULT_REPETITION_STOP, device=None,
         stdin=sys.stdin, out=sys.stdout):
    compute = choose_compute(device)
    model, tokenizer = load(path, compute.device)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer; chat needs a checkpoint made by nanoseek")
    if COMPILE:
        out.write(COMPILE_NOTE + "\n")
    engine = Engine(model, tokenizer, max_batch=1)
    trained = min(trained_context(model.config), engine.max_len)  # what the conversation stays within
    messages = []
    color = out.isatty()
    dim, reset = (DIM, RESET) if color else ("", "")
    out.write(f"chatting with {path}; {HELP}\n")
    while True:
        out.write("\nyou> ")
        out.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            try:
                if cmd == "/quit":
                    break
                elif cmd == "/reset":
                    messages = []
                    out.write("(new conversation)\n")
                elif cmd == "/temp":
                    temperature = float(arg)
                    out.write(f"(temperature {temperature})\n")
                elif cmd == "/max":
                    max_tokens = int(arg)
                    out.write(f"(max tokens {max_tokens})\n")
                elif cmd == "/repeat" and int(arg) >= 0:  # a negative N gets the help
                    repetition_stop = int(arg)
                    out.write(f"(repetition stop {repetition_stop or 'off'})\n")
                else:
                    out.write(HELP + "\n")
            except ValueError:
                out.write(f"{cmd} needs a number\n")
            continue
        try:
            messages, dropped = trim_conversation(tokenizer, messages + [{"role": "user", "content": text}], trained)
        except ConversationTooLong:
            out.write(f"(that message is too long for the {trained} tokens the model was trained on: shorten it)\n")
            continue
        if dropped:
            out.write(f"({dropped_note(dropped)} to stay within the {trained} tokens the model was trained on)\n")
        prompt, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
        room = engine.max_len - len(prompt)
        params = SamplingParams(max_tokens=min(max_tokens, room), temperature=temperature,
                                repetition_stop=repetition_stop)
        out.write(f"\n{dim}thinking: ")
        thinking = ThinkingStream()
        event = None
        for event in engine.stream(prompt, params):
            was_answering = thinking.answering
            reasoning, answer = thinking.add(event.text)
            out.write(show_tools(reasoning))
            if thinking.answering and not was_answering:
                out.write(f"{reset}\n\nnanoseek> ")
            out.write(answer)
            out.flush()
        if not thinking.answering:
            out.write(reset)
        if event is not None and event.seq.finish_reason == "repetition":
            out.write(f"\n{dim}{REPEATING}{reset}")
        messages.append({"role": "assistant", "content": thinking.answer})
        out.write("\n")
    return messages


def dropped_note(turns):
    return "dropped the oldest turn" if turns == 1 else f"dropped the {turns} oldest turns"
