"""The tokenizer's texture losses: the PatchGAN and its hinge/adaptive weight, LPIPS and where its weights come from."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from common.errors import PipelineError
from tokenizer.losses import (LPIPS, Adversary, PatchDiscriminator, adaptive_weight, build_discriminator,
                                       build_lpips, discriminator_from_state_dict, generator_loss, hinge_d_loss,
                                       training_loss_weights)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_WIDTHS = (4, 8, 8, 16, 16)        # VGG-16's layout at a fraction of its width: same keys, small files
# The published VA-VAE's loss.discriminator.* keys (LDM's NLayerDiscriminator, n_layers 3, BatchNorm)
PUBLISHED_DISC_KEYS = ["main.0.weight", "main.0.bias", "main.2.weight"] + [
    f"main.{i}.{p}" for i in (3,) for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")] + [
    "main.5.weight"] + [f"main.6.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")] + [
    "main.8.weight"] + [f"main.9.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")] + [
    "main.11.weight", "main.11.bias"]
PUBLISHED_LPIPS_CONVS = [f"net.slice{k}.{i}" for k, idx in
                         ((1, (0, 2)), (2, (5, 7)), (3, (10, 12, 14)), (4, (17, 19, 21)), (5, (24, 26, 28)))
                         for i in idx]


def fake_lpips_state_dict(widths=TINY_WIDTHS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LPIPS weights in the published layout; the linear layers non-negative as trained LPIPS's are."""
    torch.manual_seed(seed)
    sd = LPIPS(widths).state_dict()
    return {k: (v.abs() if k.startswith("lin") else v.normal_(0, 0.3) if k.endswith("weight") else v)
            for k, v in sd.items()}


def test_the_networks_have_the_published_key_layout():
    assert list(PatchDiscriminator().state_dict()) == PUBLISHED_DISC_KEYS
    keys = set(LPIPS().state_dict())
    assert keys == {f"{c}.{p}" for c in PUBLISHED_LPIPS_CONVS for p in ("weight", "bias")} | {
        f"lin{k}.model.1.weight" for k in range(5)}
    assert LPIPS().lin4.model[1].weight.shape == (1, 512, 1, 1)


def test_discriminator_gives_patch_logits_and_refuses_tiny_images():
    disc = PatchDiscriminator(ndf=8)
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)     # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert disc.min_size() == 32
    with pytest.raises(PipelineError, match="PatchGAN"):
        discriminator_from_state_dict({"weight": torch.zeros(1)}, "x.pt")


def test_hinge_and_generator_losses_on_toy_logits():
    confident_real, confident_fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -3.0)
    assert hinge_d_loss(confident_real, confident_fake).item() == 0      # beyond both margins: no loss
    assert hinge_d_loss(torch.zeros(1), torch.zeros(1)).item() == 1.0    # undecided: 0.5 * (1 + 1)
    assert generator_loss(confident_fake).item() == 3.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    last = torch.ones(2, 2, requires_grad=True)
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    rec, gan = (last * a).sum(), (last * b).sum()                      # gradients a (norm 5) and b (norm 1)
    assert adaptive_weight(rec, gan, last).item() == pytest.approx(5 / (1 + 1e-4))
    assert not adaptive_weight(rec, gan, last).requires_grad
    assert adaptive_weight(rec, (last * 0).sum(), last).item() == 1e4     # no GAN gradient: the clamp


def test_the_discriminator_learns_to_separate_sharp_from_blurred_images():
    torch.manual_seed(0)
    real = torch.rand(8, 3, 32, 32) * 2 - 1                             # speckle
    fake = F.interpolate(F.avg_pool2d(real, 4), scale_factor=4.0)        # its blurred reconstruction
    adversary = Adversary(PatchDiscriminator(ndf=8), weight=0.5, start=0, lr=2e-3, autocast=nullcontext)
    first = adversary.discriminator_step(real, fake)
    for _ in range(15):
        last = adversary.discriminator_step(real, fake)
    assert last["d_acc"] > 0.95 and last["d_loss"] < 0.5 * first["d_loss"]


def test_generator_term_gives_the_discriminator_no_gradient_and_switches_on_after_start():
    disc = PatchDiscriminator(ndf=8)
    adversary = Adversary(disc, weight=0.5, start=3, lr=1e-3, autocast=nullcontext)
    assert [adversary.active(step) for step in (1, 3, 4)] == [False, False, True]
    last = torch.randn(3, 3, 3, 3, requires_grad=True)
    fake = F.conv2d(torch.randn(2, 3, 32, 32), last, padding=1)
    gan, parts = adversary.generator_term(fake, fake.pow(2).mean(), last)
    gan.backward()
    assert last.grad is not None and all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())               # trainable again for its own step
    assert parts["d_weight"] > 0


def test_lpips_is_zero_for_identical_images_and_grows_with_distortion(tmp_path):
    torch.save({"state_dict": {**{f"loss.perceptual_loss.{k}": v for k, v in fake_lpips_state_dict().items()},
                               "encoder.conv_in.weight": torch.zeros(1)}}, tmp_path / "published.pt")
    weights = training_loss_weights(tmp_path / "published.pt")
    assert set(weights) == {f"loss.perceptual_loss.{k}" for k in fake_lpips_state_dict()}
    lpips, source = build_lpips(None, weights, tmp_path / "published.pt")
    assert source == "published.pt:loss.perceptual_loss"
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn_like(x)
    distances = [lpips(x, x + s * noise) for s in (0.0, 0.05, 0.2, 0.8)]
    assert distances[0].shape == (2,) and torch.all(distances[0] == 0)
    assert all(torch.all(a < b) for a, b in zip(distances, distances[1:]))


def test_lpips_from_a_torchvision_vgg16_file(tmp_path):
    """A torchvision vgg16 state dict (features.* plus its classifier) has no LPIPS linear layers: every channel
    weighs the same, and the log says so."""
    from torchvision.models.vgg import make_layers
    w1, w2, w3, w4, w5 = TINY_WIDTHS
    features = make_layers([w1, w1, "M", w2, w2, "M", w3, w3, w3, "M", w4, w4, w4, "M", w5, w5, w5, "M"])
    sd = {f"features.{k}": v for k, v in features.state_dict().items()} | {"classifier.0.weight": torch.zeros(2, 2)}
    torch.save(sd, tmp_path / "vgg16.pth")
    lines = []
    lpips, source = build_lpips(tmp_path / "vgg16.pth", {}, None, log=lines.append)
    assert source == "vgg16.pth" and any("uncalibrated" in line for line in lines)
    assert torch.equal(lpips.net.slice3[3].weight, features[12].weight)
    assert torch.all(lpips.lin2.model[1].weight == 1 / w3)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert lpips(x, x).item() == 0 and lpips(x, -x).item() > 0


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match="--lpips_vgg"):
        build_lpips(None, {}, "demo_vavae.safetensors")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pt")
    with pytest.raises(PipelineError, match="no VGG-16"):
        build_lpips(tmp_path / "resnet.pt", {}, None)


def test_discriminator_is_reused_from_the_starting_file_when_it_has_one():
    trained = PatchDiscriminator(ndf=8)
    weights = {f"loss.discriminator.{k}": v for k, v in trained.state_dict().items()}
    disc, source = build_discriminator(weights, "vavae.pt", log=lambda *_: None)
    assert source == "vavae.pt:loss.discriminator"
    assert all(torch.equal(a, b) for a, b in zip(disc.state_dict().values(), trained.state_dict().values()))
    fresh, source = build_discriminator({}, "demo.safetensors", log=lambda *_: None)
    assert source == "fresh" and fresh.main[0].weight.shape == (64, 3, 4, 4)
