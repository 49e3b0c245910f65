"""analysis must stay importable without torch, so a laptop can fit what a cluster trained."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_analysis_imports_without_torch():
    modules = sorted(p.stem for p in (REPO / "analysis").glob("*.py") if p.stem != "__init__")
    assert {"cli", "chinchilla", "powerlaw", "isoflop", "plots"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('analysis.' + m)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok', len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
