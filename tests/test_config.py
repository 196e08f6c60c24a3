import pytest
import yaml

from pipeline.config import load_params, parse_params


def test_default_params_load():
    params = load_params("params.yaml")
    assert params.model.name == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"dump": {"n_tokens": "many"}}, "`dump.n_tokens` must be an integer, got 'many'"),
        ({"dump": {"batchsize": 4}}, "`dump.batchsize` is not a known key of `dump`"),
        ({"dump": {"batch_size": 0}}, "`dump.batch_size` must be >= 1, got 0"),
        ({"dump": {"dtype": "int8"}}, "`dump.dtype` must be one of bfloat16, float16, float32"),
        (
            {"dump": {"shard_tokens": 1000, "chunk_tokens": 512}},
            "must be a multiple of `dump.chunk_tokens`",
        ),
        ({"corpus": {"context_len": 1}}, "`corpus.context_len` must be >= 2"),
        ({"runtime": {"device": "tpu"}}, "`runtime.device` must be auto, cpu, cuda"),
        ({"trian": {}}, "`trian` is not a known section"),
        ({"model": {"name": 3}}, "`model.name` must be a string"),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw)


def test_params_file_roundtrip(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"dump": {"n_tokens": 256}}))
    assert load_params(path).dump.n_tokens == 256
