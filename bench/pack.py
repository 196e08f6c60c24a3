"""`pack` of every feature: seconds and bytes per feature, per gzip level, in one run.

    python -m bench.pack [--examples DIR] [--levels 1 6 9] [--reads 200]

Packs the examples tables (default `paths.examples`; tokens decoded with the tokenizer of
`paths.model_dir`) into a temporary folder once per gzip level, and prints the seconds, the
folder's bytes, bytes per live feature, and the time to read one random feature back with
`FeatureReader` (index, byte range, length prefix, gzip, JSON), as the frontend does.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from transformers import AutoTokenizer

from pipeline.config import load_params
from pipeline.featpack import FeatureReader, pack_features


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", help="folder of examples.parquet and features.parquet")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 6, 9])
    parser.add_argument("--reads", type=int, default=200, help="random features read back per level")
    args = parser.parse_args()
    params = load_params()
    examples = args.examples or params.paths.examples
    tokenizer = AutoTokenizer.from_pretrained(params.paths.model_dir)
    rng = random.Random(0)
    print(f"{'gzip':>4} {'seconds':>8} {'MB':>7} {'bytes/live feature':>19} {'ms/feature read':>16}")
    for level in args.levels:
        with tempfile.TemporaryDirectory() as tmp:
            stats = pack_features(examples, tokenizer, f"{tmp}/features", compresslevel=level, progress=False)
            live = stats["n_features"] - stats["n_dead"]
            reader = FeatureReader(f"{tmp}/features")
            index = reader.index()
            picks = [
                (int(l), rng.randrange(len(index[l]["offsets"]) - 1))
                for l in rng.choices(list(index), k=args.reads)
            ]
            start = time.perf_counter()
            for layer, feature in picks:
                reader.layer_feature(layer, feature)
            read_ms = (time.perf_counter() - start) / len(picks) * 1e3
        size = stats["bytes"]
        print(
            f"{level:>4} {stats['seconds']:>8.1f} {size / 1e6:>7.1f} {size / live:>19,.0f} {read_ms:>16.2f}"
        )
    print(f"{stats['n_features']} features, {stats['n_dead']} dead")


if __name__ == "__main__":
    main()
