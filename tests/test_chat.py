"""The terminal chat: streams thinking then the answer, keeps the conversation, obeys its commands."""

import io
import re

import nanoseek
from nanoseek import checkpoint
from nanoseek.chat import HELP, REPEATING, chat
from nanoseek.engine import Engine
from nanoseek.model import trained_context
from nanoseek.sampling import SamplingParams
from nanoseek.tokenizer import split_thinking


def test_terminal_chat(chat_model):
    stdin = io.StringIO("What is 12 + 30?\n/temp 0\n/max 30\n/temp hot\n/repeat 0\nWhat is 5 + 7?\n/reset\n/nope\n"
                        "/quit\n")
    out = io.StringIO()
    messages = chat(chat_model, temperature=0, max_tokens=40, stdin=stdin, out=out)
    text = out.getvalue()
    assert text.count("thinking: ") == 2  # two questions, each streamed as thinking first
    assert text.count("nanoseek> ") >= 1  # and an answer after </think> (the tiny model does not always close it)
    assert "(temperature 0.0)" in text and "(max tokens 30)" in text and "/temp needs a number" in text
    assert "(new conversation)" in text and "commands:" in text and "(repetition stop off)" in text
    assert messages == []  # /reset cleared the two exchanges


def test_terminal_chat_splits_as_the_api_does(chat_model):
    """The thinking is printed, then the answer after `nanoseek> `, split where split_thinking splits the greedy
    completion, and the conversation keeps the answer alone."""
    question = "What is 21 + 21?"
    model, tok = nanoseek.load(chat_model)
    prompt, _ = tok.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    completion = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0].text
    reasoning, answer = split_thinking(completion)
    out = io.StringIO()
    messages = chat(chat_model, temperature=0, max_tokens=40, stdin=io.StringIO(question + "\n"), out=out)
    assert messages == [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    shown = f"thinking: {reasoning}\n\nnanoseek> {answer}\n" if "</think>" in completion else f"thinking: {reasoning}"
    assert shown in out.getvalue()


def test_terminal_chat_stops_a_repeating_reply(tokenizer, tmp_path):
    """On by default: a reply that loops ends early with a note; /repeat 0 lets it run to max_tokens."""
    from test_engine import CYCLE, looping_model

    checkpoint.save(tmp_path / "loop", looping_model(tokenizer), tokenizer)
    out = io.StringIO()
    stdin = io.StringIO("hi\n/repeat 7\nhi\n/repeat 0\nhi\n/repeat -1\n")
    chat(tmp_path / "loop", temperature=0, max_tokens=100, stdin=stdin, out=out)
    text = out.getvalue()
    assert text.count(REPEATING) == 2 and "(repetition stop 7)" in text and "(repetition stop off)" in text
    replies = [part.split("\n")[0] for part in text.split("thinking: ")[1:]]
    assert replies == [tokenizer.decode((CYCLE * 70)[:n]) for n in (64, 7, 100)]
    assert text.endswith(HELP + "\n\nyou> ")  # a negative N gets the help


def test_terminal_chat_stays_within_the_trained_context(chat_model):
    """The chat model was fine-tuned on rows of 64 tokens: the oldest turns go once the prompt would leave less
    than half of that for the reply, the user is told, and the conversation goes on from what is left."""
    model, tok = nanoseek.load(chat_model)
    assert trained_context(model.config) == 64 < model.config.max_position_embeddings
    questions = [f"What is {a} + {b}?" for a, b in ((12, 30), (5, 7), (21, 21), (40, 2), (9, 9))]
    too_long = "What is 1 + 1? " * 10
    stdin = io.StringIO("\n".join(questions[:3] + [too_long] + questions[3:]) + "\n")
    out = io.StringIO()
    messages = chat(chat_model, temperature=0, max_tokens=20, stdin=stdin, out=out)
    text = out.getvalue()
    assert text.count("thinking: ") == 5  # every question but the long one was answered
    assert "(that message is too long for the 64 tokens the model was trained on: shorten it)" in text
    notes = re.findall(r"\(dropped the (\d+ )?oldest turns? to stay within the 64 tokens the model was trained on\)",
                       text)
    dropped = sum(int(n or 1) for n in notes)
    assert notes and dropped < len(questions)
    assert [m["content"] for m in messages if m["role"] == "user"] == questions[dropped:]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    last_prompt, _ = tok.render_chat(messages[:-1], add_generation_prompt=True)
    assert len(last_prompt) + 32 <= 64  # the last reply had at least half of the trained context
