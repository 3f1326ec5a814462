"""code/requirements.txt: checked against this environment, refused clearly, or installed into a per-model env."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sdmaker.config import load_settings
from sdmaker.errors import RequirementsError
from sdmaker.serving import check_requirements, plan_model_environment, prepare_model_environment

FIXTURES = Path(__file__).parent / "fixtures"


def _settings(home: Path, **env: str):  # type: ignore[no-untyped-def]
    return load_settings({"SDMAKER_HOME": str(home), **env})


def test_no_requirements_file_runs_here(tmp_path: Path) -> None:
    assert prepare_model_environment(tmp_path, _settings(tmp_path), allow_install=False) == sys.executable


def test_satisfied_requirements_run_here(tmp_path: Path) -> None:
    model = FIXTURES / "requirements_satisfied"
    assert check_requirements(model / "code" / "requirements.txt") == []  # comments, markers, bare names
    assert prepare_model_environment(model, _settings(tmp_path), allow_install=False) == sys.executable
    assert not (tmp_path / "envs").exists()


def test_missing_requirements_are_named_and_refused_without_install(tmp_path: Path) -> None:
    model = FIXTURES / "requirements_missing"
    unsatisfied = {u.line: u.reason for u in check_requirements(model / "code" / "requirements.txt")}
    assert unsatisfied["sdmaker-test-missing-package-zzz==1.0"] == "not installed"
    assert unsatisfied["torch<1.0"].endswith("installed")  # a pin the installed version breaks
    assert "numpy>=1.20" not in unsatisfied
    with pytest.raises(RequirementsError) as info:
        prepare_model_environment(model, _settings(tmp_path), allow_install=False)
    assert "sdmaker-test-missing-package-zzz==1.0 (not installed)" in info.value.message
    assert "installing is not allowed" in info.value.message
    assert info.value.fields["missing"] == ["sdmaker-test-missing-package-zzz==1.0", "torch<1.0"]
    with pytest.raises(RequirementsError, match="offline"):
        prepare_model_environment(model, _settings(tmp_path, SDMAKER_OFFLINE="1"), allow_install=True)


def test_pip_options_and_urls_count_as_unsatisfied(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("--extra-index-url https://example.invalid/simple\nfoo @ https://example.invalid/foo.whl\n")
    assert [u.line for u in check_requirements(req)] == ["--extra-index-url https://example.invalid/simple",
                                                         "foo @ https://example.invalid/foo.whl"]


def test_install_plan(tmp_path: Path) -> None:
    model = FIXTURES / "requirements_missing"
    plan = plan_model_environment(model, _settings(tmp_path))
    assert plan.env_dir is not None and plan.env_dir.parent == tmp_path / "envs"
    assert plan.python == str(plan.env_dir / "bin" / "python")
    venv, pip = plan.commands
    assert venv == [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(plan.env_dir)]
    assert pip[:5] == [sys.executable, "-m", "pip", "--python", plan.python]
    assert pip[-2:] == ["-r", str(model / "code" / "requirements.txt")] and "install" in pip
    # Same file + same interpreter -> same env (built once, shared by workers and restarts).
    assert plan_model_environment(model, _settings(tmp_path)).env_dir == plan.env_dir


def _wheel(dist_dir: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel, written by hand (no network, no build backend)."""
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n",
    }
    record_lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record_lines.append(f"{path},sha256={digest},{len(text.encode())}")
    record = f"{name}-{version}.dist-info/RECORD"
    files[record] = "\n".join(record_lines + [f"{record},,"]) + "\n"
    out = dist_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return out


@pytest.mark.slow
def test_missing_package_is_installed_into_an_isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    _wheel(wheelhouse, "sdmaker_tinydep", "1.2.0")
    model = tmp_path / "model"
    (model / "code").mkdir(parents=True)
    (model / "code" / "requirements.txt").write_text("sdmaker_tinydep==1.2.0\nnumpy>=1.20\n")
    # pip reads these itself: install from the local wheelhouse only, never the network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    settings = _settings(tmp_path / "home")
    python = prepare_model_environment(model, settings, allow_install=True)
    assert python != sys.executable and Path(python).parent.parent.parent == tmp_path / "home" / "envs"
    probe = ("import sdmaker_tinydep, numpy, sdmaker.serving, importlib.metadata as m; "
             "print(sdmaker_tinydep.VERSION, m.version('diffusers'))")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from importlib.metadata import version

    assert out.stdout.split() == ["1.2.0", version("diffusers")]  # new package + this env's packages
    with pytest.raises(ImportError):
        __import__("sdmaker_tinydep")  # nothing leaked into the main environment
    shutil.rmtree(wheelhouse)  # reused without pip the second time
    assert prepare_model_environment(model, settings, allow_install=False) == python
