"""Shared fixtures: small checkpoints written once per session."""

from __future__ import annotations

import os

import pytest
import torch

from tests.checkpoints import save_checkpoint

torch.set_num_threads(int(os.environ.get("TGI_SPACE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A random SPACE-ready Llama checkpoint folder (float32)."""
    folder = tmp_path_factory.mktemp("llama")
    save_checkpoint(folder, "llama")
    return folder
