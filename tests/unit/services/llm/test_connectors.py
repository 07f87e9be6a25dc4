import pytest
import torch

from services.common.errors import InvalidArgumentError
from services.llm.connectors import CONNECTORS, build_connector


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_connectors_map_tokens_into_the_llm_width(kind):
    conn = build_connector(kind, in_dim=32, out_dim=48)
    out = conn(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 48)
    assert conn.num_tokens(5) == 5


def test_mlp2x_gelu_is_linear_gelu_linear():
    conn = build_connector("mlp2x_gelu", in_dim=8, out_dim=16)
    x = torch.randn(1, 3, 8)
    expected = conn.fc2(torch.nn.functional.gelu(conn.fc1(x)))
    assert torch.allclose(conn(x), expected)
    assert [n for n, _ in conn.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_unknown_type_and_wrong_input_width():
    with pytest.raises(
        InvalidArgumentError, match=r"expected one of \['linear', 'mlp2x_gelu'\], got 'qformer'"
    ):
        build_connector("qformer", in_dim=8, out_dim=8)
    conn = build_connector("linear", in_dim=8, out_dim=8)
    with pytest.raises(InvalidArgumentError, match=r"expected \(batch, tokens, 8\), got \(1, 3, 7\)"):
        conn(torch.randn(1, 3, 7))
