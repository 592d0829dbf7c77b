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
        "def walk(pkg):\n"  # every module of every subpackage but distributed (walk_packages would import it)
        "    for sub in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if sub.name == 'dfq_search.distributed': continue\n"
        "        mod = importlib.import_module(sub.name)\n"
        "        seen.append(sub.name)\n"
        "        if sub.ispkg: walk(mod)\n"
        "seen = []\n"
        "walk(dfq_search)\n"
        "assert 'dfq_search.search.campaign' in seen and 'dfq_search.search.runner' in seen, seen\n"
        "heavy = sorted(m for m in ('ray', 'tensorboard', 'optuna') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    proc = patience.run([sys.executable, "-c", code], "the imports", 120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_search_reaches_ray_only_through_its_runner():
    """Ray behind one door: no module of dfq_search.search imports Ray or dfq_search.distributed."""
    import re
    from pathlib import Path

    import dfq_search.search

    folder = Path(dfq_search.search.__file__).parent
    door = r"ray\b|dfq_search\.distributed|dfq_search import distributed"
    pattern = re.compile(rf"^\s*(from|import)\s+({door})", re.M)
    found = {p.name: pattern.findall(p.read_text()) for p in folder.glob("*.py")}
    assert not {k: v for k, v in found.items() if v}
