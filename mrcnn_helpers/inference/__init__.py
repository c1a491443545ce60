"""Inference: load any model file into one Predictor; postprocessing; the runner evaluate, infer, export checks and deploy share."""
