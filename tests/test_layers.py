"""The layering of seglab holds: no module imports one of a higher layer, no import cycle (a
function-local import counts), and every module imports alone in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import seglab

ROOT = Path(__file__).resolve().parents[1] / "Implementation"


def modules() -> dict:
    found = {}
    for path in sorted((ROOT / "seglab").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports(path: Path, known) -> set:
    """The seglab modules a file imports, anywhere in it (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seglab"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("seglab")}
    return {m for m in out if m in known}


def graph() -> dict:
    """module -> the modules importing it executes: each one named, and every package
    __init__ above it that itself imports seglab modules (Python runs those first)."""
    known = modules()
    direct = {m: imports(p, known) for m, p in known.items()}
    edges = {}
    for m, targets in direct.items():
        out = set()
        for t in targets:
            parts = t.split(".")
            for k in range(2, len(parts) + 1):
                parent = ".".join(parts[:k])
                executes = k == len(parts) or direct.get(parent)
                if executes and parent in known and parent != m and \
                        not m.startswith(parent + "."):
                    out.add(parent)
        edges[m] = out
    return edges


def layer(module: str) -> int:
    best = (-1, -1)
    for i, group in enumerate(seglab.LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = (i, len(prefix))
    assert best[0] >= 0, f"{module} is in no layer of seglab.LAYERS"
    return best[0]


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in graph().items() for t in sorted(targets) if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges, cycles = graph(), []
    state = {}

    def visit(v, path):
        state[v] = "open"
        for w in edges[v]:
            if state.get(w) == "open":
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = "done"
    for v in sorted(edges):
        if v not in state:
            visit(v, [v])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """They can fail: a module of the data layer importing training is caught by both."""
    fake = ROOT / "seglab" / "data" / "zz_probe_upward.py"
    fake.write_text("from seglab.training.loop import train\n")
    try:
        edges = graph()
        assert "seglab.training.loop" in edges["seglab.data.zz_probe_upward"]
        assert layer("seglab.data.zz_probe_upward") < layer("seglab.training.loop")
    finally:
        fake.unlink()


PROBE = """
import importlib, os, sys, traceback
for heavy in ("numpy", "torch", "torchvision", "torchvision.models", "PIL.Image", "scipy.io",
              "yaml", "tqdm", "cv2", "matplotlib.pyplot", "onnx", "onnxruntime", "skimage.data",
              "torch.utils.tensorboard", "tflite", "pydensecrf.densecrf", "numba"):
    try:                                  # the third-party libraries, loaded once up front
        importlib.import_module(heavy)
    except ImportError:
        pass
assert not any(m == "seglab" or m.startswith("seglab.") for m in sys.modules)
bad = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:               # a child with no seglab module loaded imports this one alone
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            sys.stderr.write(name + ": " + traceback.format_exc().strip().splitlines()[-1] + "\\n")
            os._exit(1)
    if os.waitpid(pid, 0)[1]:
        bad.append(name)
print(" ".join(bad))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first, into an interpreter that has loaded the third-party
    libraries but no seglab module (a fork per module of one fresh interpreter)."""
    import os
    run = subprocess.run([sys.executable, "-c", PROBE, *sorted(modules())], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr[-3000:]
