"""Fixtures shared by the inference, CLI, server, export and hardening tests (builders in grounding_helpers.py)."""

from __future__ import annotations

import pytest
from grounding_helpers import make_model_folder, scene

from simvg.inference.grounder import Grounder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random REC model folder, written through ``export_folder``; one per test module."""
    return make_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def grounder(folder):
    return Grounder.from_checkpoint(folder)


@pytest.fixture()
def image(tmp_path):
    """``grounding_helpers.scene()`` (two shapes, 96 x 64) as a PNG file."""
    path = tmp_path / "scene.png"
    scene().save(path)
    return path
