"""Arrival orders shared by test modules (which never import each other)."""

import loadfsm
from loadfsm.models import build_model


def round_robin(config, state):
    """The checkpoint's tensors reordered: first piece of every layer, then every second..."""
    plan = loadfsm.LoadSession(build_model(config), device="cpu").plan
    by_layer: dict[str, list] = {}
    for name, tensor in state.items():
        by_layer.setdefault(plan.by_ckpt[name].name, []).append((name, tensor))
    queues = list(by_layer.values())
    return [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]
