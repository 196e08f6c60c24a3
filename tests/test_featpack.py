"""The `pack` stage: circuit-tracer's packed feature format, read back by the frontend's protocol
from disk and over a real HTTP server that honours Range requests."""

import gzip
import http.server
import json
import struct
import subprocess
import threading
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

import pipeline.examples as E
from pipeline import featpack
from pipeline.cantor import cantor, cantor_unpair
from pipeline.featpack import FeatureReader, token_strings
from tests.ct import CT_DIR, CT_PYTHON, CT_SKIP_REASON
from tests.test_examples import tiny  # noqa: F401  (the module-scoped tiny store and transcoder)


@pytest.fixture(scope="module")
def packed(tiny):  # noqa: F811
    E.run(tiny, progress=False)
    featpack.run(tiny, progress=False)
    return tiny


def js_cantor_unpair(z):
    """The frontend's `util.cantorUnpair`, in floating point as JavaScript computes it."""
    import math

    w = math.floor((math.sqrt(8 * z + 1) - 1) / 2)
    y = z - (w * w + w) / 2
    return int(w - y), int(y)


def test_cantor_round_trip_and_matches_the_frontend():
    for layer in range(0, 80, 7):
        for f in [*range(0, 300, 13), 65535, 131071]:
            z = cantor(layer, f)
            assert cantor_unpair(z) == (layer, f) == js_cantor_unpair(z)


def test_layout_follows_the_format(packed):
    folder = Path(packed.paths.features)
    assert sorted(p.name for p in folder.iterdir()) == [
        "index.json.gz",
        "layer_0.bin",
        "layer_1.bin",
        "layer_2.bin",
    ]
    index = json.loads(gzip.decompress((folder / "index.json.gz").read_bytes()))
    features = pd.read_parquet(Path(packed.paths.examples) / "features.parquet")
    for layer in range(3):
        entry = index[str(layer)]
        offsets = entry["offsets"]
        assert entry["filename"] == f"layer_{layer}.bin"
        assert len(offsets) == 24 + 1 and offsets[0] == 0
        assert offsets[-1] == (folder / entry["filename"]).stat().st_size
        data = (folder / entry["filename"]).read_bytes()
        dead = features[features["layer"] == layer]["dead"].tolist()
        for f in range(24):
            start, end = offsets[f], offsets[f + 1]
            assert (start == end) == dead[f]
            if start < end:  # a length prefix, then exactly that much gzip
                (length,) = struct.unpack("<I", data[start : start + 4])
                assert length == end - start - 4
                json.loads(gzip.decompress(data[start + 4 : end]))


def shown_as(tokenizer, token_id):
    """The token decoded alone; a partial UTF-8 character as its byte (the tiny tokenizer's
    byte-level alphabet puts byte b >= 0x80 at a character of its own)."""
    text = tokenizer.decode([int(token_id)])
    if text != "\ufffd":
        return text
    (byte,) = [
        b
        for b, c in featpack._bytes_to_unicode().items()
        if c == tokenizer.convert_ids_to_tokens(int(token_id))
    ]
    return f"\\x{byte:02x}"


def test_records_hold_the_examples_tables(packed):
    """Every record against the Parquet tables, read with pandas and decoded independently."""
    tokenizer = AutoTokenizer.from_pretrained(packed.paths.model_dir)
    folder = Path(packed.paths.examples)
    examples = pd.read_parquet(folder / "examples.parquet")
    features = pd.read_parquet(folder / "features.parquet")
    reader = FeatureReader(packed.paths.features)
    for _, stats in features.iterrows():
        layer, f = int(stats["layer"]), int(stats["feature"])
        record = reader.feature(cantor(layer, f))
        if stats["dead"]:
            assert record is None
            continue
        assert record["index"] == f
        assert record["act_max"] == pytest.approx(stats["act_max"], rel=1e-5)
        assert record["act_min"] == pytest.approx(stats["act_min"], rel=1e-5)
        assert record["activation_frequency"] == pytest.approx(stats["frequency"])
        assert record["histogram"] == [float(c) for c in stats["histogram"]]
        assert len(record["quantile_values"]) == 100
        assert record["top_logits"] == [shown_as(tokenizer, t) for t in stats["top_logit_ids"]]
        assert record["bottom_logits"] == [shown_as(tokenizer, t) for t in stats["bottom_logit_ids"]]
        rows = examples[(examples["layer"] == layer) & (examples["feature"] == f)]
        shown = [e for q in record["examples_quantiles"] for e in q["examples"]]
        assert len(shown) == len(rows)
        names = [q["quantile_name"] for q in record["examples_quantiles"]]
        assert names[0] == "Top activations" and names[-1] == "Random firing examples"
        assert all(n.startswith("Subsample interval") for n in names[1:-1])
        for example, (_, row) in zip(shown, rows.iterrows()):
            assert example["tokens"] == [shown_as(tokenizer, t) for t in row["token_ids"]]
            assert example["tokens_acts_list"] == pytest.approx(list(row["token_acts"]), abs=1e-4)
            assert example["train_token_ind"] == row["max_index"]
            acts = example["tokens_acts_list"]
            assert acts[example["train_token_ind"]] == max(acts)
        assert not shown[0]["is_repeated_datapoint"]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; honours `Range: bytes=a-b` (b included, clamped) unless told not to."""

    honour_range = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        spec = self.headers.get("Range")
        if spec and self.honour_range:
            first, last = spec.removeprefix("bytes=").split("-")
            start, end = int(first), min(int(last or len(data) - 1), len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(folder: Path, handler=RangeHandler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_http_range_requests_give_the_same_features(packed):
    server, url = serve(Path(packed.paths.features))
    try:
        local = list(FeatureReader(packed.paths.features).records())
        remote = list(FeatureReader(url).records())
        assert remote == local
        assert sum(record is not None for *_, record in remote) == 72 - 9
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_ignores_ranges_is_a_clear_error(packed):
    class NoRange(RangeHandler):
        honour_range = False

    server, url = serve(Path(packed.paths.features), NoRange)
    try:
        with pytest.raises(ValueError, match="ignored the Range header"):
            FeatureReader(url).layer_feature(0, 5)
    finally:
        server.shutdown()
        server.server_close()


def test_pack_is_reproducible(packed, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(packed.paths.model_dir)
    again = tmp_path / "again"
    featpack.pack_features(packed.paths.examples, tokenizer, again, progress=False)
    for path in Path(packed.paths.features).iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes()
    assert not (tmp_path / "again.partial").exists()


def test_missing_examples_is_a_clear_error(tmp_path, packed):
    tokenizer = AutoTokenizer.from_pretrained(packed.paths.model_dir)
    with pytest.raises(FileNotFoundError, match="run `dvc repro examples`"):
        featpack.pack_features(tmp_path, tokenizer, tmp_path / "out", progress=False)


def merge_hex_escapes(tokens):
    """The frontend's `mergeHexEscapedMax` (without activations): `\\xNN` runs back to text."""
    import re

    out, i = [], 0
    while i < len(tokens):
        if re.match(r"\\x[0-9a-f]{2}", tokens[i]):
            buf = b""
            for j in range(i, min(i + 5, len(tokens))):
                buf += bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", tokens[j]))
                try:
                    out.append(buf.decode("utf-8"))
                    i = j + 1
                    break
                except UnicodeDecodeError:
                    continue
            else:
                out.append(tokens[i])
                i += 1
        else:
            out.append(tokens[i])
            i += 1
    return out


def test_partial_utf8_tokens_are_hex_escaped_for_the_frontend(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    ids = tokenizer("fox — é", add_special_tokens=False)["input_ids"]
    strings = token_strings(tokenizer, ids)
    tokens = [strings[i] for i in ids]
    assert any(t.startswith("\\x") for t in tokens)  # the byte-level tokens of "—" and "é"
    assert all("\ufffd" not in t for t in tokens)
    assert "".join(merge_hex_escapes(tokens)) == "fox — é"
    plain = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    assert [token_strings(tokenizer, plain)[i] for i in plain] == [tokenizer.decode([i]) for i in plain]


@pytest.mark.skipif(not CT_PYTHON.exists(), reason=CT_SKIP_REASON)
def test_circuit_tracer_validates_every_record(packed):
    result = subprocess.run(
        [str(CT_PYTHON), str(CT_DIR / "check_features.py"), packed.paths.features],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "validated 63 records (9 dead)"
