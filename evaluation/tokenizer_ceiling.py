"""The tokenizer's ceiling: how well the user classifier recognises the tokenizer's own reconstructions of the
real val images. A generator's samples are decoded by the same tokenizer, so this, not the real-val top-1,
is the most they can reach."""
from pathlib import Path

import torch

from common.device import inference_autocast
from common.pixels import psnr_db, to_float, to_uint8
from data.images import load_bank
from evaluation import classifier as clf
from evaluation.identity import identity_scores
from evaluation.imageset import resize
from evaluation.inputs import Inputs
from models import vavae


def tokenizer_report(data: Inputs, vavae_path: str | Path, image_size: int, classifier_size: int,
                     model: torch.nn.Module, batch_size: int, dev: torch.device) -> dict:
    """top1 (in [0, 1], with its Wilson interval top1_ci) of the reconstructions and their mean PSNR in dB.

    The val images are decoded at image_size, reconstructed by the tokenizer (bf16 autocast where native),
    then scored at classifier_size. Raises PipelineError (from load_vavae) for an unreadable tokenizer file.
    """
    if len(data.val) == 0:
        return {"top1": None, "top1_ci": None, "psnr_db": None, "note": "no readable val images"}
    bank = load_bank(data.val.paths, image_size, log=lambda *_: None)
    recon = vavae.reconstruct(vavae.load_vavae(vavae_path, device=dev), bank,
                              autocast=inference_autocast("bf16-mixed", dev))
    # Batch by batch: all val reconstructions as float32 at once were 731 MB at the seed's 31 x 30 val images.
    small = torch.cat([to_uint8(resize(to_float(part), classifier_size)) for part in recon.split(batch_size)])
    logits = clf.extract(model, small, batch_size, dev)[1]
    scores = identity_scores(logits, data.val.labels, len(data.users))
    return {"top1": scores["top1"], "top1_ci": scores["top1_ci"],
            "psnr_db": psnr_db(recon, bank).mean().item(), "tokenizer": str(vavae_path)}
