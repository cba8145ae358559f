"""Stage 4's command line (stage4_evaluate.py)."""
import argparse

from common.config import (add_config_flag, new_parser, non_negative_int, open_fraction, options_class, percentile,
                           positive_float, positive_int, probability)
from common.device import add_device_flag
from common.flag_groups import (add_batch_size_flag, add_data_dir_flag, add_image_size_flag, add_num_workers_flag,
                                add_output_dir_flag, add_seed_flag, add_tokenizer_flag)
from evaluation.classifier import GENERATED_USES

DESCRIPTION = """Stage 4: evaluate generated spectrograms (identity, fidelity, diversity, memorisation, TSTR, augmentation gain).

    python stage4_evaluate.py --data_dir data --generated_dir outputs/generated --output_dir outputs/eval
"""
REQUIRED = ["data_dir", "generated_dir", "output_dir"]


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(DESCRIPTION)
    add_config_flag(parser)
    files = parser.add_argument_group("inputs and outputs")
    add_data_dir_flag(files, "stage 1 layout: train/ID_n/*.png and val/ID_n/*.png")
    files.add_argument("--generated_dir", help="folder of micro_doppler_userNN_KKK.png files")
    add_output_dir_flag(files, "report.json, report.md and plots go here")
    add_tokenizer_flag(files, "the tokenizer of the latents: adds the identity of its reconstructions of the real val "
                              "images, the most a generator decoding with it can reach")
    files.add_argument("--inception_weights",
                       help="local torchvision Inception-v3 state dict for standard FID/KID; skipped when absent")
    files.add_argument("--compare_to",
                       help="another run's report.json: print both runs' headline numbers with their 95%% intervals "
                            "and whether they differ beyond noise")
    images = parser.add_argument_group("images")
    add_image_size_flag(images, "size images are decoded at (the generator's)")
    add_batch_size_flag(images, 64, "images per classifier/feature batch")
    add_num_workers_flag(images, 0, "image decoding worker processes")
    judge = parser.add_argument_group("the user classifier (judge), the augmentation gain and TSTR")
    judge.add_argument("--classifier_size", type=positive_int, default=48,
                       help="resolution the user classifier (the judge) works at; the gain's classifiers work at 32")
    judge.add_argument("--classifier_max_steps", type=positive_int, default=400,
                       help="most steps of each classifier; it stops earlier once its top-1 on held-out train "
                            "images stops rising")
    add_seed_flag(judge, "the judge's seed (the first of --gain_seeds) and the intervals' bootstrap seed")
    judge.add_argument("--gain_seeds", type=positive_int, default=5,
                       help="classifier seeds of the augmentation gain and TSTR (each trains 3 arms per regime "
                            "plus a TSTR classifier); the judge's real-val top-1 gets its interval over them")
    judge.add_argument("--generated_share", type=open_fraction, default=None,
                       help="the samples' share of each batch of the gain's generated arm (default: each sample "
                            "seen as often as each real image, so the share grows with their number)")
    judge.add_argument("--generated_use", choices=GENERATED_USES, default="mixed",
                       help="how the gain's generated arm uses the samples: mixed into the real batches, or first "
                            "(trained on them to a plateau, then fine-tuned on the real images)")
    judge.add_argument("--low_data_per_user", type=non_negative_int, default=20,
                       help="real train images per user in the augmentation gain's low-data regime (0: off)")
    add_device_flag(judge)
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--nearest_k", type=positive_int, default=3,
                         help="k of the k-NN manifolds (precision/recall, density/coverage)")
    metrics.add_argument("--min_user_samples", type=positive_int, default=10,
                         help="least samples per user for per-user FD/KID/PR")
    metrics.add_argument("--copy_percentile", type=percentile, default=1.0,
                         help="memorisation: percentile of real-val NN distances that sets the copy threshold")
    metrics.add_argument("--copy_factor", type=positive_float, default=0.5,
                         help="memorisation: threshold = factor x that percentile")
    export = parser.add_argument_group("export")
    export.add_argument("--export_dir",
                        help="write a ready dataset here: train/ID_n/ = real train + accepted samples, val/ID_n/ = real val")
    export.add_argument("--min_confidence", type=probability, default=0.5, help="export: least top-1 probability")
    export.add_argument("--min_margin", type=probability, default=0.1, help="export: least top-1 minus top-2 probability")
    export.add_argument("--max_confidence", type=probability, default=1.0,
                        help="export and the gain's generated arm: most top-1 probability (below 1: a confidence "
                             "band, leaving out the samples the judge is surest of)")
    return parser


# Stage 4's flags by name (common.config.Options), handed to evaluation.evaluate.evaluate whole (--compare_to is
# stage4_evaluate.py's own, read after evaluate()).
EvaluateOptions = options_class("EvaluateOptions", build_parser, REQUIRED, __name__)
