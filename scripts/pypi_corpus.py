"""The PyPI part of the training corpus: `.py` files of a fixed, pinned list of pure-Python wheels.

`pip download` fetches the wheels into a cache directory under `build/` (once); the `.py` members
are read straight out of the zip files. Every package is capped at PER_PACKAGE_BYTES, taking files
in the order of a hash of their path, so that no single large package (sympy, django) dominates.
HumanEval and anything the tests or benchmarks evaluate is not on the list and must never be.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

# name==version, all published as py3-none-any (or py2.py3) wheels. Documented in docs/training.md.
PYPI_PACKAGES = (
    "django==5.1.4", "sympy==1.13.3", "networkx==3.4.2", "pygments==2.18.0", "docutils==0.21.2",
    "sphinx==8.1.3", "requests==2.32.3", "urllib3==2.2.3", "flask==3.1.0", "werkzeug==3.1.3",
    "jinja2==3.1.4", "click==8.1.7", "rich==13.9.4", "attrs==24.2.0", "pyparsing==3.2.0",
    "packaging==24.2", "pytest==8.3.3", "setuptools==75.6.0", "twisted==24.11.0", "pylint==3.3.1",
    "astroid==3.3.5", "openpyxl==3.1.5", "paramiko==3.5.0", "bottle==0.13.2",
)
PER_PACKAGE_BYTES = 4_000_000
MAX_FILE_BYTES = 400_000  # generated tables, not code


def fetch_wheels(cache: Path) -> list[Path]:
    """Download the pinned wheels into `cache` (no-op when all are there); returns them sorted."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("*.whl"))
    if len(wheels) >= len(PYPI_PACKAGES):
        return wheels
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.11", "--platform", "any", "--implementation", "py", "--abi", "none",
        "-d", str(cache), *PYPI_PACKAGES,
    ]
    subprocess.run(cmd, check=True)
    return sorted(cache.glob("*.whl"))


def _path_hash(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16)


def wheel_sources(wheel: Path) -> dict[str, str]:
    """{`pypi/<wheel stem>/<member>`: text} for the UTF-8 `.py` members of one wheel, capped in bytes."""
    out: dict[str, str] = {}
    total = 0
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".py") and 0 < m.file_size <= MAX_FILE_BYTES]
        for member in sorted(members, key=lambda m: _path_hash(m.filename)):
            if total + member.file_size > PER_PACKAGE_BYTES:
                continue
            try:
                text = zf.read(member).decode("utf-8")
            except UnicodeDecodeError:
                continue
            out[f"pypi/{wheel.name.split('-')[0].lower()}/{member.filename}"] = text
            total += member.file_size
    return out


def pypi_sources(cache: Path) -> dict[str, str]:
    """All capped `.py` sources of the pinned wheels, keyed by a stable relative path."""
    texts: dict[str, str] = {}
    for wheel in fetch_wheels(cache):
        texts.update(wheel_sources(wheel))
    return texts
