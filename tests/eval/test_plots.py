"""mole.eval.plots: each figure is a real PNG of the size its layout asks for, written atomically."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mole.cluster.clustering import project_2d
from mole.eval.plots import cluster_map, loss_curves, per_cluster_loss, routing_heatmap, token_routing, variant_bars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 110


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)  # (H, W, 4) floats in [0, 1]; fails on a damaged file


def _only(directory: Path, name: str) -> None:
    assert [p.name for p in directory.iterdir()] == [name]  # no temp file left beside it


def test_loss_curves_with_a_joint_phase(tmp_path: Path) -> None:
    metrics = {"expert_00": [3.0, 2.5, 2.1], "expert_01": [3.1, 2.9], "multitask_lora": [3.2, 2.7, 2.4, 2.2]}
    out = loss_curves(metrics, [2.3, 2.2, 2.25], tmp_path / "loss_curves.png")
    assert out == tmp_path / "loss_curves.png"
    assert _png_size(out) == (11 * DPI, 4 * DPI)  # two panels side by side
    img = _pixels(out)
    assert img.shape[:2] == (4 * DPI, 11 * DPI) and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 10
    _only(tmp_path, "loss_curves.png")


def test_loss_curves_without_a_joint_phase_has_one_panel(tmp_path: Path) -> None:
    out = loss_curves({"expert_00": [3.0, 2.0]}, None, tmp_path / "l.png")
    assert _png_size(out) == (round(6.5 * DPI), 4 * DPI)
    empty = loss_curves({}, None, tmp_path / "empty.png")  # no expert trained: still a figure, no legend error
    assert _png_size(empty) == (round(6.5 * DPI), 4 * DPI)


def test_per_cluster_loss(tmp_path: Path) -> None:
    variants = {
        "base": {"per_cluster": {"0": {"loss": 3.0, "rows": 5}, "1": {"loss": 3.2, "rows": 4}}},
        "mole": {"per_cluster": {"0": {"loss": 2.6, "rows": 5}, "1": {"loss": None, "rows": 4}}},  # None: no bar
    }
    out = per_cluster_loss(variants, tmp_path / "per_cluster_loss.png")
    # width max(6, 0.25 * clusters * variants + 2) inches, height 4.2
    assert _png_size(out) == (6 * DPI, round(4.2 * DPI))
    many = {f"v{j}": {"per_cluster": {str(c): {"loss": 1.0 + c + j, "rows": 3} for c in range(6)}} for j in range(4)}
    assert _png_size(per_cluster_loss(many, tmp_path / "many.png")) == (8 * DPI, round(4.2 * DPI))
    assert _pixels(out).std() > 0.05  # bars and text, not a blank canvas


def test_routing_heatmap(tmp_path: Path) -> None:
    util = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]
    out = routing_heatmap(util, ["expert_00", "expert_01", "expert_02"], tmp_path / "routing_heatmap.png")
    # width max(5, 0.8 * E + 2.5) inches, height max(3, 0.35 * L + 1.8)
    assert _png_size(out) == (5 * DPI, 3 * DPI)
    _only(tmp_path, "routing_heatmap.png")
    big = routing_heatmap(np.full((30, 8), 1 / 8).tolist(), [f"e{i}" for i in range(8)], tmp_path / "big.png")
    assert _png_size(big) == (round(8.9 * DPI), round(12.3 * DPI))


def test_routing_heatmap_refuses_a_shape_that_does_not_match_the_experts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected \(L, 2\) utilization, got shape \(2, 3\)"):
        routing_heatmap([[0.5, 0.25, 0.25]] * 2, ["a", "b"], tmp_path / "h.png")
    assert not any(tmp_path.iterdir())


def test_cluster_map_has_a_domain_panel_only_when_rows_have_domains(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, size=(20, 5)) for c in (0.0, 3.0)])  # two blobs in 5-D
    centroids = np.stack([x[:20].mean(0), x[20:].mean(0)])
    proj = project_2d(x, centroids, seed=0)
    assert proj["points"].shape == (40, 2) and proj["centers"].shape == (2, 2)
    # the blobs lie apart along PC 1, and each centroid lands on its blob's mean there
    assert abs(proj["points"][:20, 0].mean() - proj["points"][20:, 0].mean()) > 4
    assert proj["centers"][:, 0] == pytest.approx([proj["points"][:20, 0].mean(), proj["points"][20:, 0].mean()])
    labels = [0] * 20 + [1] * 20
    one = cluster_map(proj["points"], labels, tmp_path / "one.png", centers=proj["centers"])
    assert _png_size(one) == (round(5.5 * DPI), round(4.8 * DPI))
    two = cluster_map(proj["points"], labels, tmp_path / "two.png", domains=["bible"] * 25 + ["man"] * 15)
    assert _png_size(two) == (11 * DPI, round(4.8 * DPI))  # a second panel: by domain
    assert _pixels(two).std() > 0.05
    with pytest.raises(ValueError, match=r"expected \(3, 2\) points"):
        cluster_map(proj["points"], [0, 1, 0], tmp_path / "bad.png")
    assert project_2d(x[:1], centroids[:1], seed=0)["points"].tolist() == [[0.0, 0.0]]  # one row: no spread


def test_variant_bars(tmp_path: Path) -> None:
    variants = {"base": {"loss": 3.0, "exact_match": 0.1}, "multitask_lora": {"loss": 2.4, "exact_match": 0.5},
                "mole": {"loss": 2.3, "exact_match": None}}  # fmt: skip
    out = variant_bars(variants, tmp_path / "variants.png")
    # per panel max(4, 0.65 * variants + 1.5) inches wide, height 4.2
    assert _png_size(out) == (8 * DPI, round(4.2 * DPI))
    assert _pixels(out).std() > 0.05
    _only(tmp_path, "variants.png")
    text_only = {n: {**v, "exact_match": None} for n, v in variants.items()}  # no answers anywhere: loss panel only
    assert _png_size(variant_bars(text_only, tmp_path / "t.png")) == (4 * DPI, round(4.2 * DPI))


def test_token_routing_shows_the_last_tokens_when_asked(tmp_path: Path) -> None:
    from mole.routing.explain import Explanation

    weights = np.zeros((2, 100, 3), np.float32)  # (L, T, E): token t goes to expert t % 3
    weights[:, np.arange(100), np.arange(100) % 3] = 1.0
    exp = Explanation(prompt="p", completion="c", token_ids=list(range(100)), tokens=[f"t{i}" for i in range(100)],
                      n_prompt=90, experts=["e0", "e1", "e2"], per_block=weights, routing="token_topk")  # fmt: skip
    whole = token_routing([exp], tmp_path / "whole.png")
    cut = token_routing([exp], tmp_path / "cut.png", max_tokens=20)
    # width max(6, 0.28 * tokens shown + 2) inches; height 0.35 * experts + 1.2 per panel
    assert _png_size(whole) == (round(0.28 * 100 * DPI + 2 * DPI), int(2.25 * DPI))
    assert _png_size(cut) == (round(7.6 * DPI), int(2.25 * DPI))
    assert _png_size(token_routing([exp], tmp_path / "b.png", per_block=True))[1] == int(3 * 2.25 * DPI)
