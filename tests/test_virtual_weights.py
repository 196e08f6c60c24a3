import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline.clt import CLTShape, CrossLayerTranscoder, export_transcoder
from pipeline.virtual_weights import all_partners, feature_partners, write_partners

L, D, F = 4, 8, 6


def tiny_transcoder(kind: str) -> CrossLayerTranscoder:
    model = CrossLayerTranscoder(CLTShape(n_layers=L, d_model=D, d_transcoder=F, kind=kind))
    with torch.no_grad():
        model.b_dec.normal_()  # a decoder bias must not leak into the weights
    return model


def naive_virtual_weights(transcoder: CrossLayerTranscoder) -> torch.Tensor:
    """V (L*F sources, L*F targets) from the transcoder's own `decode` of one-hot activations:
    the residual stream layer m's encoder reads is the sum of MLP outputs k < m; NaN where
    m <= l (no path)."""
    with torch.no_grad():
        acts = torch.zeros(L, L * F, F)
        for l in range(L):
            acts[l, l * F : (l + 1) * F] = torch.eye(F)
        out = (transcoder.decode(acts) - transcoder.b_dec).double()  # (L*F, L, d_model)
        resid = out.cumsum(1)  # resid[:, k]: MLP outputs 0..k
        V = torch.full((L * F, L * F), float("nan"), dtype=torch.float64)
        for m in range(1, L):
            V[: m * F, m * F : (m + 1) * F] = resid[: m * F, m - 1] @ transcoder.W_enc[m].double()
    return V


def naive_top(row: torch.Tensor, k: int):
    valid = torch.nonzero(~row.isnan()).flatten()
    top = valid[row[valid].abs().topk(min(k, len(valid))).indices]
    return top, row[top]


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_feature_partners_match_the_dense_virtual_weights(kind):
    transcoder = tiny_transcoder(kind)
    V = naive_virtual_weights(transcoder)
    for layer in range(L):
        for f in range(F):
            got = feature_partners(transcoder, layer, f, top=5)
            g = layer * F + f
            for direction, row in (("upstream", V[:, g]), ("downstream", V[g])):
                ids, weights = naive_top(row, 5)
                p = got[direction]
                assert (p.layers * F + p.features).tolist() == ids.tolist(), (direction, layer, f)
                torch.testing.assert_close(p.weights.double(), weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("block_size", [4, 1024])
def test_streamed_all_writes_the_dense_top_k(tmp_path, kind, block_size):
    transcoder = tiny_transcoder(kind)
    V = naive_virtual_weights(transcoder)
    path = write_partners(transcoder, tmp_path / "vw.parquet", top=7, block_size=block_size, progress=False)
    rows = pq.read_table(path).to_pylist()
    expected = []
    for g in range(L * F):
        for direction, row in (("upstream", V[:, g]), ("downstream", V[g])):
            ids, weights = naive_top(row, 7)
            for rank, (i, w) in enumerate(zip(ids.tolist(), weights.tolist())):
                expected.append((g // F, g % F, direction, rank, i // F, i % F, w))
    assert [tuple(r.values())[:6] for r in rows] == [e[:6] for e in expected]
    torch.testing.assert_close(
        torch.tensor([r["weight"] for r in rows], dtype=torch.float64),
        torch.tensor([e[6] for e in expected], dtype=torch.float64),
        rtol=1e-5,
        atol=1e-6,
    )


def test_block_size_does_not_change_the_partners():
    transcoder = tiny_transcoder("clt")
    a = all_partners(transcoder, top=3, block_size=1, progress=False)
    b = all_partners(transcoder, top=3, block_size=F, progress=False)
    for direction in a:
        for (wa, ia), (wb, ib) in zip(a[direction], b[direction]):
            assert torch.equal(ia, ib)
            torch.testing.assert_close(wa, wb)


def test_bad_feature_is_a_clear_error():
    with pytest.raises(ValueError, match="no layer 4 feature 0: the transcoder has layers 0..3"):
        feature_partners(tiny_transcoder("clt"), 4, 0)


def test_cli_prints_partners_and_writes_all(tmp_path):
    from pipeline.cli import main

    folder = export_transcoder(tiny_transcoder("clt"), tmp_path / "transcoder", model_name="tiny")
    params = tmp_path / "params.yaml"
    params.write_text(f"paths:\n  transcoder: {folder}\n  features: {tmp_path / 'none'}\n")
    result = CliRunner().invoke(main, ["virtual-weights", "1", "2", "--top", "3", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "layer 1 feature 2" in result.output
    assert result.output.count(" 0:") == 3  # upstream: layer 0's features
    out = tmp_path / "all.parquet"
    args = ["virtual-weights", "--all", "--out", str(out), "--top", "2", "--params", str(params)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == 2 * (L - 1) * F * 2  # layer 0 has no upstream, L-1 no downstream
    result = CliRunner().invoke(main, ["virtual-weights", "--params", str(params)])
    assert result.exit_code == 2 and "LAYER INDEX" in result.output
