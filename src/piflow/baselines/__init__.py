"""Baseline few-step methods on the same backbones and data as π-ID (for the side-by-side benchmark)."""
from piflow.baselines.dmd2 import DMD2Settings, distribution_matching_gradient, dmd_loss, fake_score_loss
from piflow.baselines.meanflow import MeanFlowSettings, meanflow_loss, meanflow_sample, meanflow_target

__all__ = ["DMD2Settings", "distribution_matching_gradient", "dmd_loss", "fake_score_loss",
           "MeanFlowSettings", "meanflow_loss", "meanflow_sample", "meanflow_target"]
