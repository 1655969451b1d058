"""Prompt words -> positions of their tokens in the text sequence the denoiser attends to.

Methods name subjects by text (`words=["cat", "dog"]`). A word split into several tokens maps to
all of them; start/end tokens are tracked explicitly; models that join two text encoders along the
sequence (SD3: CLIP 77 tokens then T5) get the positions from both encoders.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

_WORD_RE = re.compile(r"[\w<>'\-]+|[^\w\s]")


@dataclass(frozen=True)
class TextSegment:
    """One tokenizer's slice of the text sequence: `length` tokens starting at `offset`.

    `render`: for encoders that read the prompt inside a chat template (FLUX.2, Qwen-Image), the
    text the tokenizer sees and where the prompt starts in it; `drop`: template tokens the pipeline
    cuts from the front of the encoded sequence (Qwen-Image drops its system prefix); `pad_left`: the
    rendered text is left-padded to `length`, so its tokens sit at the end of the sequence.
    """

    tokenizer: object
    offset: int
    length: int
    has_bos: bool
    render: Callable[[str], tuple[str, int]] | None = None
    drop: int = 0
    pad_left: bool = False  # the pipeline pads the rendered text on the left to `length` (no text mask)


@dataclass
class TokenIndex:
    """The words of one prompt and the sequence positions of each word's tokens."""

    prompt: str
    words: list[str]
    positions: list[list[int]]
    bos: list[int] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)
    text_len: int = 0
    n_tokens: int = 0  # prompt tokens of the first segment, specials excluded

    def find(self, word: str | int) -> list[int]:
        """Positions of `word` (first occurrence; a phrase of several words gives their union).

        An int is taken as an explicit token position (for experts) and returned as is.
        """
        if isinstance(word, int):
            if not 0 <= word < self.text_len:
                raise ValueError(f"token index {word} is outside the text sequence (0..{self.text_len - 1})")
            return [word]
        parts = _WORD_RE.findall(word.lower())
        if not parts:
            raise ValueError(f"empty word {word!r}")
        lowered = [w.lower() for w in self.words]
        for start in range(len(lowered) - len(parts) + 1):
            if lowered[start : start + len(parts)] == parts:
                pos = sorted({p for i in range(start, start + len(parts)) for p in self.positions[i]})
                if not pos:
                    raise ValueError(f"word {word!r} was cut off: the prompt is longer than the text encoder takes")
                return pos
        raise ValueError(f"word {word!r} is not in the prompt; its words are: {', '.join(self.words)}")

    def word_of(self, position: int) -> str | None:
        for w, pos in zip(self.words, self.positions):
            if position in pos:
                return w
        return None


def index_prompt(prompt: str, segments: list[TextSegment], warn: bool = True) -> TokenIndex:
    """Tokenize `prompt` with each segment's tokenizer and map words to sequence positions."""
    spans = [(m.group(0), m.start(), m.end()) for m in _WORD_RE.finditer(prompt)]
    words = [s[0] for s in spans]
    positions: list[list[int]] = [[] for _ in spans]
    index = TokenIndex(prompt=prompt, words=words, positions=positions)
    for seg_i, seg in enumerate(segments):
        if seg.render is not None:
            kept = _index_rendered(prompt, seg, spans, positions, index, warn)
            if seg_i == 0:
                index.n_tokens = kept
            continue
        enc = seg.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        room = seg.length - (2 if seg.has_bos else 1)
        if len(ids) > room and warn:
            cut_at = offsets[room][0] if room < len(offsets) else len(prompt)
            warnings.warn(
                f"prompt is longer than the text encoder takes ({len(ids)} tokens > {room}); "
                f"this part is cut: {prompt[cut_at:]!r}",
                stacklevel=3,
            )
        kept = min(len(ids), room)
        first = seg.offset + (1 if seg.has_bos else 0)
        for t in range(kept):
            a, b = offsets[t]
            for wi, (_, ws, we) in enumerate(spans):
                if a < we and b > ws:  # token overlaps the word's span
                    positions[wi].append(first + t)
        if seg.has_bos:
            index.bos.append(seg.offset)
        index.eos.append(first + kept)
        if seg_i == 0:
            index.n_tokens = kept
    index.text_len = max((s.offset + s.length for s in segments), default=0)
    return index


def _index_rendered(prompt: str, seg: TextSegment, spans: list[tuple[str, int, int]], positions: list[list[int]],
                    index: TokenIndex, warn: bool) -> int:
    """Word positions of a prompt the encoder reads inside a template (`TextSegment.render`)."""
    text, start = seg.render(prompt)
    if text[start:start + len(prompt)] != prompt:
        raise ValueError("the text template does not contain the prompt where it says it does")
    enc = seg.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end = start + len(prompt)
    shift = max(0, seg.length - (len(enc["input_ids"]) - seg.drop)) if seg.pad_left else 0
    kept = cut = 0
    after = None
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        pos = seg.offset + t - seg.drop + shift
        if a >= end:
            after = pos if after is None else after
            continue
        if b <= start or pos < seg.offset:
            continue
        if pos >= seg.offset + seg.length:
            cut += 1
            continue
        kept += 1
        for wi, (_, ws, we) in enumerate(spans):
            if a - start < we and b - start > ws:
                positions[wi].append(pos)
    if cut and warn:
        warnings.warn(f"prompt is longer than the text encoder takes here ({kept + cut} tokens, {cut} cut)",
                      stacklevel=4)
    last = seg.offset + seg.length - 1
    index.eos.append(min(after if after is not None else last, last))
    return kept


# A small built-in list of function words: Bounded Attention blocks these for every subject,
# and guidance methods refuse them as subjects (the official code needs NLTK for this).
STOP_WORDS = frozenset(
    """a an the and or but nor of in on at to for with without from by as into onto over under above
    below behind beside between near next left right top bottom front back is are was were be been
    being it its this that these those there here his her their our your my one two three four five
    six seven eight nine ten some many few several each every both all any no not very""".split()
)
