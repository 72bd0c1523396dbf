"""The terminal chat: streams thinking then the answer, keeps the conversation, obeys its commands."""

import io

from nanoseek.chat import chat


def test_terminal_chat(chat_model):
    stdin = io.StringIO("What is 12 + 30?\n/temp 0\n/max 30\n/temp hot\nWhat is 5 + 7?\n/reset\n/nope\n/quit\n")
    out = io.StringIO()
    messages = chat(chat_model, temperature=0, max_tokens=40, stdin=stdin, out=out)
    text = out.getvalue()
    assert text.count("thinking: ") == 2  # two questions, each streamed as thinking first
    assert text.count("nanoseek> ") >= 1  # and an answer after </think> (the tiny model does not always close it)
    assert "(temperature 0.0)" in text and "(max tokens 30)" in text and "/temp needs a number" in text
    assert "(new conversation)" in text and "commands:" in text
    assert messages == []  # /reset cleared the two exchanges
