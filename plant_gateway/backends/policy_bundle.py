"""Our policy bundle as an OPA bundle archive, for a team that serves it from its own OPA.

The layout is OPA's bundle format: a gzipped tar with ``.manifest`` (the ``plant`` root, so it
can sit next to the deployed OPA's ``gateway`` packages), ``data.json`` and the ``.rego`` modules
(tests left out). The archive is reproducible: same sources, same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

from plant_gateway.backends.policy_local import compile_bundle, load_sources
from plant_gateway.settings import BUNDLE_DECISION_PATH

BUNDLE_ROOT = "plant"


def _add(archive: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = 0o644
    info.mtime = 0  # reproducible
    archive.addfile(info, io.BytesIO(content))


def build(policy_dir: Path) -> bytes:
    """The ``.tar.gz`` bytes of the bundle; ``PolicyBundleError`` when it does not compile."""
    sources = load_sources(policy_dir)
    compiled = compile_bundle(sources, BUNDLE_DECISION_PATH)  # refuse what OPA would refuse
    manifest = {"revision": compiled.revision, "roots": [BUNDLE_ROOT]}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _add(archive, ".manifest", json.dumps(manifest, sort_keys=True).encode())
        _add(archive, "data.json", json.dumps(sources.data, sort_keys=True).encode())
        for name, text in sorted(sources.modules.items()):
            _add(archive, name, text.encode())
    return gzip.compress(raw.getvalue(), mtime=0)
