"""Interventions (`pipeline/intervene.py`) against naive layer-by-layer re-runs of the model,
the graph's predicted ablation effects against the frozen model, `clt intervene`, and the
`graphs` stage's intervention scores."""

import json
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

import pipeline.graphs
from pipeline.attribution.attribute import attribute, select_logit_targets, tokenize_prompt
from pipeline.attribution.replacement import linearize
from pipeline.cli import main as cli
from pipeline.clt import export_transcoder
from pipeline.config import parse_params
from pipeline.intervene import (
    Intervention,
    SpecError,
    check_graph,
    check_interventions,
    intervene,
    parse_intervention,
    predicted_ablation_effects,
    target_weights,
)
from pipeline.model import get_architecture, get_layers, load_pretrained
from tests.tiny import ARCHS, make_transcoder

PROMPT = "The capital of France is"


def load(tiny_model_dir, arch="llama"):
    model, tokenizer = load_pretrained(str(tiny_model_dir(arch)), dtype=torch.float32)
    model.requires_grad_(False)
    return model, tokenizer


@torch.no_grad()
def record_run(model, ids, mlp_out=None):
    """The real model on `ids`, each MLP output replaced by `mlp_out[l]` (n_pos, d_model)
    when given: (MLP inputs, MLP outputs, last position's unembedding input, logits)."""
    arch, blocks = get_architecture(model), get_layers(model)
    mlp_in, outs, final = {}, {}, {}

    def pre(module, args, kwargs, layer):
        mlp_in[layer] = (args[0] if args else kwargs["hidden_states"])[0].float()

    def post(module, args, output, layer):
        new = output if mlp_out is None else mlp_out[layer][None].to(output.dtype)
        outs[layer] = new[0].float()
        return new

    handles = [model.get_output_embeddings().register_forward_pre_hook(lambda m, a: final.update(x=a[0]))]
    for l, block in enumerate(blocks):
        handles.append(
            block.get_submodule(arch.mlp_input).register_forward_pre_hook(
                lambda m, a, k, l=l: pre(m, a, k, l), with_kwargs=True
            )
        )
        handles.append(
            block.get_submodule(arch.mlp_output).register_forward_hook(lambda m, a, o, l=l: post(m, a, o, l))
        )
    try:
        logits = model(input_ids=ids[None], use_cache=False).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    n = len(blocks)
    return [mlp_in[l] for l in range(n)], [outs[l] for l in range(n)], final["x"][0, -1].float(), logits


@torch.no_grad()
def naive_intervention(model, transcoder, ids, interventions):
    """Step 2 the slow way: whole-model re-runs, each fixing one more layer, layers from
    the first intervened one spliced (features recomputed, errors of the clean run)."""
    n_layers = transcoder.shape.n_layers
    first = min(iv.layer for iv in interventions)
    clean_in, clean_out, _, _ = record_run(model, ids)
    clean_acts = [transcoder.encode_layer(clean_in[l], l) for l in range(n_layers)]
    errors = [clean_out[l] - transcoder.decode_layer(clean_acts, l) for l in range(n_layers)]
    mlp_in = clean_in
    for _ in range(n_layers + 1):
        acts = []
        for l in range(n_layers):
            a = transcoder.encode_layer(mlp_in[l], l)
            for iv in interventions:
                if iv.layer == l:
                    pos = slice(1, None) if iv.position is None else iv.position
                    a[pos, iv.feature] = a[pos, iv.feature] * iv.value if iv.scale else iv.value
            acts.append(a)
        mlp_out = [
            clean_out[l] if l < first else transcoder.decode_layer(acts, l) + errors[l]
            for l in range(n_layers)
        ]
        mlp_in, _, final, logits = record_run(model, ids, mlp_out)
    return final, logits


@torch.no_grad()
def clean_acts(model, transcoder, ids, layer):
    """(n_pos, d_tc) the features of `layer` on the clean run."""
    return transcoder.encode_layer(record_run(model, ids)[0][layer], layer)


def active_features(model, transcoder, ids, layer, k=3):
    """`k` (position, feature) pairs active at `layer` on the clean run, largest first."""
    a = clean_acts(model, transcoder, ids, layer)
    a[0] = 0
    top = a.flatten().topk(k).indices
    return [(int(i) // a.shape[1], int(i) % a.shape[1]) for i in top]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_no_intervention_reproduces_the_model(tiny_model_dir, arch, kind):
    model, tokenizer = load(tiny_model_dir, arch)
    transcoder = make_transcoder(kind=kind)
    ids = tokenize_prompt(tokenizer, PROMPT)
    _, _, final, expected = record_run(model, ids)
    # x1 at layer 0 splices every layer; clamping a feature to its own value changes nothing
    (p, f), *_ = active_features(model, transcoder, ids, 1)
    value = float(clean_acts(model, transcoder, ids, 1)[p, f])
    batch = [[], [Intervention(0, 5, None, 1.0, scale=True)], [Intervention(1, f, p, value)]]
    result = intervene(model, transcoder, ids, batch)
    torch.testing.assert_close(result.clean_logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.logits, expected.expand(3, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.final, final.expand(3, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "arch, kind", [("llama", "clt"), ("llama", "plt"), ("gemma2", "clt"), ("gpt2", "clt")]
)
def test_interventions_match_naive_reruns(tiny_model_dir, arch, kind):
    model, tokenizer = load(tiny_model_dir, arch)
    transcoder = make_transcoder(kind=kind)
    ids = tokenize_prompt(tokenizer, PROMPT)
    (p0, f0), (p1, f1), _ = active_features(model, transcoder, ids, 0)
    (p2, f2), *_ = active_features(model, transcoder, ids, 1)
    batch = [
        [Intervention(0, f0, p0, 0.0)],  # ablate
        [Intervention(1, f2, p2, 3.0), Intervention(0, f1, p1, 0.0)],  # clamp two
        [Intervention(1, f2, None, 2.0, scale=True)],  # scale at every position
        [Intervention(2, 7, len(ids) - 1, 5.0)],  # last layer only
    ]
    result = intervene(model, transcoder, ids, batch, batch_size=3)  # two forward passes
    for b, interventions in enumerate(batch):
        final, logits = naive_intervention(model, transcoder, ids, interventions)
        torch.testing.assert_close(result.final[b], final, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.logits[b], logits, rtol=1e-4, atol=1e-5)
    assert (result.logits - result.clean_logits).abs().amax(1).min() > 1e-3  # every set changes the logits


def frozen_ablation(model, transcoder, graph, run, s):
    """The target's change when selected feature `s` is ablated in the graph's own model:
    attention patterns and norm scales frozen (`linearize` replays), errors fixed, every
    other selected feature's activation moving with its pre-activation, the rest fixed."""
    feats = graph.active_features[graph.selected].tolist()
    acts = graph.activations[graph.selected]
    new = acts.clone()
    new[s] = 0
    clean_in = [x[0].detach() for x in run.mlp_in]
    clean_out = [out[0].detach() for out in run.mlp_out]
    for _ in range(graph.n_layers + 1):  # each pass fixes one more layer
        mlp_out = [out.clone() for out in clean_out]
        for i, (l, p, f) in enumerate(feats):
            W = transcoder.W_dec[l].detach()
            for j in range(W.shape[1]):
                mlp_out[l + j][p] += (new[i] - acts[i]) * W[f, j]
        replay = linearize(model, graph.input_ids, frozen=run.frozen, mlp_out=[out[None] for out in mlp_out])
        for i, (l, p, f) in enumerate(feats):
            if i != s:
                moved = replay.mlp_in[l][0, p].detach() - clean_in[l][p]
                new[i] = acts[i] + moved @ transcoder.W_enc[l][:, f].detach()
    _, _, vectors = select_logit_targets(
        run.logits[-1],
        model.get_output_embeddings().weight,
        max_n_logits=10,
        desired_logit_prob=1.0,
        token_ids=graph.logit_ids.tolist(),
    )
    change = replay.final[0, -1].detach() - run.final[0, -1].detach()
    return float(vectors @ change @ target_weights(graph))


@pytest.mark.parametrize(
    "arch, kind, max_feature_nodes",
    [("llama", "clt", None), ("llama", "plt", None), ("gemma2", "clt", None), ("llama", "clt", 15)],
)
def test_predicted_effects_equal_the_frozen_model(tiny_model_dir, arch, kind, max_feature_nodes):
    """-[w A_tf (I - D^-1 A_ff)^-1]_s is the frozen, linear model's response to ablating s,
    paths through other features included (the graph's unselected features held fixed)."""
    model, tokenizer = load(tiny_model_dir, arch)
    transcoder = make_transcoder(kind=kind)
    graph = attribute(
        model,
        tokenizer,
        transcoder,
        PROMPT,
        max_n_logits=3,
        desired_logit_prob=0.99,
        batch_size=8,
        max_feature_nodes=max_feature_nodes,
    )
    run = linearize(model, graph.input_ids)
    predicted = predicted_ablation_effects(graph)
    n_layers, n_features = graph.n_layers, len(graph.selected)
    direct = -(target_weights(graph) @ graph.adjacency[-len(graph.logit_ids) :, :n_features]).double()
    early = graph.active_features[graph.selected][:, 0] < n_layers - 1
    assert (predicted[early] - direct[early]).abs().max() > 1e-3  # indirect paths count
    for s in predicted.abs().argsort(descending=True)[:6].tolist():
        measured = frozen_ablation(model, transcoder, graph, run, s)
        assert measured == pytest.approx(float(predicted[s]), rel=1e-4, abs=1e-5)


def test_check_graph_scores(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    transcoder = make_transcoder()
    graph = attribute(model, tokenizer, transcoder, PROMPT, max_n_logits=3, desired_logit_prob=0.99)
    scores = check_graph(model, transcoder, graph, n_features=12, batch_size=5)
    assert set(scores) == {"intervention_pearson", "intervention_sign_agreement"}
    assert 0.5 < scores["intervention_pearson"] <= 1
    assert 0.5 < scores["intervention_sign_agreement"] <= 1


# --- specs and `clt intervene` -------------------------------------------------------------


def test_parse_interventions():
    assert parse_intervention("12:345@-1=0") == Intervention(12, 345, -1, 0.0)
    assert parse_intervention("3:7=x2.5") == Intervention(3, 7, None, 2.5, scale=True)
    assert parse_intervention("3:7@2=-1e1") == Intervention(3, 7, 2, -10.0)
    transcoder = make_transcoder()  # 3 layers, 24 features
    assert check_interventions([parse_intervention("1:2@-1=0")], transcoder, 6)[0].position == 5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1-2=0", r"'1-2=0' is not of the form LAYER:FEATURE\[@POS\]=VALUE"),
        ("1:2=", "is not of the form"),
        ("1:2=nan", "is not of the form"),
        ("1:2@x=0", "is not of the form"),
        ("3:2=0", r"layer 3 is out of range; use a layer in 0\.\.2"),
        ("1:24=0", r"feature 24 is out of range; layers have features 0\.\.23"),
        (
            "1:2@6=0",
            r"position 6 is beyond the prompt, which has 6 tokens.*use a position in 1\.\.5 or -1\.\.-5",
        ),
        ("1:2@-7=0", "position -7 is beyond the prompt"),
        ("1:2@0=0", "position 0 is BOS"),
        ("1:2@-6=0", "position -6 is BOS"),
    ],
)
def test_bad_specs_name_the_spec_and_the_fix(spec, message):
    with pytest.raises(SpecError, match=message):
        check_interventions([parse_intervention(spec)], make_transcoder(), 6)


@pytest.fixture(scope="module")
def cli_params(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("intervene-cli")
    export_transcoder(make_transcoder(), root / "tc", model_name="tiny")
    params = {
        "paths": {"model_dir": str(tiny_model_dir("llama")), "transcoder": str(root / "tc")},
        "model": {"dtype": "float32"},
        "runtime": {"device": "cpu"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return str(root / "params.yaml")


def test_cli_prints_top_tokens_and_continuations(cli_params):
    args = [
        "intervene",
        "--prompt",
        PROMPT,
        "--feature",
        "0:3=0",
        "--feature",
        "1:5@-1=x2",
        "--params",
        cli_params,
    ]
    result = CliRunner().invoke(cli, [*args, "--top", "3", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1] == "intervention: layer 0 feature 3 set to 0 at every position"
    assert lines[2] == "intervention: layer 1 feature 5 scaled by 2 at position 5"
    assert lines[3].split() == ["before", "after"]
    assert [line.split()[0] for line in lines[4:7]] == ["1", "2", "3"]
    assert lines[7].startswith("continuation before: ") and lines[8].startswith("continuation after:  ")


@pytest.mark.parametrize(
    "feature, message",
    [
        ("0:3", "'0:3' is not of the form"),
        ("7:3=0", r"'7:3=0': layer 7 is out of range; use a layer in 0\.\.2"),
        ("0:99=0", "feature 99 is out of range"),
        ("0:3@40=0", "position 40 is beyond the prompt"),
    ],
)
def test_cli_bad_spec_is_one_error_line(cli_params, feature, message, monkeypatch):
    monkeypatch.delenv("CLT_DEBUG", raising=False)
    args = ["intervene", "--prompt", PROMPT, "--feature", feature, "--params", cli_params]
    result = CliRunner().invoke(cli, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "'--feature'" in errors[0] and re.search(message, errors[0]), errors[0]


# --- the graphs stage ------------------------------------------------------------------------


def test_stage_writes_and_caches_intervention_scores(tmp_path, tiny_model_dir, monkeypatch):
    export_transcoder(make_transcoder(), tmp_path / "tc", model_name="tiny")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "france.txt").write_text(PROMPT + "\n")
    (prompts / "count.txt").write_text("One two three four\n")

    def params(**graphs):
        paths = {
            "model_dir": str(tiny_model_dir("llama")),
            "transcoder": str(tmp_path / "tc"),
            "prompts": str(prompts),
            "graphs": str(tmp_path / "graphs"),
            "features": str(tmp_path / "features"),
            "metrics": str(tmp_path / "metrics"),
        }
        graphs = {"max_feature_nodes": 40, "batch_size": 16, "png": False, **graphs}
        return parse_params({"paths": paths, "graphs": graphs, "runtime": {"device": "cpu"}})

    keys = {"intervention_pearson", "intervention_sign_agreement"}
    assert pipeline.graphs.run(params(), progress=False) == {"count": "computed", "france": "computed"}
    metrics = json.loads((tmp_path / "metrics" / "graphs.json").read_text())
    assert keys <= set(metrics["mean"]) and all(keys <= set(s) for s in metrics["per_prompt"].values())
    france = json.loads((tmp_path / "graphs" / "france.json").read_text())["metadata"]["scores"]
    assert keys <= set(france) and -1 <= france["intervention_pearson"] <= 1

    def no_rerun(*args, **kwargs):
        raise AssertionError("a re-prune re-ran the interventions")

    monkeypatch.setattr(pipeline.graphs, "check_graph", no_rerun)
    status = pipeline.graphs.run(params(node_threshold=0.5), progress=False)
    assert status == {"count": "pruned", "france": "pruned"}
    again = json.loads((tmp_path / "graphs" / "france.json").read_text())["metadata"]["scores"]
    assert {k: again[k] for k in keys} == {k: france[k] for k in keys}
