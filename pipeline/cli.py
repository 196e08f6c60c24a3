"""`clt`: the command line of the pipeline.

Stage commands run one stage directly (outside DVC, same code as `python -m stages.X`);
`clt repro` runs the whole pipeline through DVC, which skips stages whose inputs have
not changed. Utility commands inspect artifacts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click

from pipeline import setup_logging
from pipeline.config import load_params

PARAMS_HELP = "params.yaml to read (default: ./params.yaml)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Circuit tracing with cross-layer transcoders.

    Pipeline stages (run in order by `dvc repro`): model, dump, train, evaluate.
    """
    setup_logging()


@main.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def model(params_path: str) -> None:
    """Stage 0: resolve `model.name` and save it as a plain Hugging Face folder."""
    from pipeline.model import materialize

    params = load_params(params_path)
    materialize(params.model.name, params.paths.model_dir)


@main.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def dump(params_path: str) -> None:
    """Stage 1: store every layer's MLP input and output on the corpus (Zarr, resumable)."""
    from pipeline.dump import run

    _run_stage(run, params_path)


@main.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def train(params_path: str) -> None:
    """Stage 2: train the transcoder on the stored activations and export it (resumable)."""
    from pipeline.train import run

    _run_stage(run, params_path)


@main.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def evaluate(params_path: str) -> None:
    """Stage 3: splice the transcoder into the model; CE, KL and top-1 on held-out text."""
    from pipeline.evaluate import run

    _run_stage(run, params_path)


@main.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def graphs(params_path: str) -> None:
    """Stage 6: an attribution graph (circuit-tracer JSON + PNG) for every prompt file in
    `paths.prompts`; only new or changed prompts are computed. Browse them with
    `circuit-tracer start-server --graph_file_dir data/graphs` (see README)."""
    from pipeline.graphs import run

    _run_stage(run, params_path)


def _run_stage(run, params_path: str) -> None:
    from pipeline.stage import run_stage

    run_stage(run, params_path)


@main.command()
@click.option("--prompt", required=True, help="Text to continue (BOS is prepended).")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def generate(prompt: str, max_new_tokens: int, params_path: str) -> None:
    """Greedy continuations of a prompt by the original model and the replacement model
    (every MLP output replaced by the transcoder's reconstruction)."""
    from pipeline.evaluate import generate, load_for_splicing
    from pipeline.model import configure_torch

    params = load_params(params_path)
    configure_torch(params.runtime.num_threads)
    model, tokenizer, transcoder = load_for_splicing(params)
    out = generate(model, tokenizer, transcoder, prompt, max_new_tokens=max_new_tokens)
    click.echo(f"prompt:      {prompt}")
    click.echo(f"original:    {out['original']}")
    click.echo(f"replacement: {out['replacement']}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def repro(dvc_args: tuple[str, ...]) -> None:
    """Run the pipeline with `dvc repro` (extra arguments go to DVC, e.g. a stage name)."""
    sys.exit(subprocess.call(["dvc", "repro", *dvc_args]))


@main.command()
@click.argument("store_path", default=None, required=False)
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def info(store_path: str | None, params_path: str) -> None:
    """Describe an activation store (default: `paths.activations`)."""
    from pipeline.store import ActivationStore

    if store_path is None:
        store_path = load_params(params_path).paths.activations
    store = ActivationStore(store_path)
    click.echo(json.dumps(store.group.attrs.asdict(), indent=2))


if __name__ == "__main__":
    main()
