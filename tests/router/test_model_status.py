"""The status tracker counts the router's own running replicas (it may autoscale), and each
router's shares follow that count."""

from __future__ import annotations

import asyncio

import pytest

from rayllm_app.router import model_status
from rayllm_app.router.headroom import Headroom
from rayllm_app.router.model_status import DeploymentOverview, ModelSpec, ModelStatusTracker


def overview(running: int) -> DeploymentOverview:
    return DeploymentOverview("HEALTHY", "", {"RUNNING": running, "STARTING": 1})


def test_router_count_follows_the_running_router_replicas(monkeypatch: pytest.MonkeyPatch):
    counts = iter([3, 3, 1, 0])
    monkeypatch.setattr(model_status, "_read_cluster_state",
                        lambda app: ({"router": overview(next(counts)), "model-a": overview(1)}, []))
    headroom = Headroom(routers=1)
    calls: list[int] = []
    tracker = ModelStatusTracker("rayllm", [ModelSpec("a", "model-a", [{"CPU": 1}], "PACK", 60, 60)],
                                 router_deployment="router", routers=1,
                                 on_routers=lambda n: (calls.append(n), headroom.set_routers(n)))

    async def refreshes() -> list[int]:
        seen = []
        for _ in range(4):
            await tracker.refresh()
            seen.append(tracker.routers)
        return seen

    assert asyncio.run(refreshes()) == [3, 3, 1, 1]  # none running (a restart) counts as one
    assert calls == [3, 1] and headroom.routers == 1  # told on changes only
    assert tracker.state("a").running_replicas == 1
