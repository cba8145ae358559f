"""Flow-matching objective, guidance and samplers on problems with known answers."""
import math

import pytest
import torch

from models.transport import (SAMPLERS, CountedVelocity, flow_matching_loss, guided_velocity, sample_ode,
                              sample_timesteps, time_grid)


def test_loss_is_zero_for_the_true_velocity_and_mse_otherwise():
    x1, noise, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.rand(4)
    y = torch.zeros(4, dtype=torch.long)

    def oracle(x_t, t_, y_):
        # Recover the velocity from x_t and the known noise: x_t = t x1 + (1 - t) x0 -> u = (x_t - x0) / t.
        return (x_t - noise) / t_.view(-1, 1, 1, 1)
    assert flow_matching_loss(oracle, x1, y, t, noise).abs().max() < 1e-5
    zero = flow_matching_loss(lambda x_t, t_, y_: torch.zeros_like(x_t), x1, y, t, noise)
    torch.testing.assert_close(zero, (x1 - noise).pow(2).mean(dim=(1, 2, 3)))
    with_cos = flow_matching_loss(lambda x_t, t_, y_: -(x1 - noise), x1, y, t, noise, cosine_weight=1.0)
    torch.testing.assert_close(with_cos, 4 * (x1 - noise).pow(2).mean(dim=(1, 2, 3)) + 2.0)


def test_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(20000, "uniform", generator=g)
    ln = sample_timesteps(20000, "logit_normal", generator=g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 1 / math.sqrt(12)) < 0.01
    assert abs(ln.median() - 0.5) < 0.01 and ln.std() < u.std()      # mass pulled to the middle
    with pytest.raises(ValueError):
        sample_timesteps(2, "cosine")


def test_time_grid_and_shift():
    plain, shifted = time_grid(10), time_grid(10, shift=0.3)
    assert plain[0] == shifted[0] == 0 and len(plain) == 11
    assert plain[-1] == 1 and shifted[-1] == pytest.approx(1.0, abs=1e-12)
    assert (shifted[1:-1] < plain[1:-1]).all()                          # more steps near the noise end
    assert torch.all(shifted[1:] > shifted[:-1])


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("ab2", 2)])
def test_fixed_step_samplers_converge_at_their_order(sampler, order):
    """dx/dt = -x + cos(3t): error(h) / error(h/2) -> 2^order."""
    x0 = torch.tensor([[1.0, -0.5]], dtype=torch.float64)

    def velocity(x, t):
        return -x + torch.cos(3 * t)
    exact = _exact(x0)
    errors = [(sample_ode(velocity, x0, n, sampler, 1.0).double() - exact).abs().max().item() for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(2 ** order, rel=0.25)


def test_dopri5_is_accurate():
    x0 = torch.tensor([[1.0, -0.5]])
    out = sample_ode(lambda x, t: -x + torch.cos(3 * t), x0, 0, "dopri5", 1.0)
    # rtol 1e-3 as in the reference; a fixed 16-step Euler is ~20x further off.
    assert (out.double() - _exact(x0.double())).abs().max() < 2e-3


def _exact(x0):
    # x(1) for dx/dt = -x + cos(3t): x = C e^-t + (cos 3t + 3 sin 3t) / 10, C = x0 - 1/10.
    return (x0 - 0.1) * math.exp(-1) + (math.cos(3) + 3 * math.sin(3)) / 10


def test_evaluation_counts():
    velocity = CountedVelocity(lambda x, t: torch.zeros_like(x))
    for sampler, expected in (("euler", 8), ("heun", 2 * 8 - 1), ("ab2", 8)):
        velocity.calls = 0
        sample_ode(velocity, torch.zeros(1, 2), 8, sampler, 1.0)
        assert velocity.calls == expected
    assert set(SAMPLERS) == {"euler", "heun", "ab2", "dopri5"}
    with pytest.raises(ValueError):
        sample_ode(velocity, torch.zeros(1, 2), 4, "rk4", 1.0)


def test_guidance_combines_cond_and_uncond_in_one_batched_call():
    seen = []

    def model(x, t, y):
        seen.append(y.tolist())
        # cond velocity = label value, uncond (null = 9) = -1
        return torch.where(y == 9, -1.0, y.float()).view(-1, 1) * torch.ones_like(x)
    y = torch.tensor([2, 5])
    v = guided_velocity(model, y, null_class=9, scale=3.0)(torch.zeros(2, 4), torch.tensor(0.5))
    assert seen == [[2, 5, 9, 9]]
    torch.testing.assert_close(v[:, 0], torch.tensor([-1 + 3 * (2 + 1), -1 + 3 * (5 + 1)], dtype=torch.float32))
    seen.clear()
    early = guided_velocity(model, y, null_class=9, scale=3.0, interval_start=0.6)(torch.zeros(2, 4), torch.tensor(0.5))
    assert seen == [[2, 5]] and early[:, 0].tolist() == [2.0, 5.0]   # before the interval: conditional only


@pytest.mark.parametrize("sampler", ["euler", "heun", "ab2"])
@pytest.mark.parametrize("shift", [0.0, -0.5])
def test_shift_must_be_positive(sampler, shift):
    with pytest.raises(ValueError, match="shift must be > 0"):
        sample_ode(lambda x, t: torch.ones_like(x), torch.zeros(1, 2), 4, sampler, shift)


def test_ab2_restarts_where_guidance_switches_on():
    """Guidance from t = 0.4 on: the velocity jumps from v_c = 1 to v_u + 4 (v_c - v_u) = 7 there. Each field
    is constant, so Euler is exact on the grid; AB2 must not extrapolate across the jump from the old field."""
    def model(x, t, y):
        return torch.where(y == 9, -1.0, 1.0).view(-1, 1) * torch.ones_like(x)
    velocity = guided_velocity(model, torch.tensor([0]), null_class=9, scale=4.0, interval_start=0.4)
    x0 = torch.zeros(1, 2)
    euler = sample_ode(velocity, x0, 10, "euler", 1.0)
    ab2 = sample_ode(velocity, x0, 10, "ab2", 1.0, restart_at=0.4)
    torch.testing.assert_close(ab2, euler)
    assert euler[0, 0].item() == pytest.approx(0.4 * 1 + 0.6 * 7)
    blended = sample_ode(velocity, x0, 10, "ab2", 1.0)                # without the restart: ~0.3 too far
    assert blended[0, 0].item() == pytest.approx(euler[0, 0].item() + 0.1 * 0.5 * (7 - 1))
