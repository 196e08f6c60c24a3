"""Every params value is validated, generically over the dataclasses of `pipeline/config.py`:
a wrong type, an unknown key (a typo) or an out-of-range value is an error naming
`section.key`, what was found and what is allowed. (`test_dvc_workflow.py` checks that such
an error stops `dvc repro` before any work.)"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

import pytest
import yaml

from pipeline import config
from pipeline.config import Params, parse_params
from tests.dvc_repo import ROOT

SECTIONS: dict[str, type] = typing.get_type_hints(Params)
FIELDS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def field_type(section: str, key: str):
    return typing.get_type_hints(SECTIONS[section])[key]


def default(section: str, key: str):
    return getattr(SECTIONS[section](), key)


def wrong_type_value(tp):
    """A value of another type than `tp` that YAML could hold."""
    if typing.get_origin(tp) is typing.Literal:
        return 12345
    if tp in (int, float):
        return "many"
    if tp is bool:
        return "yes"
    if tp is str:
        return 3
    if typing.get_origin(tp) is list:
        return "not a list"
    return {"a": "mapping"}


def error(raw: dict) -> str:
    with pytest.raises(ValueError) as info:
        parse_params(raw)
    return str(info.value)


def test_params_yaml_matches_the_dataclasses():
    """params.yaml has every section and key of `Params`, and nothing else (it loads)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    parse_params(raw)
    assert {(s, k) for s, body in raw.items() for k in body} == set(FIELDS)


@pytest.mark.parametrize("section", SECTIONS)
def test_every_field_has_a_docstring(section):
    """STYLE.md: a docstring under every field (it is the params documentation)."""
    cls = SECTIONS[section]
    assert cls.__doc__, f"{cls.__name__} has no docstring"
    tree = ast.parse(inspect.getsource(config))
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    undocumented = []
    for stmt, after in zip(node.body, node.body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign):
            documented = isinstance(after, ast.Expr) and isinstance(
                getattr(after, "value", None), ast.Constant
            )
            if not documented:
                undocumented.append(stmt.target.id)
    assert not undocumented, f"fields of `{section}` without a docstring: {undocumented}"


@pytest.mark.parametrize("section, key", FIELDS)
def test_wrong_type_names_the_key(section, key):
    value = wrong_type_value(field_type(section, key))
    message = error({section: {key: value}})
    assert f"`{section}.{key}`" in message and repr(value) in message, message
    assert "must" in message, message  # what is allowed


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_names_it_and_the_known_keys(section):
    key = next(f.name for f in dataclasses.fields(SECTIONS[section]))
    typo = key + "s" if not key.endswith("s") else key[:-1]
    message = error({section: {typo: default(section, key)}})
    assert f"`{section}.{typo}` is not a known key" in message and key in message, message


def test_unknown_section_is_an_error():
    assert "`trian` is not a known section" in error({"trian": {"lr": 0.1}})


def out_of_range_candidates(tp, value) -> list:
    if tp is int:
        return [-1, 0, 10**12]
    if tp is float:
        return [-1.0, 0.0, 1.0, 1e12, float("nan"), float("inf")]
    if tp is str:
        return [""]
    return []


@pytest.mark.parametrize("section, key", FIELDS)
def test_out_of_range_names_the_key(section, key):
    """Where a field has limits, a value past them is an error naming the key and the value."""
    tp = field_type(section, key)
    for value in out_of_range_candidates(tp, default(section, key)):
        try:
            parse_params({section: {key: value}})
        except ValueError as e:
            message = str(e)
            assert f"`{section}.{key}`" in message and "must" in message, message
            assert "got" in message and (repr(value) in message or str(value) in message), message
        else:
            assert value != "", f"`{section}.{key}` accepts an empty string"
            assert value == value, f"`{section}.{key}` accepts NaN"  # NaN != NaN


def test_number_written_as_yaml_1_2_float_is_accepted():
    """`1e-3` is a float to DVC (YAML 1.2, as `dvc exp run -S train.lr=1e-3` writes it) but a
    string to PyYAML; both must read it as the same number."""
    raw = yaml.safe_load("train:\n  lr: 1e-3\n")
    assert raw["train"]["lr"] == "1e-3"
    assert parse_params(raw).train.lr == 1e-3
    assert "`train.lr` must be a number, got 'fast'" in error({"train": {"lr": "fast"}})
