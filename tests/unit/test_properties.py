"""Property-based checks (hypothesis) of the invariants the data pipeline promises for any
input text, not only the hand-picked cases of the other tests."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltk.training.clean import clean_documents
from ltk.training.tokenizer import Tokenizer

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def tok():
    corpus = ["def f(x):\n    return x * 2  # double\n", "héllo wörld — 日本語のテキスト ✓\n"] * 20
    return Tokenizer.train_bpe(corpus, 300)


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_cleaning_is_idempotent(text):
    once, _ = clean_documents([text], 0)
    if once:
        twice, stats = clean_documents(once, 0)
        assert twice == once
        assert stats.control_chars_removed == 0 and stats.spaces_normalized == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT)
def test_byte_level_bpe_round_trips_and_counts_bytes(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    lengths = tok.token_byte_lengths()
    assert sum(int(lengths[i]) for i in ids) == len(text.encode("utf-8"))
