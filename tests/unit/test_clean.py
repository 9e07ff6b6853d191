"""Cleaning: each normalising step, the drop rules, and the counts in CleanStats."""
import sys
import unicodedata

from ltk.training import clean
from ltk.training.clean import clean_documents

LONG = "def f(x):\n    return x + 1\n"  # 27 characters


def clean_one(text, min_chars=0):
    docs, stats = clean_documents([text], min_chars)
    return (docs[0] if docs else None), stats


def test_nfc_composes_accents():
    text, stats = clean_one("caf" + "e\u0301" + " ok")
    assert text == "caf\u00e9 ok"
    assert stats.docs_nfc_changed == 1


def test_control_chars_removed_but_newline_and_tab_kept():
    text, stats = clean_one("a\x00b\x1bc\x7fd\x85e\x0cf\n\tg")
    assert text == "abcdef\n\tg"
    assert stats.control_chars_removed == 5


def test_line_breaks_become_newlines():
    text, stats = clean_one("a\r\nb\rc\u2028d")
    assert text == "a\nb\nc\nd"
    assert stats.line_breaks_normalized == 3


def test_exotic_spaces_become_ascii_space():
    text, stats = clean_one("a\u00a0b\u2009c\u3000d")
    assert text == "a b c d"
    assert stats.spaces_normalized == 3


def test_trailing_whitespace_stripped_indentation_kept():
    text, stats = clean_one("class A:   \n    def f(self):\t\n        pass  ")
    assert text == "class A:\n    def f(self):\n        pass"
    assert stats.trailing_whitespace_removed == 6


def test_blank_line_runs_collapse_to_two():
    assert clean_one("a\n\n\n\n\n\nb")[0] == "a\n\n\nb"  # 5 blank lines -> 2
    assert clean_one("a\n\n\nb")[0] == "a\n\n\nb"  # 2 blank lines stay
    assert clean_one("a\n  \n \t\n\n\nb")[0] == "a\n\n\nb"  # whitespace-only lines are blank


def test_leading_and_trailing_blank_lines_removed_first_indent_kept():
    text, _ = clean_one("\n\n   \n    indented = 1\n\n\n")
    assert text == "    indented = 1"


def test_duplicates_after_cleaning_dropped_keeping_first():
    docs = [LONG, LONG.replace("\n", "\r\n"), LONG + "   \n\n", "x = 2\n" * 10, LONG]
    kept, stats = clean_documents(docs, min_chars=10)
    assert kept == [LONG.strip(), ("x = 2\n" * 10).strip()]
    assert stats.dropped_duplicate == 3
    assert (stats.docs_in, stats.docs_out, stats.dropped_short) == (5, 2, 0)


def test_min_chars_boundary_and_empty_documents():
    kept, stats = clean_documents(["a" * 10, "b" * 9, "", "   \n\n"], min_chars=10)
    assert kept == ["a" * 10]
    assert stats.dropped_short == 3
    kept, stats = clean_documents(["", "x"], min_chars=0)  # empty is dropped even with no minimum
    assert kept == ["x"] and stats.dropped_short == 1


def test_char_counts():
    kept, stats = clean_documents(["abc  ", "de"], min_chars=0)
    assert stats.chars_in == 7
    assert stats.chars_out == sum(map(len, kept)) == 5


def test_character_classes_match_unicode_categories():
    """The hand-written classes must be exactly Cc minus \\n\\t and Zs minus the space."""
    control, spaces = [], []
    for cp in range(sys.maxunicode + 1):
        cat = unicodedata.category(chr(cp))
        if cat == "Cc" and chr(cp) not in "\n\t":
            control.append(chr(cp))
        elif cat == "Zs" and cp != 0x20:
            spaces.append(chr(cp))
    assert all(clean._CONTROL.fullmatch(c) for c in control)
    assert all(clean._EXOTIC_SPACES.fullmatch(c) for c in spaces)
    assert len(clean._CONTROL.findall("".join(map(chr, range(0x3000))))) == len(control)
    assert len(clean._EXOTIC_SPACES.findall("".join(map(chr, range(sys.maxunicode + 1))))) == len(spaces)
