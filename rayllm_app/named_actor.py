"""A detached Ray actor that every process of the app finds by name: the embedded stores
(key budgets in rayllm_app.tenancy, stored Responses in rayllm_app.conversations).

The first caller creates it and the others attach (``get_if_exists``); it outlives the
process that happened to create it (``lifetime="detached"``), takes no CPU so it never blocks
a model's placement, and Ray restarts it if it dies (``max_restarts=-1``). The handle is
looked up on first use, not at construction, so a store can be built before ``ray.init``.
"""

from __future__ import annotations

from typing import Any

import ray


class NamedActor:
    def __init__(self, actor_class: Any, name: str, namespace: str, *args: Any, **options: Any) -> None:
        self.actor_class = actor_class
        self.name = name
        self.namespace = namespace
        self.args = args
        self.options = options
        self._handle = None

    def handle(self) -> Any:
        """The handle; creating or finding the actor is one short blocking call to the GCS."""
        if self._handle is None:
            self._handle = self.actor_class.options(
                name=self.name, namespace=self.namespace, lifetime="detached", get_if_exists=True,
                num_cpus=0, max_restarts=-1, **self.options,
            ).remote(*self.args)
        return self._handle

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle(), method).remote(*args)
        except ray.exceptions.RayActorError:
            self._handle = None  # killed for good (not restarted): look it up or create it anew
            raise

    def forget(self) -> None:
        """Drop the handle only: the actor is shared and stays."""
        self._handle = None
