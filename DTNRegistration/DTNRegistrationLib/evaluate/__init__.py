"""Evaluation: methods side by side on labelled pairs (``dtnreg evaluate``), the classical peers, and the network's
speed and memory (``dtnreg benchmark``). Never imports training."""
