"""Shared fixtures: small synthetic datasets written once per session."""

from __future__ import annotations

import os

import pytest

# Tests never reach the network: the Hub and any endpoint are loopback servers started by the tests.
os.environ["HF_HUB_OFFLINE"] = "1"  # the Hub tests point the libraries at a loopback server themselves
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def fixture_folder(tmp_path_factory):
    """A small dataset folder in our layout (30 rows per domain, 10 eval rows per test split)."""
    from builder.dev.fixture import write_fixture

    root = tmp_path_factory.mktemp("fixture") / "spa_vl"
    write_fixture(root, rows_per_domain=30, eval_rows=10, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_llava_data(tmp_path_factory):
    """{"model": a tiny random-weight LLaVA folder, "data": a fixture folder of 12 rows per domain}: the
    trainers' tests read both and write nothing into them."""
    from builder.dev.fixture import write_fixture
    from builder.dev.tiny_vlm import build_tiny_llava

    root = tmp_path_factory.mktemp("tiny_llava_data")
    model = build_tiny_llava(root / "tiny-llava", seed=0)
    write_fixture(root / "spa_vl", rows_per_domain=12, eval_rows=2, progress=False)
    return {"model": str(model), "data": str(root / "spa_vl")}


@pytest.fixture(scope="session")
def tiny_qwen_data(tiny_llava_data, tmp_path_factory):
    """{"model": a tiny random-weight Qwen2.5-VL folder (Qwen's real formats), "data": the same fixture folder
    as ``tiny_llava_data``}."""
    from builder.dev.tiny_vlm import build_tiny_qwen2_5_vl

    model = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen") / "tiny-qwen", seed=0)
    return {"model": str(model), "data": tiny_llava_data["data"]}
