import subprocess
import sys

# Every algorithm module is plain torch: importing it must not pull in Ray or TensorBoard.
MODULES = [
    "dfq_search",
    "dfq_search.quant",
    "dfq_search.models",
    "dfq_search.data",
    "dfq_search.evaluate",
    "dfq_search.baselines",
    "dfq_search.cli",
    "dfq_search.commands",
]


def test_import_is_lean():
    code = (
        "import importlib, pkgutil, sys\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "import dfq_search\n"
        "for sub in pkgutil.iter_modules(dfq_search.__path__):\n"
        "    if sub.name not in ('distributed',): importlib.import_module('dfq_search.' + sub.name)\n"
        "heavy = sorted(m for m in ('ray', 'tensorboard', 'optuna') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
