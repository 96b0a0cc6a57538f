"""The training-free weight map: the untrained map is direct application, and it refuses weights it was not built
for."""

import pytest
import torch

from raysys.core.recycle import WeightMismatchError
from raysys.core.weight_map import WeightMap, mapped_names


def test_an_untrained_weight_map_is_direct_application():
    state = {"a.lora_A.default.weight": torch.randn(4, 6), "b.adapter.up.weight": torch.randn(6, 3)}
    weight_map = WeightMap({k: v.shape for k, v in state.items()}, rank=2)
    mapped = weight_map(state)
    assert all(torch.equal(mapped[k], state[k]) for k in state)
    with pytest.raises(WeightMismatchError, match="lora_A"):
        weight_map({"b.adapter.up.weight": state["b.adapter.up.weight"]})


def test_only_the_modules_matrices_are_mapped():
    state = {"x.lora_A.default.weight": torch.zeros(2, 3), "x.adapter.down.bias": torch.zeros(3),
             "roberta.embeddings.LayerNorm.weight": torch.zeros(3), "classifier.dense.weight": torch.zeros(3, 3)}
    assert mapped_names(state) == ["x.lora_A.default.weight"]
