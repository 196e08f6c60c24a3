from click.testing import CliRunner

from pipeline.cli import main


def test_help_lists_every_stage_and_utility():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    commands = ("model", "dump", "train", "evaluate", "examples", "pack", "graphs", "plots")
    utilities = (
        "generate",
        "intervene",
        "virtual-weights",
        "repro",
        "info",
        "feature",
        "heatmap",
        "preset",
        "export-corpus",
    )
    for command in (*commands, *utilities):
        assert command in result.output


def test_bad_params_file_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("dump:\n  n_tokens: -3\n")
    result = CliRunner().invoke(main, ["dump", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: `dump.n_tokens` must be >= 1, got -3"
