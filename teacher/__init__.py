"""Stage one: the TarFlow teacher. The names below are imported on first use (the `nfm` command's
--help needs none of torch)."""

__all__ = ["TARFLOW_SIZES", "TarFlow", "TarFlowConfig"]


def __getattr__(name: str):
    if name in __all__:
        from nfm.teacher import model

        return getattr(model, name)
    raise AttributeError(f"module 'nfm.teacher' has no attribute {name!r}")
