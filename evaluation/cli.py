"""Stage 4's command line (stage4_evaluate.py)."""
import argparse

from common.device import DEVICE_WORDS, device_word
from common.config import (add_config_flag, new_parser, non_negative_int, options_class, percentile, positive_float,
                           positive_int, probability, seed)

DESCRIPTION = """Stage 4: evaluate generated spectrograms (identity, fidelity, diversity, memorisation, TSTR, augmentation gain).

    python stage4_evaluate.py --data_dir data --generated_dir outputs/generated --output_dir outputs/eval
"""
REQUIRED = ["data_dir", "generated_dir", "output_dir"]


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(DESCRIPTION)
    add_config_flag(parser)
    parser.add_argument("--data_dir", type=str, default=None, help="stage 1 layout: train/ID_n/*.png and val/ID_n/*.png")
    parser.add_argument("--generated_dir", type=str, default=None, help="folder of micro_doppler_userNN_KKK.png files")
    parser.add_argument("--output_dir", type=str, default=None, help="report.json, report.md and plots go here")
    parser.add_argument("--image_size", type=positive_int, default=256, help="size images are decoded at (the generator's)")
    parser.add_argument("--classifier_size", type=positive_int, default=32,
                        help="resolution the user classifier works at")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="images per classifier/feature batch")
    parser.add_argument("--device", type=device_word, default="auto", help=DEVICE_WORDS)
    parser.add_argument("--classifier_max_steps", type=positive_int, default=600,
                        help="most steps of each classifier; it stops earlier once its top-1 on held-out train "
                             "images stops rising")
    parser.add_argument("--seed", type=seed, default=0,
                        help="the judge's seed (the first of --gain_seeds) and the intervals' bootstrap seed")
    parser.add_argument("--gain_seeds", type=positive_int, default=5,
                        help="classifier seeds of the augmentation gain and TSTR (each trains 3 arms per regime "
                             "plus a TSTR classifier); the judge's real-val top-1 gets its interval over them")
    parser.add_argument("--low_data_per_user", type=non_negative_int, default=20,
                        help="real train images per user in the augmentation gain's low-data regime (0: off)")
    parser.add_argument("--inception_weights", type=str, default=None,
                        help="local torchvision Inception-v3 state dict for standard FID/KID; skipped when absent")
    parser.add_argument("--vavae_path", type=str, default=None,
                        help="the tokenizer of the latents: adds the identity of its reconstructions of the real val "
                             "images, the most a generator decoding with it can reach")
    parser.add_argument("--export_dir", type=str, default=None,
                        help="write a ready dataset here: train/ID_n/ = real train + accepted samples, val/ID_n/ = real val")
    parser.add_argument("--min_confidence", type=probability, default=0.5, help="export: least top-1 probability")
    parser.add_argument("--min_margin", type=probability, default=0.1, help="export: least top-1 minus top-2 probability")
    parser.add_argument("--num_workers", type=non_negative_int, default=0, help="image decoding worker processes")
    parser.add_argument("--nearest_k", type=positive_int, default=3, help="k of the k-NN manifolds (precision/recall, density/coverage)")
    parser.add_argument("--min_user_samples", type=positive_int, default=10, help="least samples per user for per-user FD/KID/PR")
    parser.add_argument("--copy_percentile", type=percentile, default=1.0,
                        help="memorisation: percentile of real-val NN distances that sets the copy threshold")
    parser.add_argument("--copy_factor", type=positive_float, default=0.5, help="memorisation: threshold = factor x that percentile")
    parser.add_argument("--compare_to", type=str, default=None,
                        help="another run's report.json: print both runs' headline numbers with their 95%% intervals "
                             "and whether they differ beyond noise")
    return parser


# Stage 4's flags by name (common.config.Options), handed to evaluation.evaluate.evaluate whole (--compare_to is
# stage4_evaluate.py's own, read after evaluate()).
EvaluateOptions = options_class("EvaluateOptions", build_parser, REQUIRED, __name__)
