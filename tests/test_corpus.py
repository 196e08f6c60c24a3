import gzip
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import export_documents, iter_documents, pack_documents
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


@pytest.mark.parametrize("name", ["doc.txt", "docs.jsonl", "docs.jsonl.gz"])
def test_corpus_that_is_not_utf8_names_file_offset_and_fix(tmp_path, name):
    path = tmp_path / name
    latin1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8
    lines = (
        [b"first line", latin1] if name == "doc.txt" else [b'{"text": "first"}', b'{"text": "%s"}' % latin1]
    )
    data = b"\n".join(lines) + b"\n"
    offset = data.index(b"\xe9")
    with gzip.open(path, "wb") if name.endswith(".gz") else open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError) as e:
        list(iter_documents(str(path)))
    assert str(e.value) == (
        f"corpus file {path} is not UTF-8: {'decompressed ' if name.endswith('.gz') else ''}byte "
        f"{offset} (line 2) is b'\\xe9' (invalid continuation byte); save it as UTF-8"
    )
    assert isinstance(e.value.__cause__, UnicodeDecodeError)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + '{"text": "unterminated\n')
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(path))}:3 is not valid JSON \(.*\); .*fix or remove that line$"
    ):
        list(iter_documents(str(path)))


def test_damaged_gzip_corpus_is_a_clear_error(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps({"text": f"document {i} " * 50}) for i in range(200)))
    path.write_bytes(path.read_bytes()[:-100])  # truncated download
    with pytest.raises(
        ValueError, match=rf"^corpus file {re.escape(str(path))} is not a valid gzip file .*re-download it$"
    ):
        list(iter_documents(str(path)))


def test_export_stops_at_n_tokens_and_packs_like_its_source(tmp_path, tok):
    """The exported file holds the source's first documents up to `n_tokens` tokens, packs
    to the same sequences as the source, and the same source gives the same bytes."""
    pq.write_table(
        pa.table({"body": [f"document number {i} says " + "words " * (i % 7 + 1) for i in range(200)]}),
        tmp_path / "src.parquet",
    )
    src = str(tmp_path / "src.parquet")
    out = tmp_path / "a" / "corpus.jsonl.gz"
    kw = dict(text_field="body", progress=False)
    n_docs, n = export_documents(src, out, tok, n_tokens=300, batch_docs=16, **kw)
    docs = list(iter_documents(str(out)))
    lengths = [len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"]]
    assert n_docs == len(docs) < 200 and n == sum(lengths)
    assert sum(lengths[:-1]) < 300 <= n
    assert docs == list(iter_documents(src, "body"))[: len(docs)]
    pack = dict(context_len=16, n_tokens=256, bos_token_id=0)
    a = pack_documents(iter(docs), tok, **pack)
    b = pack_documents(iter_documents(src, "body"), tok, **pack)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    again = tmp_path / "b" / "corpus.jsonl.gz"
    export_documents(src, again, tok, n_tokens=300, batch_docs=5, **kw)
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(ValueError, match="jsonl.gz"):
        export_documents(src, tmp_path / "c.txt", tok, n_tokens=10, text_field="body")
