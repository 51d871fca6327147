"""The full 7B state_dict layout, built on the meta device, against the official key list."""

from __future__ import annotations

import re

from owl2.checkpoint.io import RECOMPUTED_KEYS, build_empty
from owl2.model.config import Owl2Config
from tests.conftest import FIXTURES


def official_7b_entries() -> dict[str, tuple[tuple[int, ...], str]]:
    entries = {}
    for line in (FIXTURES / "keys_7b.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, kind, _ = line.split("\t")
        entries[key] = (tuple(int(x) for x in re.findall(r"\d+", shape)), kind)
    return entries


def test_parameter_names_and_shapes_match_the_official_7b_model():
    model = build_empty(Owl2Config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_7b_entries()
    assert len(official) == 894
    params = {k: shape for k, (shape, kind) in official.items() if kind == "param"}
    buffers = {k for k, (_, kind) in official.items() if kind == "buffer"}
    assert ours == params
    # Every persistent buffer of the official model is one owl2 recomputes (and ignores on load).
    assert len(buffers) == 44 and all(RECOMPUTED_KEYS.search(k) for k in buffers)
    assert sum(p.numel() for p in model.parameters()) == 8_197_859_328
    assert all(p.device.type == "meta" for p in model.parameters())
