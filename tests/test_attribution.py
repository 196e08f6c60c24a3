"""Attribution graphs checked against the frozen model itself: completeness and interventions."""

import pytest
import torch

from pipeline.attribution.attribute import attribute, select_logit_targets, tokenize_prompt
from pipeline.attribution.replacement import linearize
from pipeline.model import load_pretrained
from tests.tiny import ARCHS, make_transcoder

PROMPT = "The capital of France is"


def load(tiny_model_dir, arch):
    model, tokenizer = load_pretrained(str(tiny_model_dir(arch)), dtype=torch.float32)
    model.requires_grad_(False)
    return model, tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_model_computes_the_same_logits(tiny_model_dir, arch):
    model, tokenizer = load(tiny_model_dir, arch)
    ids = tokenize_prompt(tokenizer, PROMPT)
    with torch.no_grad():
        expected = model(input_ids=ids[None], use_cache=False).logits[0]
    run = linearize(model, ids)
    torch.testing.assert_close(run.logits, expected, rtol=1e-4, atol=1e-4)
    replay = linearize(model, ids, frozen=run.frozen)
    torch.testing.assert_close(replay.logits, expected, rtol=1e-4, atol=1e-4)


def target_values(graph, transcoder, run, vectors):
    """Feature pre-activations (without b_enc) of the selected features, then target logits."""
    feats = graph.active_features[graph.selected]
    pre = torch.stack(
        [run.mlp_in[l][0, p].detach().float() @ transcoder.W_enc[l][:, f] for l, p, f in feats.tolist()]
    )
    return torch.cat([pre, vectors @ run.final[0, -1].detach().float()])


def node_rows(graph):
    n_sel, n_logits = len(graph.selected), len(graph.logit_ids)
    return torch.cat(
        [torch.arange(n_sel), torch.arange(len(graph.adjacency) - n_logits, len(graph.adjacency))]
    )


def replay_without(model, ids, run, *, embed=None, mlp_out=None):
    return linearize(model, ids, frozen=run.frozen, embed=embed, mlp_out=mlp_out)


@pytest.fixture(
    params=[
        ("llama", "clt"),
        ("llama", "plt"),
        ("qwen2", "clt"),
        ("gpt2", "clt"),
        ("gemma2", "clt"),
        ("gemma3", "clt"),
    ]
)
def graph_case(request, tiny_model_dir):
    arch, kind = request.param
    model, tokenizer = load(tiny_model_dir, arch)
    transcoder = make_transcoder(kind=kind)
    graph = attribute(
        model, tokenizer, transcoder, PROMPT, max_n_logits=3, desired_logit_prob=0.99, batch_size=7
    )
    ids = graph.input_ids
    run = linearize(model, ids)
    _, _, vectors = select_logit_targets(
        run.logits[-1], model.get_output_embeddings().weight, max_n_logits=3, desired_logit_prob=0.99
    )
    return model, transcoder, graph, ids, run, vectors


def test_graph_has_features_errors_tokens_logits(graph_case):
    _, _, graph, ids, _, _ = graph_case
    n_nodes = len(graph.selected) + (graph.n_layers + 1) * len(ids) + len(graph.logit_ids)
    assert graph.adjacency.shape == (n_nodes, n_nodes)
    assert len(graph.selected) == len(graph.active_features) > 10
    assert (graph.active_features[:, 1] > 0).all()  # no features at BOS
    assert graph.adjacency.abs().sum() > 0


def test_completeness(graph_case):
    """Every target's incoming edges plus its bias terms add up to its value."""
    model, transcoder, graph, ids, run, vectors = graph_case
    values = target_values(graph, transcoder, run, vectors)
    # Bias terms: the frozen model with every source node removed: no token embeddings,
    # MLP outputs reduced to the decoder bias (BOS keeps its real MLP output: not a node).
    bias_out = []
    for l, out in enumerate(run.mlp_out):
        new = out.detach().clone()
        new[0, 1:] = transcoder.b_dec[l].detach()
        bias_out.append(new)
    bias = replay_without(model, ids, run, embed=torch.zeros_like(run.embed), mlp_out=bias_out)
    bias_values = target_values(graph, transcoder, bias, vectors)
    incoming = graph.adjacency[node_rows(graph)].sum(1)
    torch.testing.assert_close(incoming, values - bias_values, rtol=1e-4, atol=1e-4)


def test_interventions_change_targets_by_edge_weights(graph_case):
    """Removing a source node's output in the frozen model moves each target by -A[t, s]."""
    model, transcoder, graph, ids, run, vectors = graph_case
    values = target_values(graph, transcoder, run, vectors)
    rows = node_rows(graph)
    feats = graph.active_features[graph.selected]
    strongest = graph.adjacency[rows][:, : len(feats)].abs().sum(0).argsort(descending=True)[:3]
    for s in strongest.tolist():
        l_s, p_s, f_s = feats[s].tolist()
        a_s = graph.activations[graph.selected[s]]
        mlp_out = [out.detach().clone() for out in run.mlp_out]
        for j in range(transcoder.W_dec[l_s].shape[1]):
            target = l_s + j
            mlp_out[target][0, p_s] -= a_s * transcoder.W_dec[l_s][f_s, j].detach()
        ablated = target_values(graph, transcoder, replay_without(model, ids, run, mlp_out=mlp_out), vectors)
        torch.testing.assert_close(values - ablated, graph.adjacency[rows, s], rtol=1e-4, atol=1e-5)
    # an error node and a token node
    n_sel, n_pos = len(feats), len(ids)
    l_e, p_e = 1, len(ids) - 1
    mlp_out = [out.detach().clone() for out in run.mlp_out]
    acts = [transcoder.encode_layer(run.mlp_in[l][0].detach(), l) for l in range(graph.n_layers)]
    for a in acts:
        a[0] = 0
    error = run.mlp_out[l_e][0, p_e].detach() - transcoder.decode_layer(acts, l_e)[p_e]
    mlp_out[l_e][0, p_e] -= error
    ablated = target_values(graph, transcoder, replay_without(model, ids, run, mlp_out=mlp_out), vectors)
    torch.testing.assert_close(
        values - ablated, graph.adjacency[rows, n_sel + l_e * n_pos + p_e], rtol=1e-4, atol=1e-5
    )
    embed = run.embed.detach().clone()
    embed[0, 2] = 0
    clean_out = [out.detach() for out in run.mlp_out]  # MLP outputs are constants in the frozen model
    ablated = replay_without(model, ids, run, embed=embed, mlp_out=clean_out)
    ablated = target_values(graph, transcoder, ablated, vectors)
    token_col = n_sel + graph.n_layers * n_pos + 2
    torch.testing.assert_close(values - ablated, graph.adjacency[rows, token_col], rtol=1e-4, atol=1e-5)


def test_max_feature_nodes_keeps_the_most_influential(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir, "llama")
    transcoder = make_transcoder()
    full = attribute(model, tokenizer, transcoder, PROMPT, batch_size=5)
    part = attribute(model, tokenizer, transcoder, PROMPT, batch_size=5, max_feature_nodes=12)
    assert len(part.selected) == 12
    # rows computed for the same node agree between the two runs
    for k, s in enumerate(part.selected.tolist()):
        i = (full.selected == s).nonzero().item()
        n_other = len(part.adjacency) - len(part.selected)
        torch.testing.assert_close(part.adjacency[k, -n_other:], full.adjacency[i, -n_other:])
