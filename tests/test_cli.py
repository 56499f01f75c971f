"""The command dispatcher: help, unknown commands and exit codes."""

from simvg.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in COMMANDS:
        assert " ".join(key) in out


def test_unknown_command_is_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


# One option (or help text) that only the command's own ``<name>_arguments`` adds.
OWN_OPTION = {
    ("data", "synth"): "--task",
    ("data", "convert"): "--splitby",
    ("data", "check"): "--quick",
    ("tokenizer", "train"): "--vocab-size",
    ("pretrain",): "configs/pretrain/*.yaml",
    ("train",): "--allow-pickle",
    ("eval",): "--max-samples",
    ("plot",): "run_dir",
    ("ground",): "--compare",
    ("predict",): "--queries",
    ("demo",): "--grec-checkpoint",
    ("serve",): "--max-upload-mb",
    ("export", "onnx"): "--int8",
    ("export", "weights"): "--half",
}


def test_each_command_word_reaches_its_own_options(capsys):
    """Bites on a table entry wired to another command's functions (e.g. both ``export`` words to onnx's): its
    ``--help`` would lack the command's own option."""
    assert set(OWN_OPTION) == set(COMMANDS)
    for key, option in OWN_OPTION.items():
        assert main([*key, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: simvg {' '.join(key)} ") and option in out, (key, out)
