"""Server-level tests: the real `text-generation-server` process under the Python router emulation.

This folder is not a package (its name has a dash), so its modules import as top-level names; the
repository root goes on sys.path so `tests.router_emulation` and `tests.checkpoints` import under a
bare `pytest` too, not only under `python -m pytest`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.checkpoints import save_checkpoint  # noqa: E402

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
BUNDLED_MODEL = ROOT / "models" / "tiny-space-py"

torch.set_num_threads(int(os.environ.get("TGI_SPACE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def random_llama_dir(tmp_path_factory) -> Path:
    """A random SPACE-ready Llama checkpoint (seed 0, float32, word-level tokenizer)."""
    folder = tmp_path_factory.mktemp("llama")
    save_checkpoint(folder, "llama")
    return folder


def check_snapshot(name: str, data: object) -> None:
    """Compare `data` with snapshots/{name}.json; write it when missing or when UPDATE_SNAPSHOTS=1."""
    path = SNAPSHOTS / f"{name}.json"
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1" or not path.exists():
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    expected = json.loads(path.read_text())
    assert json.loads(text) == expected, f"generations differ from {path.name}; rerun with UPDATE_SNAPSHOTS=1 if intended"
