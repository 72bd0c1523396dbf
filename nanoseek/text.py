"""A generation's text as its tokens arrive: incremental detokenising, stop strings, what is safe to stream,
and the repetition stop. Every token costs work bounded by its own text and the stop strings' lengths, never
by the length of what came before."""

MAX_PERIOD = 32  # longest block (in tokens) the repetition stop looks for
DEFAULT_REPETITION_STOP = 64  # chat and the server: a block repeated back to back over 64 tokens ends the turn
CHAT_TEMPERATURE = 0.4  # chat and the web page: more right answers than greedy or 0.7 (docs/SPEEDRUN.md)


class TextStream:
    """One sequence's text. update() decodes only the tokens since the last finished character (a byte-level
    token may end inside one) and searches for stop strings only in the text that could newly hold one;
    delta() hands out what can be streamed."""

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.stops = tokenizer, stops
        self.decoded = 0  # tokens whose text is final, in decoded_text
        self.decoded_text = ""
        self.text = ""  # the text so far, cut before the first stop string
        self.sent = 0  # characters handed out by delta()

    def update(self, tokens, visible) -> bool:
        """Take tokens[:visible] as the text's tokens; True when a stop string ended it."""
        if self.tokenizer is None:
            return False
        checked = len(self.text)  # text before this is free of stop strings
        tail = self.tokenizer.decode(tokens[self.decoded : visible])
        if tail.endswith("\ufffd"):  # an unfinished character: its bytes are decoded again with the next token
            text = self.decoded_text + tail
        else:
            self.decoded_text, self.decoded = self.decoded_text + tail, visible
            text = self.decoded_text
        stopped = False
        for stop in self.stops:
            cut = text.find(stop, max(0, checked - len(stop) + 1))
            if cut != -1:
                text, stopped = text[:cut], True
        self.text = text
        return stopped

    def delta(self, finished) -> str:
        """The text not yet handed out that can be sent now: all of it once finished, else without an
        unfinished character or a possible start of a stop string at its end."""
        safe = len(self.text) if finished else safe_prefix(self.text, self.stops)
        delta, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return delta


def safe_prefix(text, stops):
    """Characters that can be sent now: hold back an unfinished UTF-8 character or a possible stop prefix."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                end -= k
                break
    return end


class RepetitionStop:
    """Says when the tokens fed to it end in a block of n <= MAX_PERIOD tokens repeated back to back, at
    least twice, over at least `threshold` tokens. Per period n it keeps the run of trailing tokens that equal
    the token n before them (the block plus that run is periodic), so a token costs MAX_PERIOD comparisons."""

    def __init__(self, threshold):
        self.threshold = threshold
        self.recent: list[int] = []  # the last MAX_PERIOD tokens, newest last
        self.runs = [0] * MAX_PERIOD  # runs[n - 1]: trailing tokens equal to the token n before them

    def add(self, token) -> bool:
        """Take the next token; True when the tokens now end in such a repetition."""
        recent = self.recent
        self.runs = [r + 1 if n <= len(recent) and recent[-n] == token else 0 for n, r in enumerate(self.runs, 1)]
        recent.append(token)
        if len(recent) > MAX_PERIOD:
            del recent[0]
        return any(r + n >= max(self.threshold, 2 * n) for n, r in enumerate(self.runs, 1))
