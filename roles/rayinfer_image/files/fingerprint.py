"""Print, as JSON, what the rayinfer image is built from: Python version, dependencies, source digest.

Read-only: the role hashes this (with the wheelhouse listing and the Dockerfile) into the image tag.
"""

import hashlib
import json
import sys
import tomllib
from pathlib import Path

project = Path(sys.argv[1])
meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
digest = hashlib.sha256()
files = [project / "pyproject.toml", project / meta.get("readme", "README.md")]
files += sorted(p for p in (project / "ray_inference").rglob("*") if p.is_file())
for path in files:
    if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
        digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes() + b"\0")
print(json.dumps({
    "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    "dependencies": meta["dependencies"],
    "source_sha256": digest.hexdigest(),
}))
