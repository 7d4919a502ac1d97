"""Generated ids -> text deltas, as the ids arrive.

Decoding one id at a time is wrong for two reasons: a character can be split over several
byte-fallback (`<0xE2>`) or byte-level BPE tokens, and sentencepiece decodes a piece's leading `▁`
to a space only when something precedes it. Re-decoding the whole reply every token is right but
O(n) per token. `StreamDecoder` uses the prefix/read-offset method of HF text-generation-inference
(also behind `tokenizers.decoders.DecodeStream`, which only serves tokenizer.json): decode a short
window that starts one emitted chunk back, so the context is there, and emit what grew, holding
back while the text ends in an unfinished character (U+FFFD).

One addition: a model can emit long runs of stray bytes, whose text ends in U+FFFD all along. A
UTF-8 character has at most 4 bytes and every token adds at least one, so once 3 more tokens follow
a point, whether the bytes around it form a character is decided. If the text then splits there
(decoding both sides apart gives the whole, so no character or run of bad bytes straddles it), the
part before it is settled: the decoder emits it, which keeps the window, and so the cost per token,
bounded.
"""

from __future__ import annotations

from model.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# tokens after which an unfinished character is decided: a UTF-8 character has at most 4 bytes
_TOKENS_TO_SETTLE = 3


class StreamDecoder:
    """Turns generated ids into text deltas as they arrive.

    The deltas of `push` and `flush` concatenate to exactly `tok.decode(ids)`, and no delta ends in
    half a character. Call `flush` once at the end of the stream.
    """

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        # the ids not yet known to be settled, plus the chunk emitted before them as context
        self._window: list[int] = []
        self._read = 0  # window[:_read] is text already emitted
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the new text ("" while a character is incomplete)."""
        if token_id in self._tok.boundary_ids:
            return ""  # `decode` drops them, and they must not break the window's context
        self._window.append(token_id)
        window_text = self._tok.decode(self._window)
        if not window_text.endswith(_REPLACEMENT):
            return self._emit(len(self._window), window_text)
        settle_at = len(self._window) - _TOKENS_TO_SETTLE
        if settle_at > self._read:
            settled_text = self._tok.decode(self._window[:settle_at])
            # otherwise something straddles settle_at (or it drops a leading space): try a later one
            if settled_text + self._tok.decode(self._window[settle_at:]) == window_text:
                return self._emit(settle_at, settled_text)
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character decodes to U+FFFD, as in `decode`)."""
        delta = self._emit(len(self._window), self._tok.decode(self._window))
        self._window, self._read = [], 0
        return delta

    def _emit(self, settled: int, settled_text: str) -> str:
        """Emit the text of window[:settled] beyond what was emitted, and slide the window so that it
        starts at the chunk just emitted."""
        delta = settled_text[len(self._tok.decode(self._window[: self._read])) :]
        del self._window[: self._read]
        self._read = settled - self._read
        self.text += delta
        return delta
