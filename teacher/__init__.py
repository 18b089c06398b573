"""Stage one: the TarFlow teacher (model, training, export)."""

from nfm.teacher.model import TARFLOW_SIZES, TarFlow, TarFlowConfig

__all__ = ["TARFLOW_SIZES", "TarFlow", "TarFlowConfig"]
