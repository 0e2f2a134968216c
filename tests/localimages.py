"""The product's images, built here the way README's "Try it on a cluster" builds them, for the node's containerd.

No image registry is reachable from these machines, so the base image is made from Debian's packages
(`make base-image`: mmdebstrap, then an import), and `make images WORKER=cpu BASE=...` builds the operator and
the CPU worker on it with podman (runc: crun refuses this machine's hybrid cgroups). The build borrows this
machine's pip configuration (its CA bundle, find-links and local indexes) through read-only mounts, since a build
container sees none of the host's; nothing of it lands in an image. Podman keeps its storage under the cache
directory, apart from any other podman on the machine, so a second run on one machine rebuilds nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MMGRAPH_CACHE", Path.home() / ".cache" / "mmgraph")) / "images"
REGISTRY = "localhost/mmgraph"
BASE = f"{REGISTRY}/base:bookworm"
TAG = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
OPERATOR_IMAGE = f"{REGISTRY}/operator:{TAG}"
WORKER_IMAGE = f"{REGISTRY}/worker-cpu:{TAG}"
PREVIOUS_WORKER_IMAGE = f"{REGISTRY}/worker-cpu:previous"
PREVIOUS_RELEASE = REPO / "tests" / "dataplane" / "previous_release"


def engine() -> str:
    storage = CACHE / "storage"
    (CACHE / "tmp").mkdir(parents=True, exist_ok=True)
    return shlex.join(
        [
            "env",
            f"TMPDIR={CACHE / 'tmp'}",  # podman's scratch space: ours, not /var/tmp
            "podman",
            f"--root={storage}",
            f"--runroot={CACHE / 'run'}",
            "--runtime=runc",
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
        ]
    )


def build_flags() -> str:
    """What a build here needs beyond the Dockerfile: the host network (pip reaches PyPI), rlimits this machine
    lets a container set (FACTS.md: no CAP_SYS_RESOURCE), and this machine's pip configuration, merged into one
    file mounted as the container's /etc/pip.conf, with every local path it names mounted read-only."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():  # `global.find-links='/opt/wheels'` and `:env:.find-links='/opt/wheels'`
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in ("cert", "find-links", "extra-index-url", "index-url", "constraint", "trusted-host"):
            settings[name] = value.strip("'\"")
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
    paths = {conf: Path("/etc/pip.conf")}
    for value in settings.values():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.name == "simple":  # a local index: its pages link to files beside it
                path = path.parent
            if path.is_absolute() and path.exists():
                paths[path] = path
    mounts = [f"--volume={src}:{dst}:ro" for src, dst in paths.items()]
    limits = ["--ulimit=nofile=1024:1024", "--ulimit=nproc=4096:4096"]
    return shlex.join(["--network=host", *limits, *mounts])


def make(*targets: str) -> float:
    """`make TARGETS` with this machine's engine and flags; returns the seconds it took."""
    started = time.monotonic()
    argv = ["make", "-C", str(REPO), *targets, f"ENGINE={engine()}", f"BUILD_FLAGS={build_flags()}"]
    argv += [f"REGISTRY={REGISTRY}", f"TAG={TAG}", "WORKER=cpu", f"BASE={BASE}"]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return time.monotonic() - started


def build_previous() -> str:
    """The previous release's worker image: its packages (tests/dataplane/previous_release/) as a thin layer over
    this tree's CPU worker image, which must be built already."""
    entry = (PREVIOUS_RELEASE / "entry").read_text().strip()
    argv = [*shlex.split(engine()), "build", "--build-arg", f"BASE={WORKER_IMAGE}", "--build-arg", f"ENTRY={entry}"]
    argv += ["-t", PREVIOUS_WORKER_IMAGE]
    result = subprocess.run([*argv, str(PREVIOUS_RELEASE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return PREVIOUS_WORKER_IMAGE


def save(image: str) -> Path:
    """The image as an OCI archive (what `ctr images import` reads), written once per image id."""
    image_id = subprocess.run(
        [*shlex.split(engine()), "image", "inspect", "--format={{.Id}}", image], capture_output=True, text=True
    ).stdout.strip()
    name = image.rsplit("/", 1)[-1].replace(":", "-")  # worker-cpu-0.1.0, worker-cpu-previous: one archive each
    archive = CACHE / f"{name}-{image_id[:12]}.tar"
    if not archive.exists():
        for old in CACHE.glob(f"{name}-*.tar"):
            old.unlink()
        partial = archive.with_suffix(".partial")
        subprocess.run(
            [*shlex.split(engine()), "save", "--format=oci-archive", f"--output={partial}", image], check=True
        )
        partial.rename(archive)
    return archive
