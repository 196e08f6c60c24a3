import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.clt import CLTShape, CrossLayerTranscoder
from pipeline.config import PlotsConfig
from pipeline.plots import NAMES, decoder_spread, map_layers, write_plots
from tests.dvc_repo import ROOT

L, D, F = 4, 8, 16


def tiny_inputs(folder: Path, kind: str = "clt"):
    """A tiny transcoder, a features table with a few dead features and train/evaluate JSON."""
    transcoder = CrossLayerTranscoder(CLTShape(n_layers=L, d_model=D, d_transcoder=F, kind=kind))
    examples = folder / "examples"
    examples.mkdir(parents=True)
    frequency = 10 ** np.random.uniform(-5, -1, L * F)
    frequency[::7] = 0
    table = {"layer": np.repeat(np.arange(L), F), "feature": np.tile(np.arange(F), L), "frequency": frequency}
    pq.write_table(pa.table(table), examples / "features.parquet")
    per_layer = [{"layer": l, "nmse": 0.1 * (l + 1), "l0": 5.0 + l, "dead_fraction": 0.0} for l in range(L)]
    (folder / "train.json").write_text(json.dumps({"per_layer": per_layer}))
    per_layer = [{"layer": l, "kl": 0.01 * l, "ce": 3.0, "ce_recovered": 0.9} for l in range(L)]
    (folder / "evaluate.json").write_text(json.dumps({"per_layer": per_layer}))
    return transcoder, examples


def make_plots(folder: Path, out: Path, kind: str = "clt") -> Path:
    transcoder, examples = tiny_inputs(folder, kind)
    return write_plots(
        transcoder,
        out,
        examples_dir=examples,
        train_json=folder / "train.json",
        evaluate_json=folder / "evaluate.json",
        cfg=PlotsConfig(density_bins=10, map_layers=3),
    )


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_decoder_spread_rows_are_shares_of_the_squared_norm(kind):
    transcoder = CrossLayerTranscoder(CLTShape(n_layers=L, d_model=D, d_transcoder=F, kind=kind))
    share = decoder_spread(transcoder)
    np.testing.assert_allclose(share.sum(1), 1)
    assert (np.tril(share, -1) == 0).all()
    if kind == "plt":
        np.testing.assert_allclose(share, np.eye(L))
    with torch.no_grad():  # feature 0 of layer 0 writes only to layer 2: a quarter of 4 features' mean
        transcoder.W_dec[0][:4] = 0
        transcoder.W_dec[0][:4, min(2, transcoder.W_dec[0].shape[1] - 1)] = 1
    if kind == "clt":
        assert decoder_spread(transcoder)[0, 2] >= 4 / F


def test_write_plots_writes_every_png_and_csv(tmp_path):
    out = make_plots(tmp_path, tmp_path / "plots")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{e}" for n in NAMES for e in ("png", "csv"))
    for name in NAMES:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "layer_metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["nmse"]) for r in rows] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert "kl_alone" in rows[0]
    with (out / "feature_density.csv").open() as f:
        density = list(csv.DictReader(f))
    assert sum(int(r["n_features"]) for r in density) == L * F - len(range(0, L * F, 7))
    assert map_layers(L, 3) == [0, 2, 3] and map_layers(2, 4) == [0, 1]


def test_wrong_features_table_is_a_clear_error(tmp_path):
    transcoder, examples = tiny_inputs(tmp_path)
    wider = CrossLayerTranscoder(CLTShape(n_layers=L, d_model=D, d_transcoder=2 * F))
    with pytest.raises(ValueError, match="has 64 features but the transcoder has 4 x 32"):
        write_plots(
            wider,
            tmp_path / "plots",
            examples_dir=examples,
            train_json=tmp_path / "train.json",
            evaluate_json=None,
            cfg=PlotsConfig(),
        )


def _top_level_plots() -> list:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]


def test_dvc_plot_declarations_point_at_written_columns(tmp_path):
    """Every top-level plot under `${paths.plots}` names a file the stage writes, and its x
    and y name columns of that file."""
    out = make_plots(tmp_path, tmp_path / "plots")
    checked = set()
    for entry in _top_level_plots():
        key, spec = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        files = spec.get("y") if isinstance(spec.get("y"), dict) else {key: spec.get("y")}
        for file, y in files.items():
            if not file.startswith("${paths.plots}/"):
                continue
            path = out / file.removeprefix("${paths.plots}/")
            assert path.is_file(), file
            checked.add(path.name)
            if path.suffix == ".csv":
                with path.open() as f:
                    header = next(csv.reader(f))
                for column in [spec["x"], *([y] if isinstance(y, str) else y)]:
                    assert column in header, (file, column)
    assert {f"{n}.png" for n in NAMES} <= checked


def test_dvc_plots_show_renders_them(tmp_path):
    """`dvc plots show` in a copy of dvc.yaml and params.yaml renders every declared plot."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    make_plots(tmp_path / "inputs", repo / params["paths"]["plots"])
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    result = subprocess.run(
        [dvc, "plots", "show", "--json"], cwd=repo, check=True, capture_output=True, text=True
    )
    shown = json.loads(result.stdout)
    plots_dir = params["paths"]["plots"]
    assert not [e for e in shown.get("errors", []) if plots_dir in e["source"]]
    for name in NAMES:
        assert shown["data"][f"{plots_dir}/{name}.png"][0]["type"] == "image"
    for title in ("NMSE per layer", "L0 per layer", *(f"{plots_dir}/{n}.csv" for n in NAMES[:2])):
        assert shown["data"][title][0]["type"] == "vega", title
        assert shown["data"][title][0]["content"]["data"]["values"], title
