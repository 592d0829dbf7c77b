"""What dfq-search trusts and what it does not (issue 7, item 3).

* weights and checkpoints are loaded with ``weights_only``: a pickle that would run code is refused;
* search spaces, bit plans, presets and ``--set`` values are parsed with ``yaml.safe_load``: a
  ``!!python/...`` tag is refused and never executed;
* a user's ``module:function`` model is imported only when the user names it;
* the local Ray is started on 127.0.0.1 without a dashboard;
* a campaign writes only under its storage path and the cache dir (and Ray's session dir in $TMPDIR).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dfq_search.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYTHON_TAG = '!!python/object/apply:os.system ["touch {marker}"]'


class _RunsCode:
    """Pickles as a call of os.system: loading it without weights_only would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _env(shared_cache, monkeypatch, tmp_path, one_thread):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(shared_cache))
    monkeypatch.chdir(tmp_path)


def _refused(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI: exit 2, one 'dfq-search: error:' line with ``needles`` and a fix, no traceback."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (argv, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("dfq-search: error:") and "Fix:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- pickles --------------------------------------------------------------------------------------------


def _evil_files(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "pickle_ran"
    files = {"callable": tmp_path / "callable.pt", "os_system": tmp_path / "os_system.pt"}
    torch.save({"x": print}, files["callable"])
    torch.save({"state_dict": {"w": _RunsCode(marker)}}, files["os_system"])
    return files


@pytest.mark.parametrize("kind", ["callable", "os_system"])
def test_weights_that_hold_code_are_refused(kind, tmp_path, capsys):
    path = _evil_files(tmp_path)[kind]
    argv = ["eval", "--model", "tiny_cnn", "--weights", str(path), "--data", str(tmp_path / "unused")]
    line = _refused(capsys, argv, "not a loadable torch checkpoint", path.name, "weights_only")
    assert "refused" in line
    assert not (tmp_path / "pickle_ran").exists()


@pytest.mark.parametrize("kind", ["callable", "os_system"])
def test_checkpoints_that_hold_code_are_refused(kind, tmp_path, capsys):
    path = _evil_files(tmp_path)[kind]
    _refused(capsys, ["eval", "--checkpoint", str(path)], "holds code, which is refused", path.name)
    assert not (tmp_path / "pickle_ran").exists()


# ---- YAML -----------------------------------------------------------------------------------------------


def _yaml_cases(tmp_path: Path, marker: Path) -> dict[str, list[str]]:
    tag = PYTHON_TAG.format(marker=marker)
    space = tmp_path / "space.yaml"
    space.write_text(f"model:\n  name: tiny_resnet\nbits: {tag}\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"_default: {tag}\n")
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"train:\n  seed: {tag}\n")
    bank = ["generate", "--model", "tiny_cnn", "--bank", str(tmp_path / "bank")]
    return {
        "search space": ["run", "--space", str(space), "--storage", str(tmp_path / "store")],
        "bit plan": ["eval", "--plan", str(plan)],
        "preset file": [*bank, "--preset", str(preset)],
        "--set value": [*bank, "--set", f"train.seed={tag}"],
    }


@pytest.mark.parametrize("case", ["search space", "bit plan", "preset file", "--set value"])
def test_yaml_python_tags_are_refused_and_never_run(case, tmp_path, capsys):
    marker = tmp_path / "yaml_ran"
    argv = _yaml_cases(tmp_path, marker)[case]
    _refused(capsys, argv, "not valid YAML", "python/object/apply:os.system")
    assert not marker.exists()
    assert not (tmp_path / "bank").exists() and not (tmp_path / "store").exists()


# ---- user modules ---------------------------------------------------------------------------------------


def test_a_user_model_module_is_imported_only_when_named(tmp_path, capsys, monkeypatch):
    name = f"dfq_user_mod_{os.getpid()}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "from torch import nn\n\n\n"
        "def build(num_classes=10):\n"
        "    body = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1)]\n"
        "    return nn.Sequential(*body, nn.Flatten(), nn.Linear(4, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    import dfq_search
    import dfq_search.models

    assert dfq_search.models.list_models()
    assert main(["models"]) == 0
    assert main(["layers", "--model", "tiny_cnn"]) == 0
    assert not marker.exists() and name not in sys.modules, "a user module was imported unasked"
    assert main(["layers", "--model", f"{name}:build"]) == 0
    assert marker.exists()  # named: imported
    out = capsys.readouterr().out
    assert "0" in out  # the layers table of the user's model (conv and linear) was printed
    monkeypatch.delitem(sys.modules, name, raising=False)


# ---- Ray ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_ray(monkeypatch):
    """``ray.init`` replaced by a recorder (no Ray is started); the env vars init sets are restored."""
    import ray

    from dfq_search.distributed import session

    for key in [*session.QUIET, "OMP_WAIT_POLICY"]:  # recorded, so that teardown restores them
        monkeypatch.setenv(key, os.environ.get(key, ""))
        if not os.environ[key]:
            monkeypatch.delenv(key)
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append({"args": a, **kw}))
    return calls


def test_the_local_ray_listens_on_localhost_without_dashboard(fake_ray):
    from dfq_search.distributed import session

    session.init(None, num_cpus=2)
    (kw,) = fake_ray
    assert kw["_node_ip_address"] == "127.0.0.1"
    assert kw["include_dashboard"] is False
    assert kw.get("dashboard_host", "127.0.0.1") == "127.0.0.1"
    assert kw["address"] == "local" and kw["args"] == ()  # a new local instance, never someone else's
    assert kw["num_cpus"] == 2 and kw["log_to_driver"] is False


def test_a_bad_ray_address_is_refused_before_ray_is_called(fake_ray):
    from dfq_search.distributed import session
    from dfq_search.errors import DfqError

    for address in (
        "not-a-host:99999",
        "http://head:6379",
        "head",
        "no-such-host.invalid:6379",
        "127.0.0.1:1",
    ):
        with pytest.raises(DfqError, match="Ray"):
            session.init(address)
    assert fake_ray == []


# ---- what a campaign writes -----------------------------------------------------------------------------


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_a_campaign_writes_nothing_outside_its_storage_and_cache(patience):
    """The 3-trial tiny_smoke campaign in a subprocess, with cwd, HOME, the cache and TMPDIR all in one
    fresh folder: everything it creates is under the storage path, the cache, HOME or TMPDIR (Ray's
    session dir). The folder is short (not pytest's tmp_path): Ray's socket paths must fit in 107 bytes."""
    base = Path(tempfile.mkdtemp(prefix="dfqsec-", dir="/tmp"))
    try:
        allowed = {k: base / k for k in ("store", "cache", "home", "tmpdir")}
        for k in ("cache", "home", "tmpdir"):
            allowed[k].mkdir()
        before = _tree(base)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "XDG_"))}
        env["RAY_worker_niceness"] = os.environ.get("RAY_worker_niceness", "0")  # noqa: SIM112 (see conftest)
        for k in ("MPLCONFIGDIR", "TORCH_HOME", "HF_HOME", "TMP", "TEMP"):
            env.pop(k, None)
        env |= {"HOME": str(allowed["home"]), "DFQ_SEARCH_CACHE": str(allowed["cache"]),
                "TMPDIR": str(allowed["tmpdir"]), "PYTHONPATH": str(ROOT)}  # fmt: skip
        cmd = [sys.executable, "-m", "dfq_search.cli", "run", "--space", "tiny_smoke", "--storage",
               str(allowed["store"]), "--num-cpus", "2"]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(timeout=patience(420))
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        created = _tree(base) - before
        outside = sorted(
            str(p.relative_to(base))
            for p in created
            if not any(p == d or d in p.parents for d in allowed.values())
        )
        assert outside == [], f"written outside storage/cache/HOME/TMPDIR: {outside}"
        assert list((allowed["store"]).iterdir()), "the campaign wrote nothing to its storage"
        assert list(allowed["tmpdir"].glob(f"ray/session_*_{proc.pid}")), "no Ray session in TMPDIR"
        assert not list(Path("/tmp/ray").glob(f"session_*_{proc.pid}")), "Ray's session went to /tmp/ray"
        home = sorted(str(p.relative_to(allowed["home"])) for p in created if allowed["home"] in p.parents)
        ray_dirs = sorted({p.relative_to(allowed["tmpdir"]).parts[:2] for p in created
                           if allowed["tmpdir"] in p.parents})  # fmt: skip
        print(f"HOME: {home[:20]} ({len(home)} paths); TMPDIR: {ray_dirs[:10]}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
