"""Evaluation: metrics, the logit cache, the evaluation run and the all-background baseline."""
