"""What stage 2 trains on besides the flow-matching loss (test_transport): the time-shift augmentation (told to the
model, 0 at sampling), the power-function EMA (EDM2), contrastive flow matching's negatives, and the noisy-latent
user classifier trained beside the DiT."""
import functools

import pytest
import torch

import training.dit_module as dm
from helpers import TINY_DIT, TINY_DIT_MODEL_FLAGS, assert_user_error, make_module, run_main, tiny_dit
from models.latent_classifier import classifier_entry, classifier_from_entry
from models.lightningdit import LightningDiT, TIME_SHIFT_TABLE, model_config
from models.transport import flow_matching_loss, other_class_pairs
from training.augment import random_time_shifts, shift_time
from training.ema import power_ema_gamma
from training.latent_classifier import classifier_accuracy, train_latent_classifier

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
S2 = "stage2_train_dit.py"


def tiny_config(**overrides) -> dict:
    return model_config("LightningDiT-S/2", num_classes=3, input_size=4, **TINY_DIT, **overrides)


def test_time_shift_condition_is_off_by_default_and_starts_as_a_no_op():
    plain = tiny_dit(num_classes=3).eval()                            # every weight noise: adaLN-Zero hides nothing
    conditioned = LightningDiT(**tiny_config(time_shift_cond=True)).eval()   # eval: no label dropout
    assert set(conditioned.state_dict()) - set(plain.state_dict()) == {TIME_SHIFT_TABLE}
    fresh_table = conditioned.state_dict()[TIME_SHIFT_TABLE]
    assert fresh_table.shape == (4, 32) and not fresh_table.any()     # a row per latent column, zero-initialised
    conditioned.load_state_dict({**plain.state_dict(), TIME_SHIFT_TABLE: fresh_table})
    x, t, y = torch.randn(2, 32, 4, 4), torch.rand(2), torch.tensor([0, 2])
    shift = torch.tensor([1, 3])
    with torch.no_grad():
        reference = plain(x, t, y)
        torch.testing.assert_close(conditioned(x, t, y, time_shift=shift), reference, rtol=0, atol=0)
        conditioned.time_shift_embedder.weight.normal_()
        # Trained: the shift changes the prediction, and no shift means row 0, as at sampling.
        assert not torch.allclose(conditioned(x, t, y, time_shift=shift), conditioned(x, t, y))
        torch.testing.assert_close(conditioned(x, t, y), conditioned(x, t, y, time_shift=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="time_shift_cond"):
        plain(x, t, y, time_shift=shift)


def test_shift_time_rolls_each_latent_along_time_by_its_own_shift():
    x = torch.randn(3, 2, 4, 5)
    shifts = torch.tensor([0, 1, 4])
    out = shift_time(x, shifts)
    for i, s in enumerate(shifts.tolist()):
        torch.testing.assert_close(out[i], torch.roll(x[i], s, dims=-1), rtol=0, atol=0)


def test_random_time_shifts_follow_the_probability():
    torch.manual_seed(0)
    assert random_time_shifts(100, 16, 0.0).eq(0).all()
    always = random_time_shifts(2000, 16, 1.0)
    assert always.min() == 1 and always.max() == 15          # a drawn shift is never the identity
    half = random_time_shifts(20000, 16, 0.5)
    assert half.ne(0).float().mean().item() == pytest.approx(0.5, abs=0.02)   # ~10 sigma of the binomial


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_training_step_trains_on_shifted_latents_told_their_shift(latent_dir, monkeypatch):
    plain = make_module(latent_dir)
    assert "time_shift_cond" not in plain.info.model_config     # off: the config (and key layout) as before
    module = make_module(latent_dir, "--time_shift_aug", "1")
    assert module.info.model_config["time_shift_cond"] is True  # recorded: stage 3 builds the same model
    seen = {}

    def recording_loss(model, x1, y, t, noise, cosine_weight=0.0, negatives=None, contrastive_weight=0.0):
        seen.update(model=model, x1=x1, t=t, noise=noise)
        return torch.zeros(len(x1), requires_grad=True)
    monkeypatch.setattr(dm, "flow_matching_loss", recording_loss)
    module.training_step(None, 0)
    shifts = seen["model"].keywords["time_shift"]
    assert isinstance(seen["model"], functools.partial) and shifts.ne(0).all()
    idx = module.batch_indices(0)
    torch.testing.assert_close(seen["x1"], shift_time(module.train_x[idx], shifts), rtol=0, atol=0)
    # t and the noise are drawn before the shifts: the same draws as a run without the augmentation.
    plain_seen = dict(seen)
    plain.training_step(None, 0)
    assert torch.equal(plain_seen["t"], seen["t"]) and torch.equal(plain_seen["noise"], seen["noise"])


def test_time_shift_aug_must_be_a_probability(latent_dir, tmp_path, capsys):
    result = run_main(capsys, S2, "--latent_dir", latent_dir, "--output_dir", tmp_path / "run", *TINY_DIT_MODEL_FLAGS,
                      "--accelerator", "cpu", "--time_shift_aug", "1.5")
    assert_user_error(result, r"--time_shift_aug: must be a finite number >= 0 and <= 1")   # checked when parsed


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
