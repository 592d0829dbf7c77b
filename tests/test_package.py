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


def test_import_is_lean(patience):
    code = (
        "import importlib, pkgutil, sys\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "import dfq_search\n"
        "for sub in pkgutil.iter_modules(dfq_search.__path__):\n"
        "    if sub.name not in ('distributed',): importlib.import_module('dfq_search.' + sub.name)\n"
        "heavy = sorted(m for m in ('ray', 'tensorboard', 'optuna') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    proc = patience.run([sys.executable, "-c", code], "the imports", 120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
