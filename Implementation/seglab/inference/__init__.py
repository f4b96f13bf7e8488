"""Inference: the Predictor and its exact speed rewrites, batch inference on files, overlays."""
