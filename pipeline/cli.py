"""`clt`: the command line of the pipeline.

Stage commands run one stage directly (outside DVC, same code as `python -m stages.X`);
`clt repro` runs the whole pipeline through DVC, which skips stages whose inputs have
not changed. Utility commands inspect artifacts.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys

import click

from pipeline.config import load_params
from pipeline.runtime import DEBUG_ENV, configure_torch, debug_enabled, report_error, setup_logging

PARAMS_HELP = "params.yaml to read (default: ./params.yaml)."


class _Commands(click.Group):
    """Shows an error of a command as one `Error:` line (`report_error`); the traceback
    only with `clt --debug` or `CLT_DEBUG=1`."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if debug_enabled():
                raise
            ctx.exit(report_error(e))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help=f"Show the traceback of an error (same as {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
    """Circuit tracing with cross-layer transcoders.

    Pipeline stages (run in order by `dvc repro`): model, dump, train, evaluate, examples,
    pack, graphs, plots.
    """
    if debug:
        os.environ[DEBUG_ENV] = "1"
    setup_logging()


STAGES = {
    "model": ("pipeline.model", "Stage 0: resolve `model.name` and save it as a plain Hugging Face folder."),
    "dump": (
        "pipeline.dump",
        "Stage 1: store every layer's MLP input and output on the corpus (Zarr, resumable).",
    ),
    "train": (
        "pipeline.train",
        "Stage 2: train the transcoder on the stored activations and export it (resumable).",
    ),
    "evaluate": (
        "pipeline.evaluate",
        "Stage 3: splice the transcoder into the model; CE, KL and top-1 on held-out text.",
    ),
    "examples": (
        "pipeline.examples",
        "Stage 4: every feature's top contexts, interval and random samples, histogram, "
        "quantiles, frequency and logit lens, from the stored activations, to Parquet.",
    ),
    "pack": (
        "pipeline.featpack",
        "Stage 5: the examples in circuit-tracer's packed feature format, for the graph frontend.",
    ),
    "graphs": (
        "pipeline.graphs",
        "Stage 6: an attribution graph (circuit-tracer JSON + PNG) for every prompt file in "
        "`paths.prompts`; only new or changed prompts are computed. Browse them with "
        "`circuit-tracer start-server --graph_file_dir data/graphs` (see README).",
    ),
    "plots": (
        "pipeline.plots",
        "Stage 7: pictures of the dictionary (decoder spread over layers, feature density, "
        "per-layer NMSE / L0 / KL, a map of decoder directions) as PNGs and CSVs.",
    ),
}
"""Stage command: (module whose `run(params)` it calls, help). Same code as `python -m stages.X`."""


def _stage_command(name: str, module: str, help_text: str) -> click.Command:
    @click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
    def command(params_path: str) -> None:
        run = importlib.import_module(module).run
        params = load_params(params_path)
        configure_torch(params.runtime.num_threads)
        run(params)

    return click.command(name, help=help_text)(command)


for _name, (_module, _help) in STAGES.items():
    main.add_command(_stage_command(_name, _module, _help))


@main.command()
@click.option("--prompt", required=True, help="Text to continue (BOS is prepended).")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def generate(prompt: str, max_new_tokens: int, params_path: str) -> None:
    """Greedy continuations of a prompt by the original model and the replacement model
    (every MLP output replaced by the transcoder's reconstruction)."""
    from pipeline.splice import generate, load_for_splicing

    params = load_params(params_path)
    configure_torch(params.runtime.num_threads)
    model, tokenizer, transcoder = load_for_splicing(params)
    out = generate(model, tokenizer, transcoder, prompt, max_new_tokens=max_new_tokens)
    click.echo(f"prompt:      {prompt}")
    click.echo(f"original:    {out['original']}")
    click.echo(f"replacement: {out['replacement']}")


@main.command()
@click.option("--prompt", required=True, help="Text to run the model on (BOS is prepended).")
@click.option(
    "--feature",
    "specs",
    multiple=True,
    required=True,
    metavar="L:F[@POS]=VALUE",
    help="Set feature F of layer L to VALUE (0 ablates; xK scales it by K) at position POS (negative: "
    "from the end; default: every position after BOS). Repeatable.",
)
@click.option(
    "--top", "top_k", default=5, show_default=True, type=click.IntRange(min=1), help="Tokens shown."
)
@click.option("--max-new-tokens", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def intervene(prompt: str, specs: tuple[str, ...], top_k: int, max_new_tokens: int, params_path: str) -> None:
    """Intervene on transcoder features in the real model: the top next tokens and a greedy
    continuation, before and after. Layers from the first intervened one on are spliced
    (features recomputed from the new MLP inputs, reconstruction errors held at their clean
    values), so without an intervention the model is unchanged (`pipeline/intervene.py`)."""
    from pipeline.intervene import SpecError, compare, parse_intervention
    from pipeline.splice import load_for_splicing

    try:
        for spec in specs:
            parse_intervention(spec)
        params = load_params(params_path)
        configure_torch(params.runtime.num_threads)
        model, tokenizer, transcoder = load_for_splicing(params)
        out = compare(model, tokenizer, transcoder, prompt, specs, top_k=top_k, max_new_tokens=max_new_tokens)
    except SpecError as e:
        raise click.BadParameter(str(e), param_hint="'--feature'") from None

    def quoted(token: str) -> str:
        return "'" + token.replace("\n", "\\n") + "'"

    tokens = out["prompt_tokens"]
    click.echo(f"prompt: {quoted('|'.join(tokens))} ({len(tokens)} tokens, BOS at position 0)")
    for iv in out["interventions"]:
        click.echo(f"intervention: {iv.describe()}")
    width = max(len(quoted(t)) for name in ("before", "after") for t, _ in out[f"top_{name}"]) + 2
    click.secho(f"{'':4}{'before':<{width + 7}}after", bold=True)
    for i, ((t0, p0), (t1, p1)) in enumerate(zip(out["top_before"], out["top_after"]), start=1):
        click.echo(f"{i:>2}  {quoted(t0):<{width}}{p0:.3f}  {quoted(t1):<{width}}{p1:.3f}")
    click.echo(f"continuation before: {out['continuation_before']!r}")
    click.echo(f"continuation after:  {out['continuation_after']!r}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def repro(dvc_args: tuple[str, ...]) -> None:
    """Run the pipeline with `dvc repro` (extra arguments go to DVC, e.g. a stage name)."""
    sys.exit(subprocess.call(["dvc", "repro", *dvc_args]))


@main.command("export-corpus")
@click.argument("source")
@click.argument("out")
@click.option(
    "--n-tokens",
    required=True,
    type=click.IntRange(min=1),
    help="Tokens to export (by the model's tokenizer).",
)
@click.option(
    "--text-field", default=None, help="Column or JSON key of the text (default: corpus.text_field)."
)
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def export_corpus(source: str, out: str, n_tokens: int, text_field: str | None, params_path: str) -> None:
    """Copy the first documents of SOURCE (a file, a folder or `hf:<dataset>[:split]`) to
    OUT (.jsonl.gz) until they hold N tokens, for a `corpus.path` DVC can track (it cannot
    track an `hf:` dataset). Tokens are counted by the tokenizer in `paths.model_dir`
    (`dvc repro model` first); for the store of `dump.n_tokens` tokens, export a few
    percent more:

        clt export-corpus hf:HuggingFaceFW/fineweb-edu data/corpus/fineweb-edu.jsonl.gz --n-tokens 1100000
    """
    from pipeline.corpus import export_documents

    params = load_params(params_path)
    tokenizer = _load_tokenizer(params.paths.model_dir)
    field = text_field or params.corpus.text_field
    export_documents(source, out, tokenizer, n_tokens=n_tokens, text_field=field)


@main.command()
@click.argument("preset_path", metavar="PRESET")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def preset(preset_path: str, params_path: str) -> None:
    """Print a preset's keys (a YAML file of the `params.yaml` keys it changes, such as
    `presets/gpu.yaml`) as `dvc exp run` overrides, after checking them:

        dvc exp run $(clt preset presets/gpu.yaml)
    """
    from pipeline.config import preset_overrides

    click.echo(" ".join(f"-S {o}" for o in preset_overrides(preset_path, params_path)))


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


def _load_tokenizer(model_dir: str):
    from pathlib import Path

    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"no model at {model_dir} (`paths.model_dir`); run `dvc repro model` first")

    return AutoTokenizer.from_pretrained(model_dir)


@main.command()
@click.argument("layer", type=int)
@click.argument("index", type=int)
@click.option("-n", "--n-examples", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--all-groups", is_flag=True, help="Also the interval and random samples, not only the top.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def feature(layer: int, index: int, n_examples: int, all_groups: bool, params_path: str) -> None:
    """Print feature INDEX of layer LAYER: statistics, logit lens and top examples, the
    token where it fires most in each example highlighted (from `paths.examples`)."""
    from pipeline.examples import read_feature
    from pipeline.featpack import token_strings

    params = load_params(params_path)
    stats, rows = read_feature(params.paths.examples, layer, index)
    tokenizer = _load_tokenizer(params.paths.model_dir)
    ids = [t for r in rows for t in r["token_ids"]] + stats["top_logit_ids"] + stats["bottom_logit_ids"]
    text = token_strings(tokenizer, ids)
    click.secho(f"layer {layer} feature {index}", bold=True)
    if stats["dead"]:
        click.echo("dead: never fires on the scanned tokens")
        return
    click.echo(
        f"fires on {stats['n_firing']:,} tokens ({100 * stats['frequency']:.3f}%), activation "
        f"{stats['act_min']:.3g} to {stats['act_max']:.3g}, mean {stats['act_mean']:.3g}"
    )
    for name in ("top", "bottom"):
        tokens = ", ".join(repr(text[t]) for t in stats[f"{name}_logit_ids"])
        click.echo(f"{name} logits: {tokens}")
    shown: dict[str, int] = {}
    for row in rows:
        group = row["group"]
        if (group != "top" and not all_groups) or shown.get(group, 0) >= n_examples:
            continue
        if group not in shown:
            click.secho(f"\n{group}", underline=True)
        shown[group] = shown.get(group, 0) + 1
        pieces = []
        for i, (t, act) in enumerate(zip(row["token_ids"], row["token_acts"])):
            piece = text[t].replace("\n", "\\n")
            if i == row["max_index"]:
                piece = click.style(piece, fg="black", bg="yellow", bold=True)
            elif act > 0:
                piece = click.style(piece, fg="yellow")
            pieces.append(piece)
        click.echo(f"{row['activation']:8.3f}  " + "".join(pieces))


@main.command()
@click.option("--layer", type=int, required=True)
@click.option("--feature", "feature_index", type=int, required=True)
@click.option("--text", required=True, help="Text to run the model on (BOS is prepended).")
@click.option("-o", "--output", default="heatmap.png", show_default=True, help="PNG to write.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def heatmap(layer: int, feature_index: int, text: str, output: str, params_path: str) -> None:
    """A PNG of a feature's activation on every token of a text; colours go up to the
    feature's largest activation in `paths.examples` when that exists."""
    from pipeline.clt import load_transcoder
    from pipeline.examples import read_feature
    from pipeline.featpack import token_strings
    from pipeline.heatmap import activations_on_text, render_heatmap
    from pipeline.model import load_model
    from pipeline.runtime import resolve_device, torch_dtype

    params = load_params(params_path)
    configure_torch(params.runtime.num_threads)
    transcoder = load_transcoder(params.paths.transcoder)
    device = resolve_device(params.runtime.device)
    dtype = torch_dtype(params.model.dtype)
    model, tokenizer = load_model(params.paths.model_dir, dtype=dtype, device=device)
    ids, acts = activations_on_text(model, tokenizer, transcoder, text, layer, feature_index)
    strings = token_strings(tokenizer, ids)
    try:
        vmax = read_feature(params.paths.examples, layer, feature_index)[0]["act_max"]
    except (FileNotFoundError, ValueError):
        vmax = None
    scale = f" (colour scale: up to its max, {vmax:.3g})" if vmax else ""
    title = f"layer {layer} feature {feature_index}{scale}"
    path = render_heatmap([strings[i] for i in ids], acts, output, title=title, vmax=vmax)
    click.echo(f"wrote {path}: max activation {acts.max():.3f} on {strings[ids[int(acts.argmax())]]!r}")


@main.command("virtual-weights")
@click.argument("layer", type=int, required=False)
@click.argument("index", type=int, required=False)
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=1), help="Partners per side.")
@click.option("--all", "all_features", is_flag=True, help="Every feature's partners, to --out (Parquet).")
@click.option("--out", default=None, help="Parquet file --all writes.")
@click.option(
    "--block-size", default=1024, show_default=True, type=click.IntRange(min=1), help="Sources per block."
)
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def virtual_weights(
    layer: int | None,
    index: int | None,
    top: int,
    all_features: bool,
    out: str | None,
    block_size: int,
    params_path: str,
) -> None:
    """Feature INDEX of layer LAYER's strongest input-invariant connections (virtual weights
    through the residual stream, attention ignored; `pipeline/virtual_weights.py`): the
    features upstream whose decoders its encoder reads, and the features downstream that
    read its decoder, with their labels from `paths.features`. `--all --out FILE` writes
    every feature's top partners to Parquet instead."""
    from pipeline.clt import load_transcoder
    from pipeline.labels import feature_label, feature_reader
    from pipeline.virtual_weights import feature_partners, write_partners

    if all_features != (layer is None and index is None) or (layer is None) != (index is None):
        raise click.UsageError("give either LAYER INDEX, or --all --out FILE")
    if all_features and out is None:
        raise click.UsageError("--all needs --out FILE.parquet")
    params = load_params(params_path)
    configure_torch(params.runtime.num_threads)
    transcoder = load_transcoder(params.paths.transcoder)
    if all_features:
        path = write_partners(transcoder, out, top=top, block_size=block_size)
        n = transcoder.shape.n_layers * transcoder.shape.d_transcoder
        click.echo(f"wrote {path}: the top {top} upstream and downstream partners of {n:,} features")
        return
    partners = feature_partners(transcoder, layer, index, top=top)
    reader = feature_reader(params.paths.features)

    def label(l: int, f: int) -> str:
        try:
            return feature_label(reader.layer_feature(l, f)) if reader is not None else ""
        except KeyError:  # packed for another transcoder: `dvc repro pack` brings them up to date
            return ""

    click.secho(f"layer {layer} feature {index}  {label(layer, index)}", bold=True)
    for direction, what in (
        ("upstream", "features whose decoders this feature's encoder reads"),
        ("downstream", "features whose encoders read this feature's decoder"),
    ):
        p = partners[direction]
        click.secho(f"\n{direction}: {what}", underline=True)
        if not len(p.weights):
            click.echo("  none (no layer on this side)")
        for l, f, w in zip(p.layers.tolist(), p.features.tolist(), p.weights.tolist()):
            click.echo(f"  {w:+10.4f}  {l:>3}:{f:<6} {label(l, f)}")


@main.command()
@click.option(
    "--port", default=8032, show_default=True, type=click.IntRange(0, 65535), help="0: any free one."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; any but a loopback address lets other machines read the graphs and save.",
)
@click.option(
    "--annotations",
    "annotations_dir",
    default=None,
    help="Folder of the saved annotations, {slug}.json per graph (default: annotations/ beside params.yaml).",
)
@click.option(
    "--web",
    "web_dir",
    default=None,
    help="Folder of the frontend files scripts/setup.sh fetches (default: .web/ beside params.yaml, else the "
    "checkout's).",
)
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def serve(port: int, host: str, annotations_dir: str | None, web_dir: str | None, params_path: str) -> None:
    """Browse the graphs (`paths.graphs`) in circuit-tracer's frontend, with every node's
    feature examples from `paths.features`; the page's Save button writes the pinned nodes,
    supernodes and labels to the annotations folder, never to a DVC output. Ctrl-C stops it."""
    from pipeline.serve import Server, is_loopback, site_for

    site = site_for(load_params(params_path), params_path, annotations=annotations_dir, web=web_dir)
    server = Server(site, host, port)
    if not is_loopback(host):
        click.secho(
            f"Warning: listening on {host}, not a loopback address: anyone who can reach this machine can "
            "read the graphs and overwrite the annotations.",
            fg="yellow",
            err=True,
        )
    # Ctrl-C (even where a shell ignores it) and `kill`, from before the URL is printed
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    try:
        n_graphs = len(site.graph_list())
        click.echo(f"Serving {n_graphs} graphs from {site.graphs}; annotations in {site.annotations}")
        click.echo(f"Open {server.url}  (Ctrl-C stops)")
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("Stopped.")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
