"""What users install: pyproject's extras admit current releases, and the scripts keep CI
on the pinned CPU torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="Python 3.11's TOML reader")

ROOT = Path(__file__).resolve().parent.parent
CI_TORCH = "2.13.0"  # the CPU build the suite runs on (scripts/_venv.sh)


def _requirement(extra: str, name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["optional-dependencies"][extra]]
    return next(r for r in found if r.name == name)


def test_export_extra_admits_every_torch_from_the_oldest_tested_on():
    torch = _requirement("export", "torch")
    for version in (CI_TORCH, "2.6.0", "2.15.0", "3.0.0"):  # no upper cap
        assert torch.specifier.contains(version), (version, str(torch))
    assert not torch.specifier.contains("2.5.1")


def test_venv_script_pins_the_ci_torch_in_every_install():
    script = (ROOT / "scripts" / "_venv.sh").read_text()
    installs = [line for line in script.splitlines() if "pip install" in line
                and not line.lstrip().startswith("#") and "--upgrade pip" not in line]
    assert installs, script
    for line in installs:  # the extras resolve with torch held at the pin
        assert re.search(rf'"torch=={re.escape(CI_TORCH)}"', line), line
