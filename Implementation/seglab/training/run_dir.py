"""The run folder: created once, never overwritten by accident, written by one process at a time.

A folder that already holds a run (a checkpoint, or a log of at least one iteration) is refused
unless the command says --resume (continue it) or --force (start over in it). A start that was
refused or crashed before its first iteration leaves only config.yaml (and a log without rows):
nothing to protect, so the folder is taken again as it is. A lock (`.lock`, an flock
the kernel drops when its process dies, kill -9 included) refuses a second writer while the
first is alive. Temp files left by a process killed while writing a checkpoint are removed.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path



def run_evidence(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a run trained there: checkpoint files, logged iterations."""
    found = []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(p.suffix == ".pth" for p in checkpoints.iterdir()):
        found.append("checkpoints")
    log = run_dir / "log.csv"
    if log.is_file():
        with open(log) as f:
            if sum(1 for line in f if line.strip()) > 1:   # a header and >= 1 iteration
                found.append("log.csv")
    return found


class RunDirError(RuntimeError):
    """A run folder that is taken, or cannot be written."""


def make_run_dir(cfg: dict) -> Path:
    name = cfg["run"]["name"] or f"{cfg['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg["run"]["out"]) / name


def claim_run_dir(run_dir: Path, resume: bool = False, force: bool = False):
    """Create/check `run_dir`, take its lock and clean stale temp files; returns the open lock
    file, which must stay open (and referenced) while the run writes."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} is an existing file; pass another --run-dir")
    existing = run_evidence(run_dir) if run_dir.is_dir() else []
    if existing and not (resume or force):
        raise RunDirError(f"run folder {run_dir} already holds a run ({', '.join(existing)}). "
                          f"Continue it with `--resume {run_dir}`, choose another --run-dir, or "
                          "pass --force to start over in it (its log and checkpoints are "
                          "replaced).")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a+")
    except OSError as e:
        raise RunDirError(f"cannot write to run folder {run_dir}: {e.strerror}. Choose a "
                          "writable --run-dir (or run.out).") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise RunDirError(f"run folder {run_dir} is in use by {owner}; wait for it to finish "
                          "or choose another --run-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"train.py (pid {os.getpid()})\n")
    lock.flush()
    for stale in (run_dir / "checkpoints").glob(".*.tmp"):
        stale.unlink()
    return lock
