import subprocess
import sys

import pytest

from rosa.cli import SUBCOMMANDS, build_parser, main


def test_help_lists_every_subcommand_without_importing_runners():
    code = "import sys; from rosa.cli import build_parser; build_parser(); print('rosa.experiments.glue' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    usage = build_parser().format_help()
    assert all(name in usage for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert "--" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
