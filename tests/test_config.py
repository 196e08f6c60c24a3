import dataclasses
import typing

import pytest
import yaml

from pipeline.config import (
    Bound,
    CorpusConfig,
    PackConfig,
    Params,
    ParamsError,
    TrainConfig,
    load_params,
    parse_params,
    preset_overrides,
)

SECTIONS = typing.get_type_hints(Params)


def test_default_params_load():
    params = load_params("params.yaml")
    assert params.model.name == "smollm2-135m-instruct"


def test_params_yaml_lists_every_key_with_its_default():
    """The shipped `params.yaml` is the dataclass defaults written out: every key, same value."""
    with open("params.yaml") as f:
        raw = yaml.safe_load(f)
    assert sorted(raw) == sorted(SECTIONS)
    defaults = Params()
    loaded = load_params("params.yaml")
    for name, cls in SECTIONS.items():
        assert sorted(raw[name]) == sorted(f.name for f in dataclasses.fields(cls)), name
        for key in raw[name]:
            value, default = getattr(getattr(loaded, name), key), getattr(getattr(defaults, name), key)
            assert value == default, f"`{name}.{key}`: params.yaml has {value!r}, the dataclass {default!r}"
    assert loaded == defaults


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
        ({"corpus": {"context_len": 1}}, "`corpus.context_len` must be >= 2, got 1; a sequence is BOS"),
        ({"corpus": {"path": ""}}, "`corpus.path` must be a non-empty string, got ''; name a file"),
        ({"runtime": {"device": "tpu"}}, "`runtime.device` must be auto, cpu, cuda"),
        ({"trian": {}}, "`trian` is not a known section"),
        ({"model": {"name": 3}}, "`model.name` must be a string"),
        ({"train": {"lr": 5}}, "`train.lr` must be in (0, 1), got 5.0; 1e-4 to 1e-2 is typical"),
        ({"train": {"lr": "fast"}}, "`train.lr` must be a number, got 'fast'; 1e-4 to 1e-2 is typical"),
        ({"train": {"max_norm_ratio": 0.5}}, "`train.max_norm_ratio` must be 0 (keep every token) or > 1"),
        ({"graphs": {"node_threshold": 0}}, "`graphs.node_threshold` must be in (0, 1], got 0.0"),
        ({"pack": {"compresslevel": 10}}, "`pack.compresslevel` must be in 1..9, got 10"),
        ({"examples": {"n_intervals": 65}}, "`examples.n_intervals` must be in 1..64, got 65"),
        (
            {"train": {"compute_dtype": "float16"}},
            "`train.compute_dtype` must be one of auto, bfloat16, float32",
        ),
        ({"examples": {"autocast": True}}, "`examples.autocast` is not a known key of `examples`"),
        ({"dump": {"store_url": "bucket/acts.zarr"}}, "`dump.store_url` must be a URL such as s3://"),
        (
            {"dump": {"store_url": "nope://b/acts.zarr"}},
            "`dump.store_url` has the scheme 'nope', which fsspec",
        ),
        ({"dump": {"store_url": "s3://bucket"}}, "`dump.store_url` must name a `.zarr` prefix"),
        (
            {"dump": {"store_url": "s3://bucket/acts.zarr"}},
            "`paths.activations` must be a `.json` file (the manifest, e.g. data/activations.json) when "
            "`dump.store_url` is set, got 'data/activations.zarr'",
        ),
        (
            {"paths": {"activations": "data/activations.json"}},
            "`dump.store_url` must be set (e.g. s3://bucket/acts.zarr) when `paths.activations` is a "
            "manifest",
        ),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw)


def _ranged_fields():
    for section, cls in SECTIONS.items():
        for key, tp in typing.get_type_hints(cls, include_extras=True).items():
            for mark in getattr(tp, "__metadata__", ()):
                if isinstance(mark, Bound):
                    side = ("lower" if mark.lower else "upper") + ("-inclusive" if mark.inclusive else "")
                    yield pytest.param(section, key, mark, id=f"{section}.{key}-{side}")


@pytest.mark.parametrize("section, key, mark", list(_ranged_fields()))
def test_every_declared_range_is_enforced(section, key, mark):
    """Just outside each declared bound is rejected, from params.yaml and in Python alike."""
    step = 1 if typing.get_type_hints(SECTIONS[section])[key] is int else 0.5
    value = mark.value + (0 if not mark.inclusive else -step if mark.lower else step)  # just outside
    with pytest.raises(ValueError, match=rf"^`{section}\.{key}` must be "):
        parse_params({section: {key: value}})
    with pytest.raises(ValueError, match=rf"^`{section}\.{key}` must be "):
        SECTIONS[section](**{key: value})


def test_direct_construction_is_validated_and_converted():
    with pytest.raises(ValueError, match=r"`train.k` must be >= 1, got 0"):
        TrainConfig(k=0)
    with pytest.raises(ValueError, match=r"`train.k` must be <= `train.d_transcoder` \(8\), got 9"):
        TrainConfig(activation="topk", d_transcoder=8, k=9)
    with pytest.raises(ValueError, match=r"`pack.compresslevel` must be an integer, got 6.0"):
        PackConfig(compresslevel=6.0)
    with pytest.raises(ValueError, match=r"`corpus.context_len` must be >= 2, got 1"):
        dataclasses.replace(CorpusConfig(), context_len=1)
    assert TrainConfig(max_norm_ratio=100).max_norm_ratio == 100.0
    assert isinstance(TrainConfig(max_norm_ratio=100).max_norm_ratio, float)


def test_manifest_workflow_params():
    params = parse_params(
        {"paths": {"activations": "data/activations.json"}, "dump": {"store_url": "s3://bucket/acts.zarr"}}
    )
    assert params.dump.store_url == "s3://bucket/acts.zarr"
    assert parse_params({"paths": {"activations": "s3://bucket/acts.zarr"}}).dump.store_url is None


def test_yaml12_floats_are_numbers():
    """DVC writes `1e-3` (a float in YAML 1.2) that PyYAML reads as a string."""
    assert parse_params({"train": {"lr": "1e-3", "pre_act_coef": "3e-6"}}).train.lr == 1e-3


def test_params_file_roundtrip(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"dump": {"n_tokens": 256}}))
    assert load_params(path).dump.n_tokens == 256


@pytest.mark.parametrize("preset", sorted(__import__("glob").glob("presets/*.yaml")))
def test_preset_overrides_applied_by_dvc_give_the_preset(preset, tmp_path):
    """Each shipped preset's overrides, applied by DVC's own `-S` parser to a copy of
    `params.yaml`, give `params.yaml` with exactly the preset's keys changed."""
    from dvc.utils.hydra import apply_overrides

    target = tmp_path / "params.yaml"
    target.write_text(open("params.yaml").read())
    apply_overrides(target, preset_overrides(preset))
    with open("params.yaml") as f:
        expected = yaml.safe_load(f)
    with open(preset) as f:
        for name, keys in yaml.safe_load(f).items():
            expected[name].update(keys)
    assert load_params(target) == parse_params(expected)
    assert load_params(target) != load_params("params.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  d_transcodr: 8\n", "train.d_transcodr"),
        ("train:\n  n_steps: 0\n", "train.n_steps"),
        ("corpus:\n  path: two words\n", "whitespace"),
        ("train: 3\n", "maps sections"),
    ],
)
def test_bad_preset_is_refused(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ParamsError, match=message):
        preset_overrides(bad)
