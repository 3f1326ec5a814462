"""``code/requirements.txt``: check it against this environment, install what is missing into an isolated one.

SageMaker pip-installs the file at every container start (contract §1.3, pain point 4) and fails offline.
sdmaker instead:

1. parses each line with ``packaging`` and asks ``importlib.metadata`` whether an installed distribution
   satisfies it (environment markers honoured); pip options, URLs and paths cannot be checked and count
   as unsatisfied;
2. all satisfied: the worker runs with this interpreter, nothing is installed;
3. otherwise, when installing is allowed (not offline, the caller agrees): a per-model virtual environment
   ``$SDMAKER_HOME/envs/<digest>`` (digest of the file + this interpreter) sees this environment's packages
   (``--system-site-packages`` plus a ``.pth`` naming the current venv's site dirs), ``pip install -r``
   adds the rest; the worker runs with that env's python. Built once, reused by every worker and restart;
4. when installing is not allowed: :class:`~sdmaker.errors.RequirementsError` naming the unsatisfied lines.
   Never silently ignored.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from sdmaker.config import Settings
from sdmaker.errors import RequirementsError

__all__ = ["EnvironmentPlan", "Unsatisfied", "check_requirements", "plan_model_environment",
           "prepare_model_environment"]

logger = logging.getLogger(__name__)

_READY_MARKER = ".sdmaker-env-ready"
_PIP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Unsatisfied:
    """One requirement line this environment does not satisfy, and why."""

    line: str
    reason: str

    def __str__(self) -> str:
        return f"{self.line} ({self.reason})"


@dataclass
class EnvironmentPlan:
    """What running a model needs: this interpreter, or an env to build with ``commands``."""

    requirements_file: Path | None
    unsatisfied: list[Unsatisfied] = field(default_factory=list)
    env_dir: Path | None = None
    python: str = sys.executable
    commands: list[list[str]] = field(default_factory=list)

    @property
    def satisfied(self) -> bool:
        return not self.unsatisfied


def _logical_lines(text: str) -> list[str]:
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.lstrip().startswith("#"):
            continue
        line = line.split(" #", 1)[0].strip()
        if line:
            out.append(line)
    if pending.strip():
        out.append(pending.strip())
    return out


def check_requirements(requirements_file: Path) -> list[Unsatisfied]:
    """Lines of ``requirements_file`` not satisfied by the running environment (empty: all satisfied)."""
    unsatisfied: list[Unsatisfied] = []
    for line in _logical_lines(Path(requirements_file).read_text(encoding="utf-8")):
        if line.startswith("-"):
            unsatisfied.append(Unsatisfied(line, "pip option; cannot be checked without pip"))
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            unsatisfied.append(Unsatisfied(line, f"not a requirement pip-check can read: {exc}"))
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue  # not for this platform / python
        if req.url:
            unsatisfied.append(Unsatisfied(line, "direct URL/path requirement; cannot be checked"))
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unsatisfied.append(Unsatisfied(line, "not installed"))
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            unsatisfied.append(Unsatisfied(line, f"{installed} installed"))
            continue
        missing_extras = [e for e in sorted(req.extras) if not _extra_satisfied(req.name, e)]
        if missing_extras:
            unsatisfied.append(Unsatisfied(line, f"extra(s) {', '.join(missing_extras)} not installed"))
    return unsatisfied


def _extra_satisfied(dist_name: str, extra: str) -> bool:
    try:
        requires = metadata.requires(dist_name) or []
    except metadata.PackageNotFoundError:
        return False
    for spec in requires:
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            continue
        if req.marker is None or not req.marker.evaluate({"extra": extra}) or req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            return False
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            return False
    return True


def _env_digest(requirements_file: Path) -> str:
    h = hashlib.sha256()
    h.update(Path(requirements_file).read_bytes())
    h.update(b"\0" + sys.executable.encode() + b"\0" + sys.version.encode())
    return h.hexdigest()[:16]


def _parent_site_dirs() -> list[str]:
    """This interpreter's site dirs, so the per-model env sees torch, diffusers and sdmaker itself."""
    dirs = list(site.getsitepackages())
    user = site.getusersitepackages()
    if isinstance(user, str) and Path(user).is_dir():
        dirs.append(user)
    return [d for d in dirs if Path(d).is_dir()]


def plan_model_environment(model_dir: Path, settings: Settings) -> EnvironmentPlan:
    """Decide, without running anything, what the model at ``model_dir`` needs."""
    req_file = Path(model_dir) / "code" / "requirements.txt"
    if not req_file.is_file():
        return EnvironmentPlan(requirements_file=None)
    unsatisfied = check_requirements(req_file)
    if not unsatisfied:
        return EnvironmentPlan(requirements_file=req_file)
    env_dir = settings.home / "envs" / _env_digest(req_file)
    python = str(env_dir / "bin" / "python")
    commands = [
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
        [sys.executable, "-m", "pip", "--python", python, "install", "--disable-pip-version-check",
         "--no-input", "--retries", "2", "--timeout", "15", "-r", str(req_file)],
    ]
    return EnvironmentPlan(requirements_file=req_file, unsatisfied=unsatisfied, env_dir=env_dir, python=python,
                           commands=commands)


def _env_site_packages(python: str) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60)
    return Path(out.stdout.strip())


def _build(plan: EnvironmentPlan) -> None:
    assert plan.env_dir is not None
    if plan.env_dir.exists():
        shutil.rmtree(plan.env_dir)  # a half-built env from an interrupted run
    venv_cmd, pip_cmd = plan.commands
    subprocess.run(venv_cmd, check=True, capture_output=True, text=True, timeout=300)
    # After the env's own site-packages (so installed packages win), this environment's.
    lines = [f"import site; site.addsitedir({d!r})" for d in _parent_site_dirs()]
    (_env_site_packages(plan.python) / "_sdmaker_parent_env.pth").write_text("\n".join(lines) + "\n")
    logger.info("installing %s into %s", ", ".join(u.line for u in plan.unsatisfied), plan.env_dir)
    proc = subprocess.run(pip_cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RequirementsError(
            f"pip could not install {plan.requirements_file} into {plan.env_dir} (exit {proc.returncode}); "
            f"unsatisfied: {', '.join(map(str, plan.unsatisfied))}\n{tail}",
            missing=[u.line for u in plan.unsatisfied], env_dir=str(plan.env_dir))
    (plan.env_dir / _READY_MARKER).write_text(str(plan.requirements_file) + "\n")


def prepare_model_environment(model_dir: Path, settings: Settings, *, allow_install: bool) -> str:
    """The python executable to run ``model_dir``'s worker with.

    ``sys.executable`` when there is no ``code/requirements.txt`` or it is satisfied here; otherwise the
    per-model env's python, built now (pip) when ``allow_install`` and not ``settings.offline``, reused when
    already built. Raises :class:`~sdmaker.errors.RequirementsError` naming the unsatisfied requirements
    when they cannot be installed.
    """
    plan = plan_model_environment(Path(model_dir), settings)
    if plan.satisfied:
        return plan.python
    assert plan.env_dir is not None
    if (plan.env_dir / _READY_MARKER).is_file():
        return plan.python
    missing = ", ".join(map(str, plan.unsatisfied))
    if settings.offline or not allow_install:
        why = "sdmaker is offline (SDMAKER_OFFLINE/HF_HUB_OFFLINE)" if settings.offline else "installing is not allowed"
        raise RequirementsError(
            f"{plan.requirements_file} is not satisfied by this environment: {missing}; {why}. Install them "
            "into sdmaker's environment, relax the pins, or allow installation into an isolated per-model "
            "environment", missing=[u.line for u in plan.unsatisfied])
    from filelock import FileLock

    plan.env_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(plan.env_dir) + ".lock"):
        if not (plan.env_dir / _READY_MARKER).is_file():  # another worker may have built it meanwhile
            try:
                _build(plan)
            except subprocess.SubprocessError as exc:
                raise RequirementsError(f"could not create the environment {plan.env_dir}: {exc}",
                                        missing=[u.line for u in plan.unsatisfied]) from exc
    return plan.python
