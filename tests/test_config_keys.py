"""No config key that nothing reads: every key of DEFAULTS is used by the code outside the table
that declares it (a key that is accepted and then ignored, as train.tensorboard once was, fails
here)."""
import dataclasses
import re
from pathlib import Path

from seglab.config import DEFAULTS, FREE_FORM
from seglab.densecrf.params import CRFParams

ROOT = Path(__file__).resolve().parents[1] / "Implementation"


def code_without_the_defaults_table() -> str:
    texts = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        if path.name == "config.py" and path.parent.name == "seglab":
            start = text.index("DEFAULTS = {")
            end = text.index("\nFREE_FORM", start)
            text = text[:start] + text[end:]
        texts.append(text)
    return "\n".join(texts)


def keys(tree: dict, prefix: str = ""):
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and dotted not in FREE_FORM:
            yield from keys(value, dotted + ".")
        else:
            yield dotted


def test_every_config_key_is_read_somewhere():
    code = code_without_the_defaults_table()
    crf_fields = {f.name for f in dataclasses.fields(CRFParams)}
    unused = []
    for dotted in keys(DEFAULTS):
        section, leaf = dotted.split(".", 1)
        if section == "crf" and leaf in crf_fields:
            continue                        # read as CRFParams fields (crf_params_from_config)
        used = re.search(rf"""["']{re.escape(leaf)}["']|\.{re.escape(leaf)}\b|"""
                         rf"""\b{re.escape(leaf)}=|{re.escape(dotted)}""", code)
        if not used:
            unused.append(dotted)
    assert not unused, f"config keys that no code reads: {unused}"


def test_the_walk_finds_a_key_that_nothing_reads(monkeypatch):
    """The test above can fail: a key added to DEFAULTS and read nowhere is reported."""
    monkeypatch.setitem(DEFAULTS["train"], "never_read_anywhere_xyz", 1)
    try:
        test_every_config_key_is_read_somewhere()
    except AssertionError as e:
        assert "train.never_read_anywhere_xyz" in str(e)
    else:
        raise AssertionError("an unread key went unnoticed")
