"""`dump` refuses a model folder that the model stage did not materialise from `model.name`."""

import json
import re
import shutil

import pytest

from pipeline.config import parse_params
from pipeline.dump import check_materialised, run
from tests.tiny import TEXT

FIX = "run `dvc repro model` (or `clt model`) first"


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny model as the model stage leaves it: `source.json` names its source."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "source.json").write_text(json.dumps({"model.name": "tiny-llama"}))
    return folder


def _params(tmp_path, model_dir, name):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    return parse_params(
        {
            "paths": {"model_dir": str(model_dir), "activations": str(tmp_path / "act.zarr")},
            "model": {"name": name, "dtype": "float32"},
            "corpus": {"path": str(corpus), "context_len": 16},
            "dump": {"n_tokens": 64, "batch_size": 2, "shard_tokens": 64, "chunk_tokens": 32},
            "runtime": {"device": "cpu"},
        }
    )


def test_dump_refuses_a_model_folder_materialised_from_another_name(model_dir, tmp_path):
    params = _params(tmp_path, model_dir, "smollm2-135m-instruct")
    expected = f"`model.name` is 'smollm2-135m-instruct' but {model_dir} holds 'tiny-llama' " + (
        f"(materialised by the model stage); {FIX}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        run(params, progress=False)
    assert not (tmp_path / "act.zarr").exists() and not (tmp_path / "act.zarr.partial").exists()


def test_dump_runs_on_the_model_it_names(model_dir, tmp_path):
    run(_params(tmp_path, model_dir, "tiny-llama"), progress=False)
    assert (tmp_path / "act.zarr").is_dir()


def test_model_folder_without_source_json_is_refused(model_dir):
    (model_dir / "source.json").unlink()
    expected = (
        f"{model_dir} has no source.json, so the model stage did not materialise it from "
        f"`model.name` 'tiny-llama'; {FIX}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        check_materialised(model_dir, "tiny-llama")
    check_materialised(model_dir, str(model_dir))  # `model.name` is this folder itself


def test_unreadable_source_json_and_missing_folder(model_dir, tmp_path):
    (model_dir / "source.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(model_dir / 'source.json'))} does not record"):
        check_materialised(model_dir, "tiny-llama")
    missing = tmp_path / "nothing"
    with pytest.raises(
        FileNotFoundError, match=f"^model folder {re.escape(str(missing))} .*{re.escape(FIX)}$"
    ):
        check_materialised(missing, "tiny-llama")
