"""Our exported transcoders, loaded by circuit-tracer itself, give our feature activations.

Needs circuit-tracer's separate venv (`bash ct/venv.sh`, or CT_PYTHON pointing at a
python that has circuit-tracer 0.5.0); skipped when it is not there.
"""

import subprocess

import pytest
import torch

from pipeline.clt import export_transcoder, load_transcoder
from tests.ct import CT_DIR, CT_PYTHON, CT_SKIP_REASON
from tests.test_clt import make

pytestmark = pytest.mark.skipif(not CT_PYTHON.exists(), reason=CT_SKIP_REASON)


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_circuit_tracer_loads_our_export_and_agrees(tmp_path, kind):
    model = make(kind)
    folder = export_transcoder(model, tmp_path / "tc", model_name="tiny")
    x = torch.randn(4, 6, 16) * 3  # (n_layers, n_pos, d_model), raw space
    torch.save({"x": x}, tmp_path / "in.pt")
    subprocess.run(
        [
            str(CT_PYTHON),
            str(CT_DIR / "encode.py"),
            str(folder),
            str(tmp_path / "in.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    ours = load_transcoder(folder)
    with torch.no_grad():
        _, acts, recon = ours(x.transpose(0, 1))  # ours takes (n_tokens, n_layers, d_model)
        # the same through the un-exported model, in its normalised space
        _, acts_trained, _ = model(x.transpose(0, 1) * model.input_scale[None, :, None])
    torch.testing.assert_close(theirs["acts"], acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs["acts"], acts_trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs["recon"], recon.transpose(0, 1), rtol=1e-4, atol=1e-4)
