"""Projection shapes of the default model of ``benchmarks/throughput.py`` (Llama, hidden 2048, MLP 8192,
32 heads / 8 KV heads), shared by the per-shape benchmark scripts."""

from __future__ import annotations

#: (in, out) of each adapted projection of one decoder layer
PROJECTIONS = {
    "q": (2048, 2048),
    "k": (2048, 512),
    "v": (2048, 512),
    "o": (2048, 2048),
    "gate": (2048, 8192),
    "up": (2048, 8192),
    "down": (8192, 2048),
}


def distinct_shapes() -> dict[str, tuple[tuple[int, int], int]]:
    """Each distinct (in, out) once, named after its projections (e.g. "q/o"), with its count per layer."""
    names: dict[tuple[int, int], list[str]] = {}
    for name, shape in PROJECTIONS.items():
        names.setdefault(shape, []).append(name)
    return {"/".join(group): (shape, len(group)) for shape, group in names.items()}
