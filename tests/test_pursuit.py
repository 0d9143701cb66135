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
    with pytest.raises(ValueError, match="target_l0 must be an int between 1 and 64"):
        gradient_pursuit(torch.randn(2, 32), D, 0)


# ---------------------------------------------------------------- selection rules

# A hand-made dictionary where the two rules differ (r: residual, c: correlations).
# x = (2, 1), features (1, 0), (-0.6, 0.8), (0, -1), (-1, 1)/sqrt(2):
# step 1: c = (2, -0.4, -1, -0.71): both pick 0; w0 = 2, r = (0, 1)
# step 2: c = (0, 0.8, -1, 0.71): both pick 1; w1 = 0.8, r = (0.48, 0.36)
# step 3: c = (0.48, 0, -0.36, -0.085): the argmax, 0, is already active.
#   "all" picks 0 again (the active set stays {0, 1}): w0 = 2.48, r = (0, 0.36);
#   "inactive" must add 3; its step along g = (0.48, 0, 0, -0.085) gives w0 = 2.386
# step 4 ("all"): c = (0, 0.288, -0.36, 0.255): picks 1 again, w1 = 1.088;
#   "inactive" adds 2, the last inactive feature.
HAND_D = torch.tensor([[1.0, 0.0], [-0.6, 0.8], [0.0, -1.0], [-0.5 ** 0.5, 0.5 ** 0.5]])
HAND_X = torch.tensor([2.0, 1.0])


@pytest.mark.parametrize("step", ["feasible", "clip"])
def test_selection_rules_pick_differently_on_a_hand_made_dictionary(step):
    inactive = gradient_pursuit(HAND_X, HAND_D, 3, step=step, selection="inactive")
    every = gradient_pursuit(HAND_X, HAND_D, 3, step=step, selection="all")
    assert inactive.order.tolist() == [[0, 1, 3]]
    assert every.order.tolist() == [[0, 1, 0]]
    torch.testing.assert_close(every.weights, torch.tensor([[2.48, 0.8, 0.0, 0.0]]))
    assert inactive.weights[0, 0].item() == pytest.approx(2 + 0.48 * 0.2376 / 0.2952, abs=1e-4)
    four = gradient_pursuit(HAND_X, HAND_D, 4, step=step, selection="all")
    assert four.order.tolist() == [[0, 1, 0, 1]]            # L0 stays 2 < target 4
    torch.testing.assert_close(four.weights, torch.tensor([[2.48, 1.088, 0.0, 0.0]]))
    assert gradient_pursuit(HAND_X, HAND_D, 4, step=step, selection="inactive").order.tolist() \
        == [[0, 1, 3, 2]]
    assert torch.equal(gradient_pursuit(HAND_X, HAND_D, 3, step).order, inactive.order)  # default


def authors_grad_pursuit(x, D, target_l0):
    """Their micrlhf/utils/ito.py grad_pursuit (pos_only=True), one vector, in torch."""
    w = torch.zeros(D.shape[0])
    for _ in range(target_l0):
        r = x - w @ D
        c = D @ r
        selected = w != 0
        selected[c.argmax()] = True
        g = selected * c
        gD = g @ D
        w = (w + (gD @ r) / (gD @ gD) * g).clamp(min=0)
    return w


def test_all_with_clip_is_the_authors_algorithm():
    D = random_dictionary(F=96, d=24, seed=4)
    x = torch.randn(12, 24, generator=torch.Generator().manual_seed(6))
    for k in (1, 7, 20):
        ours = gradient_pursuit(x, D, k, step="clip", selection="all").weights
        theirs = torch.stack([authors_grad_pursuit(row, D, k) for row in x])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
        assert ((ours > 0).sum(-1) <= k).all()


def test_all_selection_error_never_increases_with_feasible_steps():
    D = random_dictionary(F=128, d=16)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    errors = gradient_pursuit(x, D, 30, selection="all").errors
    assert (errors[1:] <= errors[:-1] + 1e-5).all()


def test_invalid_arguments_are_refused_with_the_fix():
    D = random_dictionary()
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="selection='best'.*selection='inactive'.*'all'"):
        gradient_pursuit(x, D, 4, selection="best")
    with pytest.raises(ValueError, match="step='exact'.*step='feasible'.*step='clip'"):
        gradient_pursuit(x, D, 4, step="exact")
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="x holds 1 NaN or infinite"):
        gradient_pursuit(x, D, 4)
    bad = D.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="dictionary holds 1 NaN or infinite"):
        gradient_pursuit(torch.randn(2, 32), bad, 4)
