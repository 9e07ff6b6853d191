"""Cleaning: give every document one canonical form, then drop those that only teach noise.

Why bother, when a model could learn from raw text? Because the same visible text can be
stored in many ways (CRLF or LF line ends, "é" as one code point or as "e" + a combining
accent, a no-break space or a space), and a byte-level tokenizer sees each spelling as a
different byte sequence. Every variant costs vocabulary and model capacity and teaches
nothing. Canonical text also makes exact deduplication find more duplicates.

The steps, in order (each a small function below, each counted in CleanStats):

    1. line breaks     \\r\\n, \\r, U+2028, U+2029  ->  \\n
    2. Unicode NFC     composed form: "e" + U+0301  ->  "é"
    3. control chars   Unicode category Cc removed, except \\n and \\t
    4. spaces          NBSP and the other Unicode space separators (Zs)  ->  " "
    5. trailing space  stripped from every line; indentation is kept (this is code!)
    6. blank lines     3 or more in a row collapsed to 2; none at the start or end

Then whole documents are dropped: empty or shorter than `min_chars` (too little context to
learn from, often boilerplate), and exact duplicates of an earlier document (repeated text is
memorised rather than learned, and a duplicate across the train/val split would leak).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Iterable

_LINE_BREAKS = re.compile("\r\n?|[\u2028\u2029]")

# Category Cc is exactly U+0000-U+001F and U+007F-U+009F, so scanning below U+00A0 finds it all.
_CONTROL = re.compile("[" + "".join(
    re.escape(chr(c)) for c in range(0xA0) if unicodedata.category(chr(c)) == "Cc" and chr(c) not in "\n\t"
) + "]")

# Category Zs (space separators) without the ASCII space: no-break space, the typographic
# spaces U+2000-U+200A, narrow no-break space, ideographic space. Listed rather than computed,
# because scanning all of Unicode at import would cost a noticeable fraction of a second.
_EXOTIC_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")

_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{4,}")  # 4 line breaks in a row = 3 blank lines


@dataclass
class CleanStats:
    """What cleaning changed and dropped; stored in the prepared dataset's meta.json."""

    docs_in: int = 0
    docs_out: int = 0
    dropped_short: int = 0  # empty or shorter than min_chars after cleaning
    dropped_duplicate: int = 0  # identical to an earlier kept document after cleaning
    chars_in: int = 0
    chars_out: int = 0  # characters in the kept documents
    line_breaks_normalized: int = 0
    docs_nfc_changed: int = 0
    control_chars_removed: int = 0
    spaces_normalized: int = 0
    trailing_whitespace_removed: int = 0  # characters
    blank_lines_removed: int = 0  # line breaks removed: collapsed runs and trimmed ends

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_line_breaks(text: str) -> tuple[str, int]:
    """Every line break becomes \\n (Windows \\r\\n, old Mac \\r, Unicode line/paragraph separators)."""
    return _LINE_BREAKS.subn("\n", text)


def normalize_unicode(text: str) -> tuple[str, bool]:
    """NFC: canonically equivalent sequences become one form, precomposed where one exists."""
    if unicodedata.is_normalized("NFC", text):  # the common case, and much faster
        return text, False
    return unicodedata.normalize("NFC", text), True


def remove_control_chars(text: str) -> tuple[str, int]:
    """Drop invisible control characters (NUL, escape, form feed, ...) but keep \\n and \\t."""
    return _CONTROL.subn("", text)


def normalize_spaces(text: str) -> tuple[str, int]:
    """Exotic spaces look like a space, so they become one."""
    return _EXOTIC_SPACES.subn(" ", text)


def strip_trailing_whitespace(text: str) -> tuple[str, int]:
    """Remove spaces and tabs at the end of each line; returns the characters removed."""
    out = _TRAILING_SPACE.sub("", text)
    return out, len(text) - len(out)


def collapse_blank_lines(text: str) -> tuple[str, int]:
    """At most 2 blank lines in a row, none leading or trailing; returns the \\n removed.

    Runs after strip_trailing_whitespace, so a blank line is an empty one and a run of them
    is a run of \\n. Leading spaces of the first line survive: they are indentation.
    """
    out = _BLANK_RUN.sub("\n\n\n", text).strip("\n")
    return out, len(text) - len(out)


def clean_text(text: str, stats: CleanStats) -> str:
    """Apply the six normalising steps to one document, adding what they did to `stats`."""
    text, n = normalize_line_breaks(text)
    stats.line_breaks_normalized += n
    text, changed = normalize_unicode(text)
    stats.docs_nfc_changed += changed
    text, n = remove_control_chars(text)
    stats.control_chars_removed += n
    text, n = normalize_spaces(text)
    stats.spaces_normalized += n
    text, n = strip_trailing_whitespace(text)
    stats.trailing_whitespace_removed += n
    text, n = collapse_blank_lines(text)
    stats.blank_lines_removed += n
    return text


def clean_documents(docs: Iterable[str], min_chars: int) -> tuple[list[str], CleanStats]:
    """Clean every document, then drop short ones and exact duplicates (the first copy stays).

    Order is preserved, so the result is as deterministic as the input.
    """
    stats = CleanStats()
    kept: list[str] = []
    seen: set[str] = set()  # holds references to the kept strings, not copies
    for doc in docs:
        stats.docs_in += 1
        stats.chars_in += len(doc)
        text = clean_text(doc, stats)
        if not text or len(text) < min_chars:
            stats.dropped_short += 1
        elif text in seen:
            stats.dropped_duplicate += 1
        else:
            seen.add(text)
            kept.append(text)
            stats.chars_out += len(text)
    stats.docs_out = len(kept)
    return kept, stats
