"""The main job (README command 1) runs, learns, and writes its plot."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from workers.demos import train  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_main_job_trains_digits_through_the_service(ray_cluster, tmp_path):
    out = train.train(num_workers=2, num_shards=2, epochs=4, progress=False)
    assert [p["role"] for p in out["placements"]] == ["coordinator", "primary", "primary"]
    assert out["steps"] == 4 * (1438 // 64)
    assert len(out["history"]["loss"]) == out["steps"]
    assert out["history"]["loss"][-1] < out["history"]["loss"][0] / 4
    assert out["test_accuracy"] > 0.85
    assert out["replicas_equal"], "every worker ends with the server's weights"
    # the cosine schedule reached the workers' view of the lr
    assert out["history"]["lr"][-1] < out["history"]["lr"][0]
    train.plot(out["history"], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
