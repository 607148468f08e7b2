"""Shared fixtures: small checkpoints written once per session."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from tests.checkpoints import save_checkpoint

torch.set_num_threads(int(os.environ.get("TGI_SPACE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A CLI under test (the shard's, serve's) points the root logger at the sys.stdout of its moment, which
    CliRunner swaps: left in place, later tests' log records landed in another CliRunner's captured output
    (a `generate --json` after the shard CLI's tests read a log line after its JSON)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A random SPACE-ready Llama checkpoint folder (float32)."""
    folder = tmp_path_factory.mktemp("llama")
    save_checkpoint(folder, "llama")
    return folder
