"""Baseline few-step methods on the same backbones and data as π-ID (for the side-by-side benchmark)."""
from piflow.baselines.meanflow import MeanFlowSettings, meanflow_loss, meanflow_sample, meanflow_target

__all__ = ["MeanFlowSettings", "meanflow_loss", "meanflow_sample", "meanflow_target"]
