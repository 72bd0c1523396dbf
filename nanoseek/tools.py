"""The engine's tool calls: when a sequence samples the call-end token, the calculator (calculator.py) runs on
the text since the last call-begin token, and output-begin, the result and output-end are appended to the
sequence as forced tokens (Sequence.forced), which count toward max_tokens and the context like any other.
The engine then writes the call's end and the output into the cache as one prefill chunk (Slots.prefill_forced).
"""

from nanoseek.calculator import calculate


def answer_call(s, tokenizer, room) -> list[int] | None:
    """Append the calculator's output for the call s just ended (its newest token) to s as forced tokens ->
    them; None, and s unchanged, where they are more than room, the new tokens s may still take."""
    ids = s.prompt + s.tokens[:-1]
    begin = next((i for i in range(len(ids) - 1, -1, -1) if ids[i] == tokenizer.call_begin_id), None)
    result = calculate(tokenizer.decode(ids[begin + 1 :])) if begin is not None else "error: no call began"
    output = [tokenizer.output_begin_id] + tokenizer.encode(result) + [tokenizer.output_end_id]
    if len(output) > room:
        return None
    s.append(output, forced=True)
    return output
