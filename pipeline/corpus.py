"""Reading a text corpus and packing it into fixed-length token sequences.

Documents come from .txt files (one document per file), .jsonl / .jsonl.gz files (one
JSON object per line, text under `text_field`), .parquet files (a `text_field` column), a
folder of such files (read in sorted order), or a Hugging Face dataset (`hf:<id>[:split]`,
needs the `datasets` package and a network or a local cache).

Packing: documents are tokenised without special tokens and concatenated in order; the
stream is cut into sequences of `context_len - 1` tokens and each sequence gets the BOS
token at position 0, so every stored token has the same kind of left context as a prompt
the model will later be traced on.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class PackedCorpus:
    """Token sequences with, per token, the index of the document it came from."""

    token_ids: np.ndarray  # (n_seqs, context_len) int32, BOS in column 0
    doc_ids: np.ndarray  # (n_seqs, context_len) int32; BOS takes the doc of the token after it

    @property
    def n_tokens(self) -> int:
        return self.token_ids.size


def _files(root: Path) -> list[Path]:
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise ValueError(
                f"corpus folder {root} holds no {', '.join(SUFFIXES)} files; add some or "
                "point `corpus.path` at a file"
            )
        return files
    if not root.exists():
        raise FileNotFoundError(f"corpus file {root} does not exist; check `corpus.path`")
    if not root.name.endswith(SUFFIXES):
        raise ValueError(f"corpus file {root} is not one of {', '.join(SUFFIXES)}; check `corpus.path`")
    return [root]


def _not_utf8(path: Path, e: UnicodeDecodeError, offset: int, lineno: int) -> ValueError:
    """The error for a corpus file that is not UTF-8: bad bytes at `offset` (+ `e.start`)
    of `path`'s (decompressed) contents, on line `lineno`."""
    where = "decompressed byte" if path.name.endswith(".gz") else "byte"
    return ValueError(
        f"corpus file {path} is not UTF-8: {where} {offset + e.start} (line {lineno}) is "
        f"{e.object[e.start : e.start + 1]!r} ({e.reason}); save it as UTF-8"
    )


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e, 0, data.count(b"\n", 0, e.start) + 1) from e


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    offset = 0
    with opener(path, "rb") as f:
        for lineno, raw in _lines(f, path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e, offset, lineno) from e
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno} is not valid JSON ({e}); each line must be one JSON object: "
                    "fix or remove that line"
                ) from e
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{lineno} has no key {text_field!r}; set `corpus.text_field`")
            yield record[text_field]


def _lines(f, path: Path) -> Iterator[tuple[int, bytes]]:
    """`(line number, line)` of the open (binary) file `f`; a damaged .gz is a clear error."""
    try:
        yield from enumerate(f, 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(
            f"corpus file {path} is not a valid gzip file ({e}); re-create or re-download it"
        ) from e


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "set `corpus.text_field`"
        )
    for batch in pf.iter_batches(columns=[text_field]):
        yield from batch.column(0).to_pylist()


def _read_hf(spec: str, text_field: str) -> Iterator[str]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"`corpus.path` hf:{spec} needs the `datasets` package: pip install datasets") from e
    for record in datasets.load_dataset(name, split=split or "train", streaming=True):
        yield record[text_field]


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Yield the corpus's documents as strings, in a fixed order."""
    if path.startswith("hf:"):
        yield from _read_hf(path[3:], text_field)
        return
    for file in _files(Path(path)):
        if file.suffix == ".txt":
            yield _read_text(file)
        elif file.suffix == ".parquet":
            yield from _read_parquet(file, text_field)
        else:
            yield from _read_jsonl(file, text_field)


def export_documents(
    source: str,
    out: str | Path,
    tokenizer,
    *,
    n_tokens: int,
    text_field: str = "text",
    batch_docs: int = 256,
    progress: bool = True,
) -> tuple[int, int]:
    """Write the first documents of `source` (anything `corpus.path` takes) to `out`, a
    .jsonl.gz file of `{"text": ...}` lines, until their tokens reach `n_tokens`.

    For corpora DVC cannot track as a dependency, above all `hf:` datasets (streamed, and
    not a path): the exported file is one, and the same source gives the same bytes (the
    gzip header holds no time). Returns (documents, tokens) written."""
    from tqdm import tqdm

    from pipeline.atomic import staged

    out = Path(out)
    if not out.name.endswith(".jsonl.gz"):
        raise ValueError(f"{out}: the exported corpus is a .jsonl.gz file")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_docs = have = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="export", disable=not progress)
    with staged(out) as tmp, gzip.GzipFile(tmp, "wb", mtime=0) as f:
        pending: list[str] = []

        def flush() -> None:
            nonlocal n_docs, have
            if not pending:
                return
            for text, ids in zip(pending, tokenizer(pending, add_special_tokens=False)["input_ids"]):
                if have >= n_tokens:
                    break
                f.write(json.dumps({"text": text}, ensure_ascii=False).encode() + b"\n")
                n_docs += 1
                have += len(ids)
                bar.update(len(ids))
            pending.clear()

        for text in iter_documents(source, text_field):
            if isinstance(text, str) and text.strip():
                pending.append(text)
            if len(pending) >= batch_docs:
                flush()
                if have >= n_tokens:
                    break
        flush()
    bar.close()
    if have < n_tokens:
        logger.warning("%s holds only %d tokens, fewer than the %d asked for", source, have, n_tokens)
    logger.info("wrote %d documents (%d tokens) to %s", n_docs, have, out)
    return n_docs, have


def pack_documents(
    documents: Iterator[str],
    tokenizer,
    *,
    context_len: int,
    n_tokens: int,
    bos_token_id: int,
    batch_docs: int = 256,
) -> PackedCorpus:
    """Tokenise documents and pack them into `n_tokens // context_len` BOS-led sequences."""
    n_seqs = n_tokens // context_len
    if n_seqs < 1:
        raise ValueError(
            f"`dump.n_tokens` ({n_tokens}) is less than one sequence of `corpus.context_len` "
            f"({context_len}) tokens"
        )
    body = context_len - 1
    need = n_seqs * body
    tokens = np.empty(need, dtype=np.int32)
    docs = np.empty(need, dtype=np.int32)
    filled, doc_index, pending = 0, 0, []

    def flush() -> None:
        nonlocal filled, doc_index
        encoded = tokenizer(pending, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            take = min(len(ids), need - filled)
            tokens[filled : filled + take] = ids[:take]
            docs[filled : filled + take] = doc_index
            filled += take
            doc_index += 1
        pending.clear()

    for text in documents:
        if not isinstance(text, str):
            raise ValueError(f"corpus document {doc_index + len(pending)} is not text: {text!r:.80}")
        if text.strip():
            pending.append(text)
        if len(pending) >= batch_docs:
            flush()
            if filled >= need:
                break
    if pending and filled < need:
        flush()
    if filled == 0:
        raise ValueError("the corpus is empty: no document holds any text; check `corpus.path`")
    if filled < need:
        have = filled // body
        raise ValueError(
            f"the corpus gives only {have} sequences ({have * context_len} tokens) of "
            f"`corpus.context_len` {context_len}, but `dump.n_tokens` asks for {n_seqs * context_len}; "
            "lower `dump.n_tokens` or add text"
        )
    token_ids = np.empty((n_seqs, context_len), dtype=np.int32)
    doc_ids = np.empty((n_seqs, context_len), dtype=np.int32)
    token_ids[:, 0] = bos_token_id
    token_ids[:, 1:] = tokens.reshape(n_seqs, body)
    doc_ids[:, 1:] = docs.reshape(n_seqs, body)
    doc_ids[:, 0] = doc_ids[:, 1]
    logger.info("packed %d documents into %d sequences of %d tokens", doc_index, n_seqs, context_len)
    return PackedCorpus(token_ids, doc_ids)
