"""Evaluation: the evaluation of a model on a split and the all-background baseline (the scores and
the logit cache they use are seglab/data/metrics.py and seglab/data/logit_cache.py)."""
