"""Writes dinov2_tiny_parity.safetensors: a tiny DINOv2 in timm's `vit_large_patch14_dinov2` layout (the one the
published VA-VAE file stores under foundation_model.model.*), an input and timm's forward_features of it, so that
tests/test_repa.py checks models/repa_encoders.DINOv2Encoder against timm without timm installed.
Run once, with timm: pip install --target /tmp/timm timm huggingface_hub; PYTHONPATH=/tmp/timm python this file."""
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

torch.manual_seed(0)
# dim 128 = 2 heads of 64 (DINOv2's head size); a 5x5 position grid (img_size 70) resampled to the input's 4x4
model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, dynamic_img_size=True, img_size=70,
                          embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0).eval()
with torch.no_grad():
    for p in model.parameters():   # nothing left at its initial value (LayerScale 1e-5, zero biases, unit norms)
        p.copy_((p + 0.2 * torch.randn_like(p)).half().float())
x = torch.randn(2, 3, 56, 56)
with torch.no_grad():
    tokens = model.forward_features(x)[:, 1:]
tensors = {f"foundation_model.model.{k}": v.half() for k, v in model.state_dict().items()}
save_file({**tensors, "input": x, "timm_tokens": tokens.contiguous()}, str(Path(__file__).with_name("dinov2_tiny_parity.safetensors")),
          metadata={"timm": timm.__version__, "torch": torch.__version__})
