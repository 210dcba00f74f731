"""piflow: π-Flow (policy-based few-step generation via imitation distillation) in plain PyTorch."""
from piflow.diffusion import CosineVPSchedule, DiffusionTeacher, DiscreteVPSchedule, EDMSchedule
from piflow.heads import DXHead, GMHead
from piflow.piid import piid_data_free_loss, piid_loss, piid_segment_loss, sample_segments
from piflow.model import PiFlow
from piflow.policies import DXPolicy, GMFlowPolicy, Policy
from piflow.rollout import average_velocity, rollout
from piflow.sampling import FlowMapSDESchedule, euler_sample, sample
from piflow.settings import PiIDSettings
from piflow.teachers import ClassifierFreeGuidance, GaussianMixtureTeacher, NetworkTeacher
from piflow.timewarp import dynamic_shift, unwarp, warp

__version__ = "0.1.0"

__all__ = [
    "PiFlow", "GMFlowPolicy", "DXPolicy", "Policy", "GMHead", "DXHead", "rollout", "average_velocity",
    "piid_loss", "piid_segment_loss", "piid_data_free_loss", "sample_segments", "FlowMapSDESchedule", "sample",
    "PiIDSettings",
    "euler_sample", "GaussianMixtureTeacher", "NetworkTeacher", "ClassifierFreeGuidance", "warp", "unwarp",
    "dynamic_shift", "DiffusionTeacher", "DiscreteVPSchedule", "CosineVPSchedule", "EDMSchedule", "__version__",
]
