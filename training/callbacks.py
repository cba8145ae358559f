"""Lightning callbacks of the fine-tune modes (the modes themselves are in training/finetune.py, free of Lightning)."""
import pytorch_lightning as pl
import torch

from training.finetune import halve_base_weights


class HalfPrecisionBase(pl.Callback):
    """Before the weights reach the GPU (and before a resumed checkpoint is loaded into them), store the
    frozen base projections of a `--finetune lora` model in the autocast dtype of a mixed-precision CUDA run."""
    DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}

    def __init__(self, device_types: tuple[str, ...] = ("cuda",)):
        self.device_types = device_types

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dtype = self.DTYPES.get(str(trainer.precision))
        if dtype is not None and trainer.strategy.root_device.type in self.device_types:
            halve_base_weights(pl_module.model, dtype)
