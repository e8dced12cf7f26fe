"""Token ids to text, a few at a time, with stop strings applied on the text.

Why a window: decoding one token alone is wrong for byte-level BPE (a character of several bytes
spans several tokens) and for SentencePiece-style decoders (a leading space is dropped at the start
of a decode). So each step decodes the ids from `prefix` on twice, without and with the newest
ones, and emits the difference; while that text ends in U+FFFD (an unfinished UTF-8 sequence) it
waits for the next token. The window then moves forward, so a step costs a few tokens of decoding,
not the whole output. Concatenating the deltas gives `tokenizer.decode(all ids)`.

Stop strings: the text is cut where the first stop string begins (the stop string itself is not
returned, as in OpenAI's API), and while the text ends with something that could still grow into a
stop string, those characters are held back instead of streamed.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already in self.text
        self.read = 0
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False  # a stop string was found

    def _decode_new(self, final: bool) -> str:
        if self.tokenizer is None:  # no tokenizer: the text is the token ids
            new = self.ids[self.read:]
            self.read = len(self.ids)
            return "".join(f" {t}" for t in new)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Append ids; return the text that can be sent now. `final`: the request is over, flush."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        self.text += self._decode_new(final)
        cut = self._find_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            upto = cut
        else:
            upto = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def _find_stop(self) -> int | None:
        if not self.stop:
            return None
        # text that could begin a stop string is held back, so a match never starts before `sent`
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
