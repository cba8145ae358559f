"""The VA-VAE tokenizer's training: recipe (recipe.py), loop (train.py), texture losses (losses.py),
foundation alignment (align.py) and command line (cli.py). The model itself is models/vavae.py."""
