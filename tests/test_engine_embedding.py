"""The engine's Embedding: nn.Embedding's initialisation and layout, hand-written gradients, bad ids."""

import pytest
import torch
from torch import nn

from bp_apps.engine import Embedding
from bp_apps.engine.gradcheck import relative_error


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_matches_nn_embedding(sparse: bool, padding_idx: int | None) -> None:
    torch.manual_seed(3)
    layer = Embedding(11, 5, padding_idx=padding_idx, sparse=sparse, dtype=torch.float64)
    torch.manual_seed(3)
    twin = nn.Embedding(11, 5, padding_idx=padding_idx, dtype=torch.float64)
    assert torch.equal(layer.weight, twin.weight)
    twin.load_state_dict(layer.state_dict())
    for step in range(3):  # sparse mode must clear the previous batch's rows
        ids = torch.randint(0, 11, (4, 7 - step))
        ids[0, :3] = 2  # repeated ids accumulate
        grad = torch.randn(*ids.shape, 5, dtype=torch.float64)
        out = layer.forward(ids)
        assert torch.equal(out, twin(ids))
        layer.backward(grad)
        twin.zero_grad()
        twin(ids).backward(grad)
        assert relative_error(layer.weight_grad, twin.weight.grad) <= 1e-12
    if padding_idx is not None:
        assert torch.count_nonzero(layer.weight_grad[padding_idx]) == 0
    if sparse:
        assert torch.equal(layer.touched, torch.unique(ids))


def test_bad_ids_name_the_layer() -> None:
    layer = Embedding(4, 2)
    with pytest.raises(IndexError, match="Embedding: id 4 is outside the table of 4"):
        layer.forward(torch.tensor([[0, 4]]))
    with pytest.raises(IndexError, match="Embedding: id -1"):
        layer.forward(torch.tensor([-1]))
    with pytest.raises(TypeError, match="Embedding: ids must be"):
        layer.forward(torch.tensor([0.0]))
    layer.forward(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="grad_output must be"):
        layer.backward(torch.zeros(3, 2))
