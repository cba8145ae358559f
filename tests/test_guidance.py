"""Guidance at sampling time: classifier-free guidance with an interval (AB2 restarts where it switches),
autoguidance with a weaker checkpoint, and classifier guidance with stage 2's noisy-latent user classifier."""
import pytest
import torch
import torch.nn.functional as F

from common.errors import PipelineError
from generation.generate import check_sampling
from models.checkpoint import PipelineInfo
from models.latent_classifier import NoisyLatentClassifier, classifier_log_prob_gradient
from models.transport import classifier_guided_velocity, guidance_switches, guided_velocity, sample_ode

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def constant_model(value_of_label):
    """A velocity model whose output is value_of_label(y) everywhere; it records the labels it saw."""
    def model(x, t, y):
        model.seen.append(y.tolist())
        return torch.tensor([value_of_label(int(v)) for v in y]).view(-1, 1) * torch.ones_like(x)
    model.seen = []
    return model


def test_autoguidance_guides_with_the_conditional_prediction_of_the_guide():
    good = constant_model(lambda y: 10.0 + y)
    bad = constant_model(lambda y: 4.0 + y)   # the guide's conditional velocity, never its null class
    y = torch.tensor([1, 2])
    v = guided_velocity(good, y, null_class=9, scale=3.0, guide_model=bad)(torch.zeros(2, 3), torch.tensor(0.5))
    assert good.seen == [[1, 2]] and bad.seen == [[1, 2]]
    # v_bad + w (v_good - v_bad) = (4 + y) + 3 * 6
    torch.testing.assert_close(v[:, 0], torch.tensor([5.0 + 18, 6.0 + 18]))


def test_guidance_interval_end_leaves_late_steps_conditional_only():
    model = constant_model(lambda y: -1.0 if y == 9 else 1.0)
    velocity = guided_velocity(model, torch.tensor([0]), null_class=9, scale=4.0, interval_start=0.2,
                               interval_end=0.6)
    x = torch.zeros(1, 2)
    assert velocity(x, torch.tensor(0.1))[0, 0] == 1.0      # before: conditional
    assert velocity(x, torch.tensor(0.4))[0, 0] == 7.0      # inside: -1 + 4 (1 + 1)
    assert velocity(x, torch.tensor(0.8))[0, 0] == 1.0      # after the end: conditional again
    assert model.seen == [[0], [0, 9], [0]]


def test_ab2_restarts_at_both_ends_of_the_guidance_interval():
    """Piecewise-constant fields: Euler is exact on the grid, AB2 must match it by restarting at each switch
    (before the fix AB2 only knew one restart time and blended the fields across the end)."""
    model = constant_model(lambda y: -1.0 if y == 9 else 1.0)
    switches = guidance_switches(4.0, 0.3, 0.7)
    assert switches == (0.3, 0.7) and guidance_switches(1.0, 0.3, 0.7) == () and guidance_switches(4.0, 0, 1) == ()
    velocity = guided_velocity(model, torch.tensor([0]), null_class=9, scale=4.0, interval_start=0.3,
                               interval_end=0.7)
    x0 = torch.zeros(1, 2)
    euler = sample_ode(velocity, x0, 10, "euler", 1.0)
    # The grid points 0.3 and 0.7 are guided (closed interval): 0.3..0.7 inclusive is 5 steps of 7, 5 of 1.
    assert euler[0, 0].item() == pytest.approx(0.5 * 1 + 0.5 * 7)
    torch.testing.assert_close(sample_ode(velocity, x0, 10, "ab2", 1.0, restart_at=switches), euler)
    assert not torch.allclose(sample_ode(velocity, x0, 10, "ab2", 1.0, restart_at=switches[:1]), euler)


def info_for(**config) -> PipelineInfo:
    return PipelineInfo(model_config=config, users=["ID_1"], user_numbers=[1], latent_mean=torch.zeros(1),
                        latent_std=torch.ones(1))


def test_sampling_checks_the_interval_and_lets_autoguidance_skip_the_null_class():
    no_null = info_for(class_dropout_prob=0.0)
    with pytest.raises(PipelineError, match="null class"):
        check_sampling(no_null, 2.0, 16, 0.3)
    check_sampling(no_null, 2.0, 16, 0.3, autoguidance=True)   # the guide is another model, not the null class
    for start, end in ((0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.2)):
        with pytest.raises(PipelineError, match="cfg_interval_start < --cfg_interval_end"):
            check_sampling(info_for(), 2.0, 16, 0.3, start, end)


def point_mass_fields(means: torch.Tensor, x: torch.Tensor, t: float):
    """Data = a point mass at means[y] per class (equal priors), x0 ~ N(0, I), x_t = t x1 + (1 - t) x0.
    Returns (unconditional velocity, conditional velocities per class, log p(y | x_t) per class), all exact:
    v_y = (mu_y - x) / (1 - t), p(y | x) from the Gaussians N(t mu_y, (1 - t)^2 I)."""
    v_cond = (means[None] - x[:, None]) / (1 - t)                          # (N, K, D)
    log_lik = -((x[:, None] - t * means[None]) ** 2).sum(-1) / (2 * (1 - t) ** 2)
    log_post = log_lik.log_softmax(dim=1)                                  # (N, K)
    v = (log_post.exp()[..., None] * v_cond).sum(1)
    return v, v_cond, log_post


def test_classifier_guidance_at_scale_one_turns_the_unconditional_velocity_into_the_conditional_one():
    """With the exact posterior as the classifier, v + (1 - t)/t grad log p(y|x) is the class's own velocity:
    the (1 - t)/t factor of classifier_guided_velocity is the score-to-velocity conversion, not a tuning knob."""
    torch.manual_seed(0)
    means = torch.randn(3, 4) * 2
    x, y, t = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), 0.6

    def unconditional(x_, t_):
        return point_mass_fields(means, x_, float(t_))[0]

    def log_prob_gradient(x_, t_, y_):
        with torch.enable_grad():
            xg = x_.detach().requires_grad_(True)
            log_p = point_mass_fields(means, xg, float(t_[0]))[2].gather(1, y_[:, None]).sum()
            return torch.autograd.grad(log_p, xg)[0]

    guided = classifier_guided_velocity(unconditional, log_prob_gradient, y, scale=1.0, interval_start=0.1)
    expected = point_mass_fields(means, x, t)[1][torch.arange(5), y]
    torch.testing.assert_close(guided(x, torch.tensor(t)), expected, rtol=1e-4, atol=1e-4)
    # Outside the interval, and at scale 0, the velocity is left alone.
    late_only = classifier_guided_velocity(unconditional, log_prob_gradient, y, 1.0, interval_start=0.7)
    torch.testing.assert_close(late_only(x, torch.tensor(t)), unconditional(x, t))
    assert classifier_guided_velocity(unconditional, log_prob_gradient, y, 0.0) is unconditional


def test_classifier_gradient_is_the_gradient_of_its_log_probability():
    torch.manual_seed(0)
    classifier = NoisyLatentClassifier(in_channels=4, num_classes=3, width=8, depth=2).eval()
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([0.3, 0.9]), torch.tensor([2, 0])
    with torch.no_grad():   # the sampler's context: the gradient must still be taken
        grad = classifier_log_prob_gradient(classifier, x, t, y)
    direction = torch.randn_like(x)
    eps = 1e-3

    def log_p(z):
        return F.log_softmax(classifier(z, t).double(), -1).gather(1, y[:, None]).sum()
    with torch.no_grad():
        numeric = (log_p(x + eps * direction) - log_p(x - eps * direction)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=2e-2, abs=1e-4)
