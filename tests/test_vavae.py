"""VA-VAE tokenizer: exact state-dict layout, numerics against an independent functional version, loading."""
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.errors import PipelineError
from common.io import save_safetensors
from helpers import write_malicious
from models.vavae import VAVAE, VAVAE_CONFIGS, load_vavae, save_vavae

KEYS_FILE = Path(__file__).resolve().parent / "reference" / "keys_vavae.txt"
SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=4,
             embed_dim=4, in_channels=3, out_channels=3, resolution=32)   # attention at 16x16 = lowest res


pytestmark = pytest.mark.usefixtures("one_thread")


def randomized(model: VAVAE, seed: int = 0) -> VAVAE:
    """Non-default weights everywhere (norm affines and biases included) so comparisons are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.dim() == 1 else 1.5 / (p[0].numel() ** 0.5)
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0   # GroupNorm gains near 1
            p.copy_(torch.randn(p.shape, generator=g) * scale + centre)
    return model.eval()


#################################################################################
#                                    Layout                                     #
#################################################################################

def test_official_keys_shapes_and_param_counts():
    with torch.device("meta"):
        model = VAVAE(**VAVAE_CONFIGS["f16d32"])
    expected = []
    for line in KEYS_FILE.read_text().strip().splitlines():
        name, shape, _ = line.split("\t")
        expected.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model) == 69_836_067
    assert count(model.encoder) == 28_413_248
    assert count(model.decoder) == 41_417_603
    assert count(model.quant_conv) == 4_160
    assert count(model.post_quant_conv) == 1_056


#################################################################################
#                  Numerics: a functional version from the description          #
#################################################################################

def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _res(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, p + ".norm1")), sd, p + ".conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, p + ".norm2")), sd, p + ".conv2", padding=1)
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(x, sd, p + ".nin_shortcut")
    return x + h


def _attn(x, sd, p):
    b, c, h, w = x.shape
    y = _gn(x, sd, p + ".norm")
    q = _conv(y, sd, p + ".q").reshape(b, c, h * w).permute(0, 2, 1)   # (b, hw, c)
    k = _conv(y, sd, p + ".k").reshape(b, c, h * w)                     # (b, c, hw)
    v = _conv(y, sd, p + ".v").reshape(b, c, h * w)
    weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)          # (b, hw_q, hw_k)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _conv(out, sd, p + ".proj_out")


def _mid(h, sd, p):
    return _res(_attn(_res(h, sd, p + ".block_1"), sd, p + ".attn_1"), sd, p + ".block_2")


def ref_encode(x, sd, levels, nrb):
    h = _conv(x, sd, "encoder.conv_in", padding=1)
    for i in range(levels):
        for j in range(nrb):
            h = _res(h, sd, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"encoder.down.{i}.attn.{j}")
        if i != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _mid(h, sd, "encoder.mid")
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1)
    mean, logvar = _conv(h, sd, "quant_conv").chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def ref_decode(z, sd, levels, nrb):
    h = _mid(_conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1), sd, "decoder.mid")
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            h = _res(h, sd, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv", padding=1)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)


def test_numerics_match_functional_reference():
    """In float64: the model and the reference then differ only by summation order, ~1e-15 of values of ~5
    (measured), so 1e-10 holds on any machine, while a wrong op is off by O(1). In float32 the same gap was
    4e-6 against a tolerance of 1e-5, and it moves with the thread count and the CPU's instruction set."""
    torch.manual_seed(0)
    model = randomized(VAVAE(**SMALL)).double()
    sd = model.state_dict()
    assert any(".attn." in k for k in sd) and "encoder.down.0.downsample.conv.weight" in sd
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    close = dict(atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        mean, logvar = model.encode_posterior(x)
        ref_mean, ref_logvar = ref_encode(x, sd, 2, 1)
        assert mean.shape == (2, 4, 16, 16)
        torch.testing.assert_close(mean, ref_mean, **close)
        torch.testing.assert_close(logvar, ref_logvar, **close)
        torch.testing.assert_close(model.encode(x), ref_mean, **close)
        z = torch.randn(2, 4, 16, 16, dtype=torch.float64)
        out, ref_out = model.decode(z), ref_decode(z, sd, 2, 1)
        assert out.shape == (2, 3, 32, 32) and ref_out.abs().max() > 1e-2   # not trivially zero
        torch.testing.assert_close(out, ref_out, **close)


#################################################################################
#                                    Loading                                    #
#################################################################################

def _official_small_override(monkeypatch):
    """The .pt path always means the official config; shrink it for the test so it stays fast."""
    import models.vavae as mod
    monkeypatch.setitem(mod.VAVAE_CONFIGS, "f16d32", {**SMALL, "norm_groups": 32})


def test_published_layout_loads_and_drops_training_keys(tmp_path, monkeypatch):
    _official_small_override(monkeypatch)
    model = randomized(VAVAE(**SMALL), seed=1)
    sd = dict(model.state_dict())
    sd.update({"loss.x": torch.zeros(2), "foundation_model.model.y": torch.zeros(3),
               "linear_proj.weight": torch.zeros(8, 4, 1, 1)})
    torch.save({"state_dict": sd, "global_step": 5}, tmp_path / "vavae.pt")
    loaded = load_vavae(tmp_path / "vavae.pt", memory_format=torch.contiguous_format)   # exact: model's layout
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        assert torch.equal(loaded(x), model(x))
    torch.save(dict(model.state_dict()), tmp_path / "flat.pt")      # no top-level state_dict
    assert torch.equal(load_vavae(tmp_path / "flat.pt").decoder.conv_out.weight, model.decoder.conv_out.weight)


def test_unknown_or_missing_keys_are_named(tmp_path, monkeypatch):
    _official_small_override(monkeypatch)
    sd = dict(VAVAE(**SMALL).state_dict())
    torch.save({"state_dict": {**sd, "encoder.extra_thing.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(PipelineError, match=r"unexpected keys: encoder\.extra_thing\.weight.*f16d32"):
        load_vavae(tmp_path / "extra.pt")
    del sd["decoder.conv_out.bias"]
    torch.save({"state_dict": sd}, tmp_path / "missing.pt")
    with pytest.raises(PipelineError, match=r"missing keys: decoder\.conv_out\.bias"):
        load_vavae(tmp_path / "missing.pt")


def test_shape_mismatch_is_named(tmp_path, monkeypatch):
    _official_small_override(monkeypatch)
    sd = dict(VAVAE(**SMALL).state_dict())
    sd["quant_conv.bias"] = torch.zeros(5)
    torch.save({"state_dict": sd}, tmp_path / "shape.pt")
    with pytest.raises(PipelineError, match=r"quant_conv\.bias \(5,\)"):
        load_vavae(tmp_path / "shape.pt")


def test_safetensors_round_trip_of_narrow_model(tmp_path):
    cfg = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=6,
               embed_dim=5, in_channels=3, out_channels=3, resolution=32, norm_groups=8)
    model = randomized(VAVAE(**cfg), seed=2)
    save_vavae(model, tmp_path / "tok.safetensors", extra_metadata={"val_psnr_db": 31.5})
    loaded = load_vavae(tmp_path / "tok.safetensors", memory_format=torch.contiguous_format)   # model's layout
    assert loaded.config == model.config and loaded.downsample_factor == 4
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    save_vavae(model, tmp_path / "half.safetensors", half=True)
    half = load_vavae(tmp_path / "half.safetensors")
    assert half.decoder.conv_out.weight.dtype == torch.float32
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (tmp_path / "tok.safetensors").stat().st_size


def test_malicious_pickle_is_refused(tmp_path):
    """A plain (not zip) pickle: the payload does run when unpickled, and the loader refuses it unrun."""
    control, marker = tmp_path / "control", tmp_path / "pwned"
    with open(write_malicious(tmp_path / "control.pt", control, legacy=True), "rb") as f:
        pickle.load(f)
    assert control.read_text() == "pwned"
    with pytest.raises(PipelineError, match="refused"):
        load_vavae(write_malicious(tmp_path / "evil.pt", marker, legacy=True))
    assert not marker.exists()


def test_dit_checkpoint_is_refused(tmp_path):
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)},
                "ema": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, tmp_path / "dit.pt")
    with pytest.raises(PipelineError, match=r"VA-VAE tokenizer.*DiT"):
        load_vavae(tmp_path / "dit.pt")
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, tmp_path / "dit2.pt")
    with pytest.raises(PipelineError, match=r"VA-VAE tokenizer.*DiT"):
        load_vavae(tmp_path / "dit2.pt")
    save_safetensors({"x_embedder.proj.weight": torch.zeros(2)}, tmp_path / "dit.safetensors",
                     {"kind": "lightningdit", "config": {"depth": 2}})
    with pytest.raises(PipelineError, match=r"'lightningdit' file.*VA-VAE tokenizer.*kind 'vavae'"):
        load_vavae(tmp_path / "dit.safetensors")


def test_missing_file_is_a_pipeline_error(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_vavae(tmp_path / "nope.pt")


def test_loaded_tokenizer_is_channels_last_with_the_same_numbers_and_saves_unchanged(tmp_path):
    """load_vavae's NHWC weights (the fast path of oneDNN and cuDNN) give the NCHW model's latents and images up
    to float32 rounding, and saving them writes the weights that were read."""
    save_vavae(randomized(VAVAE(**SMALL), seed=3), tmp_path / "tok.safetensors")
    fast = load_vavae(tmp_path / "tok.safetensors")
    plain = load_vavae(tmp_path / "tok.safetensors", memory_format=torch.contiguous_format)
    weight = fast.encoder.conv_out.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert plain.encoder.conv_out.weight.is_contiguous()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = plain.encode(x)
        # Other convolution kernels sum in another order: fp32 rounding (2^-24 per operation) over ~20 layers,
        # far below the 4e-3 that bf16 changes the latents by.
        torch.testing.assert_close(fast.encode(x), z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.decode(z), plain.decode(z), rtol=1e-4, atol=1e-5)
    save_vavae(fast, tmp_path / "again.safetensors")
    again = load_vavae(tmp_path / "again.safetensors").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in plain.state_dict().items())
