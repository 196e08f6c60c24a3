"""Run circuit-tracer's own CLT loader and encoder on saved inputs (run with .ct-venv's python).

    .ct-venv/bin/python ct/encode.py TRANSCODER_DIR INPUTS.pt OUTPUTS.pt

INPUTS.pt holds `x` (n_layers, n_pos, d_model) float32 MLP inputs. OUTPUTS.pt gets `acts`
(n_layers, n_pos, d_transcoder) from `CrossLayerTranscoder.encode` (or, for a transcoder
set, each layer's `encode`) and `recon` (n_layers, n_pos, d_model) from its decoder.
"""

import sys

import torch


def main() -> None:
    folder, inputs, outputs = sys.argv[1:4]
    x = torch.load(inputs, weights_only=True)["x"]
    import yaml

    with open(f"{folder}/config.yaml") as f:
        kind = yaml.safe_load(f)["model_kind"]
    if kind == "cross_layer_transcoder":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        clt = load_clt(folder, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
        with torch.no_grad():
            acts = clt.encode(x)
            recon = clt.decode(acts.to_sparse())
    else:
        from pathlib import Path

        from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

        paths = {int(p.stem.split("_")[1]): str(p) for p in Path(folder).glob("layer_*.safetensors")}
        tset = load_transcoder_set(
            paths,
            scan=folder,
            feature_input_hook="hook_resid_mid",
            feature_output_hook="hook_mlp_out",
            device=torch.device("cpu"),
            dtype=torch.float32,
            lazy_encoder=False,
            lazy_decoder=False,
        )
        with torch.no_grad():
            acts = tset.encode(x)
            recon = tset.decode(acts, x)
    torch.save({"acts": acts, "recon": recon}, outputs)


if __name__ == "__main__":
    main()
