"""The README's commands are the ones that work: CI runs its test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = [c for c in readme_commands() if "pytest" in c][0].strip()
    last = test_cmd.split("&&")[-1].strip()
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()
          if l.strip() and not l.startswith("#")]
    assert ci[-1] == last
    assert any("pip install -r requirements.txt" in l for l in ci)
