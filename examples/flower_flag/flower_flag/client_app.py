"""ClientApp: Flagstaff's local SGD trainer on each node's digits shard."""

from __future__ import annotations

from flagstaff.clients.flower_app import make_client_app
from flower_flag.task import setup

app = make_client_app(setup)
