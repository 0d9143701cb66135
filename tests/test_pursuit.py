import pytest
import torch

from tvlib.pursuit import gradient_pursuit


def random_dictionary(F=64, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(F, d, generator=g)
    return D / D.norm(dim=-1, keepdim=True)


def sparse_codes(B, F, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(B, F)
    for row in range(B):
        idx = torch.randperm(F, generator=g)[:k]
        w[row, idx] = 0.5 + torch.rand(k, generator=g)
    return w


def test_recovers_support_of_known_sparse_codes():
    D = random_dictionary(F=64, d=48)             # overcomplete, incoherent
    true = sparse_codes(B=16, F=64, k=3)
    result = gradient_pursuit(true @ D, D, target_l0=3)
    assert torch.equal(result.weights > 0, true > 0)
    assert (result.errors[-1] < 0.1 * result.errors[0]).all()


def test_recovers_exact_codes_in_orthonormal_dictionary():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
    true = sparse_codes(B=8, F=32, k=5)
    result = gradient_pursuit(true @ q.T, q.T, target_l0=5)
    torch.testing.assert_close(result.weights, true, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("step", ["feasible", "clip"])
def test_nonnegative_and_l0_bounded(step):
    D = random_dictionary()
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(5))
    for k in (1, 5, 12):
        result = gradient_pursuit(x, D, target_l0=k, step=step)
        assert (result.weights >= 0).all()
        assert ((result.weights > 0).sum(-1) <= k).all()
        assert result.order.shape == (20, k)


def test_error_never_increases():
    D = random_dictionary(F=128, d=16)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    errors = gradient_pursuit(x, D, target_l0=30).errors        # (31, B)
    assert (errors[1:] <= errors[:-1] + 1e-5).all()
    assert (errors[-1] < errors[0]).all()


def test_single_vector_and_errors():
    D = random_dictionary()
    assert gradient_pursuit(torch.randn(32), D, 4).weights.shape == (1, 64)
    with pytest.raises(ValueError, match="width 31"):
        gradient_pursuit(torch.randn(2, 31), D, 4)
    with pytest.raises(ValueError, match="target_l0 must be between 1 and 64"):
        gradient_pursuit(torch.randn(2, 32), D, 0)
