"""Validate every record of a packed features folder with circuit-tracer's own pydantic model
(run with .ct-venv's python).

    .ct-venv/bin/python ct/check_features.py FEATURES_DIR_OR_URL

Reads the folder with `pipeline.featpack.FeatureReader` (standard library only), which
follows the frontend's protocol: index.json.gz, a byte range per feature, the 4-byte length
prefix, gzip, JSON. Each live record must validate as `circuit_tracer.frontend.feature_models.
Model` and round-trip through it unchanged. Prints `validated N records (M dead)`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuit_tracer.frontend.feature_models import Model  # noqa: E402

from pipeline.featpack import FeatureReader  # noqa: E402


def main() -> None:
    reader = FeatureReader(sys.argv[1])
    n_live = n_dead = 0
    for layer, feature, record in reader.records():
        if record is None:
            n_dead += 1
            continue
        model = Model.model_validate(record)
        if model.model_dump() != record:
            raise SystemExit(f"layer {layer} feature {feature}: circuit-tracer reads a different record")
        n_live += 1
    print(f"validated {n_live} records ({n_dead} dead)")


if __name__ == "__main__":
    main()
