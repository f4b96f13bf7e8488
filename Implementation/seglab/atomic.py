"""Atomic file writes: write a temp file in the target's folder, then rename it over the target.
A run killed mid-write leaves at most a hidden `.<name>.*.tmp` file, never half a target; used for
checkpoints, label PNGs, cached logits, split lists and JSON results (write_json)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temp path next to `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give it the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_safe(value):
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, data: dict) -> Path:
    """`data` as strict, indented JSON (json_safe), written atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    return Path(path)
