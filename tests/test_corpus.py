import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import iter_documents, pack_documents
from tests.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_pack_puts_bos_first_and_tracks_documents(tok):
    docs = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "All that glitters is not gold. " * 4,
    ]
    packed = pack_documents(iter(docs), tok, context_len=8, n_tokens=40, bos_token_id=0)
    assert packed.token_ids.shape == (5, 8)
    assert (packed.token_ids[:, 0] == 0).all()
    stream = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] for d in docs])
    np.testing.assert_array_equal(packed.token_ids[:, 1:].reshape(-1), stream[:35])
    n0 = len(tok(docs[0], add_special_tokens=False)["input_ids"])
    expected_docs = (np.arange(35) >= n0).astype(np.int32)
    np.testing.assert_array_equal(packed.doc_ids[:, 1:].reshape(-1), expected_docs)
    np.testing.assert_array_equal(packed.doc_ids[:, 0], packed.doc_ids[:, 1])


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth", "fifth"]}), tmp_path / "c.parquet")
    assert list(iter_documents(str(tmp_path))) == [
        "first document",
        "second",
        "third",
        "fourth",
        "fifth",
    ]


def test_bad_corpus_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    with pytest.raises(ValueError, match="holds no"):
        list(iter_documents(str(tmp_path)))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(ValueError, match="has no key 'text'"):
        list(iter_documents(str(tmp_path / "x.jsonl")))
    with pytest.raises(ValueError, match="corpus is empty"):
        pack_documents(iter(["", "  "]), tok, context_len=8, n_tokens=16, bos_token_id=0)
    with pytest.raises(ValueError, match="lower `dump.n_tokens`"):
        pack_documents(iter(["short text"]), tok, context_len=8, n_tokens=800, bos_token_id=0)


def test_default_corpus_is_large_and_varied():
    docs = list(iter_documents("data/corpus/default.jsonl.gz"))
    chars = sum(map(len, docs))
    assert len(docs) > 1000 and chars > 4_500_000  # > 1M tokens at ~4.2 chars/token
