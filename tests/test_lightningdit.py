"""LightningDiT parity: the shared reference vectors, the published key layout, and every flag combination
against an independent functional implementation written from the reference description (FACTS.md)."""
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from models.lightningdit import LightningDiT, LightningDiT_models, model_config

REFERENCE = Path(__file__).resolve().parent / "reference"
PARITY = REFERENCE / "lightningdit_small_parity.safetensors"


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (REFERENCE / name).read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.mark.skipif(not PARITY.is_file(), reason="shared reference not present")
def test_reproduces_reference_parity_file():
    config = json.loads(safe_open(str(PARITY), "pt").metadata()["config"])
    data = load_file(str(PARITY))
    model = LightningDiT(**config).eval()
    state = {k[len("state_dict."):]: v for k, v in data.items() if k.startswith("state_dict.")}
    # Fixed tables computed here must equal the stored ones (a fresh model relies on them).
    for key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
        torch.testing.assert_close(model.state_dict()[key], state[key], rtol=0, atol=1e-6)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(data["x"], data["t"], data["y"])
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, data["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (REFERENCE / "keys_dit_xl1.txt").is_file(), reason="shared reference not present")
def test_xl1_state_dict_layout_matches_published_checkpoint():
    with torch.device("meta"):
        model = LightningDiT(**model_config("LightningDiT-XL/1", num_classes=1000))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_key_list("keys_dit_xl1.txt")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(675.3e6, rel=2e-3)


def test_named_sizes():
    assert set(LightningDiT_models) == {f"LightningDiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (1, 2)}
    assert LightningDiT_models["LightningDiT-S/2"] == dict(depth=12, hidden_size=384, num_heads=6, patch_size=2)
    assert LightningDiT_models["LightningDiT-XL/1"]["depth"] == 28
    with torch.device("meta"):
        b2 = LightningDiT(**model_config("LightningDiT-B/2", num_classes=1000))
    assert sum(p.numel() for p in b2.parameters() if p.requires_grad) == pytest.approx(130.6e6, rel=0.05)


#################################################################################
#                 Independent functional reference (from FACTS.md)              #
#################################################################################

def ref_rmsnorm(x, w, eps=1e-6):
    x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def ref_rope(x, grid):
    head_dim = x.shape[-1]
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    f = torch.arange(grid).float()[:, None] * freqs[None]
    f = torch.stack([f, f], dim=-1).reshape(grid, dim)          # each frequency for a pair
    full = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], -1)
    full = full.reshape(grid * grid, head_dim)
    pairs = x.reshape(*x.shape[:-1], head_dim // 2, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * full.cos().to(x.dtype) + rot * full.sin().to(x.dtype)


def ref_forward(sd, cfg, x, t, y):
    D, H, p = cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"]
    hd, grid = D // H, cfg["input_size"] // p
    norm = (lambda v, w: ref_rmsnorm(v, w)) if cfg["use_rmsnorm"] else (lambda v, w: F.layer_norm(v, (D,), eps=1e-6))
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half).float() / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1).to(x.dtype)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    B, N = h.shape[:2]
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
        if cfg["wo_shift"]:
            sc1, g1, sc2, g2 = mod.chunk(4, 1)
            sh1 = sh2 = torch.zeros_like(sc1)
        else:
            sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, 1)
        a = norm(h, sd.get(pre + "norm1.weight")) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = F.linear(a, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).reshape(B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if cfg["use_qknorm"]:
            if cfg["use_rmsnorm"]:
                q, k = ref_rmsnorm(q, sd[pre + "attn.q_norm.weight"]), ref_rmsnorm(k, sd[pre + "attn.k_norm.weight"])
            else:
                q = F.layer_norm(q, (hd,), sd[pre + "attn.q_norm.weight"], sd[pre + "attn.q_norm.bias"])
                k = F.layer_norm(k, (hd,), sd[pre + "attn.k_norm.weight"], sd[pre + "attn.k_norm.bias"])
        if cfg["use_rope"]:
            q, k = ref_rope(q, grid), ref_rope(k, grid)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, N, D), sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        h = h + g1[:, None] * att
        m = norm(h, sd.get(pre + "norm2.weight")) * (1 + sc2[:, None]) + sh2[:, None]
        if cfg["use_swiglu"]:
            x1, x2 = F.linear(m, sd[pre + "mlp.w12.weight"], sd[pre + "mlp.w12.bias"]).chunk(2, -1)
            m = F.linear(F.silu(x1) * x2, sd[pre + "mlp.w3.weight"], sd[pre + "mlp.w3.bias"])
        else:
            m = F.gelu(F.linear(m, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh")
            m = F.linear(m, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        h = h + g2[:, None] * m
    sh, sc = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                      sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)
    h = norm(h, sd.get("final_layer.norm_final.weight")) * (1 + sc[:, None]) + sh[:, None]
    h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    C = sd["final_layer.linear.weight"].shape[0] // (p * p)
    h = h.reshape(B, grid, grid, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, grid * p, grid * p)
    return h[:, : cfg["in_channels"]]


FLAGS = ["use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "learn_sigma"]


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("combo", [dict(zip(FLAGS, bits)) for bits in itertools.product([False, True], repeat=6)
                                   if sum(bits) in (0, 1, 5, 6) or bits == (True, True, True, True, False, False)])
def test_flag_combinations_match_functional_reference(patch_size, combo):
    cfg = dict(input_size=8, patch_size=patch_size, in_channels=4, hidden_size=32, depth=2, num_heads=4,
               mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=5, **combo)
    torch.manual_seed(0)
    model = LightningDiT(**cfg).eval()
    with torch.no_grad():   # zero-initialised adaLN would make the comparison trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.4, 1.0]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        out = model(x, t, y)
        ref = ref_forward({k: v for k, v in model.state_dict().items()}, cfg, x, t, y)
    assert out.shape == (3, 4, 8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_label_dropout_uses_null_class_and_gradient_checkpointing_matches():
    cfg = model_config("LightningDiT-S/2", num_classes=3, input_size=8, in_channels=4, depth=2,
                       hidden_size=32, num_heads=2, class_dropout_prob=1.0)
    torch.manual_seed(0)
    model = LightningDiT(**cfg).train()
    null = model.y_embedder(torch.tensor([0, 1, 2]), train=True)
    assert torch.equal(null, model.y_embedder.embedding_table.weight[[3, 3, 3]])
    model.y_embedder.dropout_prob = 0.0
    ckpt = LightningDiT(**{**cfg, "use_checkpoint": True}).train()
    ckpt.load_state_dict(model.state_dict())
    ckpt.y_embedder.dropout_prob = 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt.load_state_dict(model.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    a, b = model(x, t, y), ckpt(x, t, y)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, ckpt.blocks[0].attn.qkv.weight.grad)


@pytest.mark.parametrize("combo", [dict(use_rmsnorm=True, use_rope=True, use_swiglu=True, use_qknorm=False,
                                        wo_shift=False, learn_sigma=False),
                                   dict(use_rmsnorm=True, use_rope=True, use_swiglu=False, use_qknorm=True,
                                        wo_shift=True, learn_sigma=True)])
def test_gradients_match_functional_reference(combo):
    """The fused RMSNorm-modulate and RoPE nodes have hand-written backwards: check them against autograd
    (float64; the tolerance covers the reference's float32 timestep tables, a wrong backward is off by O(1))."""
    cfg = dict(input_size=8, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=4, mlp_ratio=4.0,
               class_dropout_prob=0.0, num_classes=5, **combo)
    torch.manual_seed(1)
    model = LightningDiT(**cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    params = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in model.state_dict().items()}
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    t, y = torch.tensor([0.2, 0.9], dtype=torch.float64), torch.tensor([1, 5])
    weight = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    (model(x, t, y) * weight).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (ref_forward(params, cfg, x_ref, t, y) * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
    named = dict(model.named_parameters())
    for key in ("blocks.0.norm1.weight", "blocks.1.adaLN_modulation.1.weight", "blocks.0.attn.qkv.weight",
                "final_layer.norm_final.weight", "y_embedder.embedding_table.weight"):
        torch.testing.assert_close(named[key].grad, params[key].grad, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_forward_and_backward_stay_close_to_fp32():
    cfg = model_config("LightningDiT-S/1", num_classes=3, input_size=8, in_channels=4, depth=2, hidden_size=64,
                       num_heads=4, class_dropout_prob=0.0)
    torch.manual_seed(2)
    model = LightningDiT(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    ref = model(x, t, y)
    ref.square().mean().backward()
    ref_grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().square().mean().backward()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    rel = (model.blocks[0].attn.qkv.weight.grad - ref_grad).norm() / ref_grad.norm()
    assert rel < 0.05
