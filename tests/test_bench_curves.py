"""`bench/curves.py`: the power-law fit recovers a known law, and its plots and CSVs."""

import json

import pytest
import yaml

from bench.curves import fit, load_runs, main, predict_gap


def _runs(a=2.0, alpha=0.3, beta=0.2):
    grid = [(t, f) for t in (1e5, 2e5, 4e5) for f in (256, 512)]
    return [{"tokens": t, "features": f, "replacement_score": 1 - a * t**-alpha * f**-beta} for t, f in grid]


def test_fit_recovers_a_power_law_in_tokens_and_features():
    f = fit(_runs(), "replacement_score")
    assert f["alpha"] == pytest.approx(0.3, abs=1e-6)
    assert f["beta"] == pytest.approx(0.2, abs=1e-6)
    assert predict_gap(f, 1e6, 1024) == pytest.approx(2.0 * 1e6**-0.3 * 1024**-0.2, rel=1e-5)


def test_fit_with_one_axis_leaves_the_other_exponent_out():
    f = fit([r for r in _runs() if r["features"] == 256], "replacement_score")
    assert f["beta"] is None and f["alpha"] == pytest.approx(0.3, abs=1e-6)


def test_runs_folder_to_csvs_and_png(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    for i, r in enumerate(_runs()):
        folder = runs / f"r{i}"
        folder.mkdir(parents=True)
        row = {
            "run": f"r{i}",
            **{
                k: r["replacement_score"]
                for k in ("replacement_score", "completeness_score", "top1_agreement", "kl_replacement")
            },
        }
        (folder / "row.json").write_text(json.dumps(row))
        train = {
            "n_steps": int(r["tokens"] / 1000),
            "batch_size": 1000,
            "d_transcoder": r["features"],
            "lr": 1e-3,
        }
        (folder / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    (runs / "other").mkdir()  # another family of one run: not fitted
    (runs / "other" / "row.json").write_text((runs / "r0" / "row.json").read_text())
    (runs / "other" / "params.yaml").write_text(yaml.safe_dump({"train": {**train, "lr": 2e-3}}))
    assert len({r["family"] for r in load_runs(runs)}) == 2
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["curves", "--runs", str(runs), "--out", str(out)])
    main()
    printed = capsys.readouterr().out
    assert "T^-0.300 F^-0.200" in printed and "best predicted replacement" in printed
    assert (out / "scaling.png").stat().st_size > 0
    assert len((out / "tokens.csv").read_text().splitlines()) == 4  # header + 3 token counts
    assert len((out / "features.csv").read_text().splitlines()) == 3
    assert json.loads((out / "fits.json").read_text())[0]["fits"]["replacement_score"]["n_runs"] == 6
