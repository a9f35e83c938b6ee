"""Word wrapping with a hanging indent, which rich has not: every line of human output goes
through :class:`Hanging`, so that long names and paths wrap or fold and are never cut."""

from __future__ import annotations

import re

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text

_WORD = re.compile(r"\S+\s*")
_FOLD_AFTER = ("/:,", "-_.")  # where a word wider than a line (a path, an id) folds best


def _fold_point(word: str, room: int, *, started: bool) -> int:
    """How many characters of ``word`` to keep on a line with ``room`` cells left: as many as
    fit, back to just after the last '/', ':' or ',' among them, else after a '-', '_' or
    '.'; on a line that holds nothing else yet, only back as far as half of them."""
    n, used = 0, 0
    for ch in word:
        used += cell_len(ch)
        if used > room:
            break
        n += 1
    lowest = 1 if started else n // 2
    for chars in _FOLD_AFTER:
        for i in range(n - 1, lowest - 1, -1):
            if word[i] in chars:
                return i + 1
    return n


def wrap_offsets(plain: str, first: int, rest: int) -> list[int]:
    """Where to break one line of ``plain`` so that its first line takes at most ``first``
    cells and every other line ``rest``: between words, and inside a word only when it is
    wider than a line (then it starts on the current line and folds)."""
    breaks: list[int] = []
    width = first
    used = cell_len(plain) - cell_len(plain.lstrip())
    for m in _WORD.finditer(plain):
        word = m.group().rstrip()
        size = cell_len(word)
        if used + size <= width:
            used += cell_len(m.group())
            continue
        if used and (size <= rest or width - used < min(12, rest // 3)):
            breaks.append(m.start())  # on a line of its own (or folded from one)
            width, used = rest, 0
            if size <= width:
                used = cell_len(m.group())
                continue
        pos, end = m.start(), m.start() + len(word)
        while cell_len(plain[pos:end]) > width - used:
            cut = _fold_point(plain[pos:end], width - used, started=used > 0)
            cut = cut or (0 if used else 1)
            pos += cut
            breaks.append(pos)
            width, used = rest, 0
        used += cell_len(plain[pos : m.end()])
    return breaks


class Hanging:
    """One line of output, word-wrapped to the width it is given with a hanging indent (which
    rich has not): the first line starts ``indent`` columns in, the lines it wraps onto
    ``indent + hang``. A word wider than a line (a long path or id) is folded, never cut."""

    MIN_WIDTH = 20  # narrower than this, indenting would leave too little room: do not

    def __init__(self, text: Text | str, *, indent: int = 0, hang: int = 2) -> None:
        self.text = text if isinstance(text, Text) else Text(text)
        self.indent = indent
        self.hang = hang

    def lines(self, width: int) -> list[Text]:
        indent, hang = self.indent, self.hang
        if width - indent - hang < self.MIN_WIDTH:
            indent = hang = 0
        first, rest = max(width - indent, 1), max(width - indent - hang, 1)
        out: list[Text] = []
        for part in self.text.split("\n", allow_blank=True):
            part.expand_tabs()
            pieces = part.divide(wrap_offsets(part.plain, rest if out else first, rest))
            for piece in pieces:
                piece.rstrip()
                piece.pad_left(indent + hang if out else indent)
                out.append(piece)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text("\n").join(self.lines(options.max_width))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        plain = self.text.plain
        longest = max((cell_len(w) for w in plain.split()), default=0)
        widest = max((cell_len(line) for line in plain.splitlines()), default=0)
        return Measurement(min(longest, 12), widest + self.indent).clamp(
            max_width=options.max_width
        )


def wrapped(console: Console, text: str, *, hang: int = 4) -> None:
    """Print plain text (several lines maybe) with each line wrapped under a hanging indent."""
    for line in text.splitlines():
        console.print(Hanging(line, hang=hang))
