"""The README's commands are the ones that work: CI runs its test command, every figure it shows
exists, and every `python Implementation/X.py ...` command it shows is accepted by X's parser."""
import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from seglab.config import ConfigError, config_from_args

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def script_commands():
    """Every `python Implementation/<script>.py ...` in the README's bash blocks (continuations
    joined, comments dropped, `&&` chains split)."""
    commands = []
    for block in bash_blocks():
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            line = line.split(" #")[0]
            for part in line.split("&&"):
                words = shlex.split(part.strip()) if part.strip() else []
                if len(words) >= 2 and words[0] == "python" and words[1].startswith("Implementation/"):
                    commands.append(words[1:])
    return commands


def test_ci_runs_the_readme_test_command():
    test_cmd = [c for c in bash_blocks() if "pytest" in c][0].strip()
    last = test_cmd.split("&&")[-1].strip()
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()
          if l.strip() and not l.startswith("#")]
    assert ci[-1] == last
    assert any("pip install" in l and "-r requirements.txt" in l for l in ci)


def test_every_figure_the_readme_shows_exists():
    images = re.findall(r"\]\((Figures/[^)]+\.png)\)", README)
    assert len(images) >= 7
    for image in images:
        path = ROOT / image
        assert path.is_file() and path.stat().st_size > 1000, image


class Parsed(Exception):
    pass


@pytest.mark.parametrize("argv", script_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_is_accepted_by_its_parser(argv, monkeypatch):
    """Run the script's main() up to its argument parsing, then stop: a command the parser
    rejects exits with status 2 and fails here. Then resolve its config the way the script
    does: a mistyped `section.key`, a value of the wrong type or out of range fails too."""
    for name in ("parse_args", "parse_intermixed_args"):
        real = getattr(argparse.ArgumentParser, name)

        def parse_then_stop(self, args=None, namespace=None, real=real):
            raise Parsed(real(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, name, parse_then_stop)
    module = importlib.import_module(Path(argv[0]).stem)
    with pytest.raises(Parsed) as parsed:
        module.main(argv[1:])
    args = parsed.value.args[0]
    if hasattr(args, "overrides"):
        if hasattr(args, "items"):  # infer.py: INPUTs and overrides share the positionals
            args.overrides = [i for i in args.items if module.OVERRIDE.match(i)]
        config_from_args(args)  # raises ConfigError for an unknown key or a bad value


def test_the_readme_check_catches_a_mistyped_key():
    args = argparse.Namespace(config="voc12", overrides=["train.base_lrr=1e-3"])
    with pytest.raises(ConfigError, match="base_lrr"):
        config_from_args(args)


def test_the_readme_shows_commands_of_every_stage():
    scripts = {Path(a[0]).stem for a in script_commands()}
    assert {"train", "evaluate", "crf", "convert", "infer", "datasets", "figures"} <= scripts
