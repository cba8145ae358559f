"""Levers for identity per training step: the noisy-latent user classifier (classifier guidance, val_identity),
EDM2's power-function EMA and contrastive flow matching (Delta-FM)."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_DIT_MODEL_FLAGS, assert_user_error, make_module, run_main
from models.checkpoint import load_checkpoint, checkpoint_info
from models.latent_classifier import (NoisyLatentClassifier, classifier_entry, classifier_from_entry,
                                      classifier_log_prob_gradient)
from models.transport import classifier_guided_velocity, flow_matching_loss, other_class_pairs
from training.ema import power_ema_gamma
from training.latent_classifier import classifier_accuracy, train_latent_classifier

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


#################################################################################
#                          Classifier guidance, exactly                         #
#################################################################################

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


#################################################################################
#                          The classifier learns the users                      #
#################################################################################

def separable_latents(n_per_class: int = 40, classes: int = 3, seed: int = 0):
    """(N, 8, 4, 4) latents whose class moves one channel's mean by 2: clean latents are easy to tell apart,
    pure noise carries nothing."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 8, 4, 4, generator=g)
    x[torch.arange(len(y)), y] += 2.0
    return x, y


def test_noisy_latent_classifier_separates_users_at_t_1_and_knows_nothing_at_noise():
    x, y = separable_latents()
    val_x, val_y = separable_latents(seed=1)
    classifier = train_latent_classifier(x, y, num_classes=3, steps=300, seed=0)
    accuracy = classifier_accuracy(classifier, val_x, val_y, times=(0.0, 1.0))
    # Clean: a per-pixel shift of 2 sigma over 16 pixels is separable to ~100% by the Bayes rule.
    assert accuracy[1.0] > 0.9
    # t = 0 is pure noise: at most chance plus the binomial noise of 120 draws (3 sigma ~ 0.13).
    assert accuracy[0.0] < 1 / 3 + 0.15
    # Its entry rebuilds the same network.
    rebuilt = classifier_from_entry(classifier_entry(classifier))
    t = torch.full((4,), 0.5)
    torch.testing.assert_close(rebuilt(x[:4], t), classifier(x[:4], t))
    assert not any(p.requires_grad for p in rebuilt.parameters())


#################################################################################
#                       Power-function EMA, contrastive pairs                   #
#################################################################################

@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])   # EDM2, sec. 3.1
def test_power_ema_gamma_matches_edm2(sigma_rel, gamma):
    assert power_ema_gamma(sigma_rel) == pytest.approx(gamma, abs=0.01)
    with pytest.raises(ValueError, match="sigma_rel"):
        power_ema_gamma(0.3)


def test_power_ema_weights_each_step_by_its_power(latent_dir):
    """After T updates with beta_t = (1 - 1/t)^(g+1), the EMA is sum_t a_t theta_t / T^(g+1) with
    a_t = t^(g+1) - (t-1)^(g+1) (the recursion telescopes): fed theta_t = t, it lands on that average."""
    module = make_module(latent_dir, "--ema_std", "0.1")
    gamma = module.ema_schedule.gamma
    name, param = next((n, p) for n, p in module.model.named_parameters() if p.requires_grad)
    T = 50
    for step in range(1, T + 1):
        with torch.no_grad():
            param.fill_(float(step))
        module.update_ema(step)
    a = [t ** (gamma + 1) - (t - 1) ** (gamma + 1) for t in range(1, T + 1)]
    expected = sum(w * t for w, t in zip(a, range(1, T + 1))) / T ** (gamma + 1)
    ema_param = dict(module.ema.named_parameters())[name]
    assert float(ema_param.flatten()[0]) == pytest.approx(expected, rel=1e-4)
    # The default keeps its constant decay with the (1 + t) / (10 + t) warm-up.
    plain = make_module(latent_dir, "--ema_decay", "0.99")
    assert plain.ema_schedule(5) == pytest.approx(6 / 15) and plain.ema_schedule(10 ** 6) == 0.99


def test_other_class_pairs_only_pick_other_users():
    torch.manual_seed(0)
    y = torch.tensor([0, 0, 1, 2, 2, 1, 0])
    for _ in range(20):
        j = other_class_pairs(y)
        assert (j >= 0).all() and (y[j] != y).all()
    assert other_class_pairs(torch.tensor([4, 4, 4])).tolist() == [-1, -1, -1]


def test_contrastive_flow_matching_subtracts_the_distance_to_another_users_target():
    torch.manual_seed(0)
    x1, noise, t = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.rand(3)
    y = torch.tensor([0, 1, 1])
    pred = torch.randn(3, 2, 2, 2)

    def model(x_t, t_, y_):
        return pred
    negatives = torch.tensor([1, 0, -1])
    loss = flow_matching_loss(model, x1, y, t, noise, negatives=negatives, contrastive_weight=0.05)
    target = x1 - noise
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    expected = mse - 0.05 * torch.stack([(pred[0] - target[1]).pow(2).mean(), (pred[1] - target[0]).pow(2).mean(),
                                         torch.tensor(0.0)])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(flow_matching_loss(model, x1, y, t, noise), mse)


#################################################################################
#                   Stage 2 trains it, logs identity; stage 3 guides            #
#################################################################################

S2, S3 = "stage2_train_dit.py", "stage3_inference.py"


def stage2_flags(latent_dir, out, *extra, epochs: int = 2) -> list:
    return ["--latent_dir", latent_dir, "--output_dir", out, *TINY_DIT_MODEL_FLAGS, "--precision", "32-true",
            "--accelerator", "cpu", "--batch_size", "4", "--max_epochs", str(epochs), "--classifier_steps", "30",
            *extra]


def test_stage2_logs_val_identity_and_ships_the_classifier_to_stage3(latents_with_tokenizer, tokenizer, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    first = run_main(capsys, S2, *stage2_flags(latents_with_tokenizer, out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("noisy-latent user classifier") == 1
    with open(out / "lightning_logs" / "csv" / "metrics.csv") as f:
        identity = [float(r["val_identity"]) for r in csv.DictReader(f) if r.get("val_identity")]
    # The first validation always scores; later ones within the time share (training/sample_grid.py).
    assert 1 <= len(identity) <= 2 and all(0.0 <= v <= 1.0 for v in identity)
    entry = checkpoint_info(load_checkpoint(out / "checkpoints" / "last.ckpt")).latent_classifier
    assert entry is not None and entry["config"]["num_classes"] == 3
    # A longer run resumes with the classifier it has instead of training another.
    again = run_main(capsys, S2, *stage2_flags(latents_with_tokenizer, out, epochs=3))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "noisy-latent user classifier" not in again.stdout
    best = checkpoint_info(load_checkpoint(out / "checkpoints" / "best.ckpt")).latent_classifier
    torch.testing.assert_close(best["state_dict"], entry["state_dict"])
    # Stage 3 guides with it: other images than classifier-free guidance alone, the same for the same seed.
    common = ["--dit_checkpoint", out / "checkpoints" / "best.ckpt", "--vavae_path", tokenizer, "--user_ids", "1", "2",
              "--num_samples_per_user", "2", "--num_steps", "4", "--device", "cpu"]
    images = {}
    for name, extra in (("cfg", []), ("cg", ["--classifier_scale", "50"]), ("cg_again", ["--classifier_scale", "50"])):
        result = run_main(capsys, S3, *common, "--output_dir", tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        images[name] = (tmp_path / name / "micro_doppler_user01_001.png").read_bytes()
    assert images["cg"] != images["cfg"] and images["cg"] == images["cg_again"]


def test_classifier_guidance_without_a_classifier_is_refused(latent_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(capsys, S2, *stage2_flags(latent_dir, out, "--classifier_steps", "0")).returncode == 0
    ckpt = out / "checkpoints" / "best.ckpt"
    assert checkpoint_info(load_checkpoint(ckpt)).latent_classifier is None
    result = run_main(capsys, S3, "--dit_checkpoint", ckpt, "--vavae_path", tmp_path / "unused.safetensors",
                      "--output_dir", tmp_path / "gen", "--user_ids", "1", "--classifier_scale", "2")
    assert_user_error(result, r"--classifier_scale 2 needs the noisy-latent user classifier", r"--classifier_steps 0")


def test_sample_identity_is_one_for_a_person_specific_model_and_chance_for_one_that_ignores_the_user():
    """Data = a point mass per user: the exact conditional velocity carries noise to the user's own point, the
    label-blind one to a common point; a nearest-mean classifier scores the samples."""
    from training.latent_classifier import sample_identity
    torch.manual_seed(0)
    means = torch.randn(4, 2, 2, 2) * 3

    class NearestMean(torch.nn.Module):
        def forward(self, x, t):
            return -((x[:, None] - means[None]) ** 2).flatten(2).sum(-1)

    def person_specific(x, t, y):
        return (means[y] - x) / (1 - t.view(-1, 1, 1, 1))

    def label_blind(x, t, y):
        return (means[0] - x) / (1 - t.view(-1, 1, 1, 1))
    assert sample_identity(person_specific, NearestMean(), 4, 5, (2, 2, 2)) == 1.0
    assert sample_identity(label_blind, NearestMean(), 4, 5, (2, 2, 2)) == 0.25   # every sample is user 0's
