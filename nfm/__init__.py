"""NFM — Normalized Flow Matching. The namespace root of the installed package.

The code lives in the folders at the top of the repository, installed beneath this namespace
(pyproject.toml maps them):

    nfm.core            the foundation: errors, I/O, config, data, seeding, batches, the training loop
    nfm.teacher         stage one: the TarFlow teacher (imports the foundation only)
    nfm.pairs           stage two: the pair cache (foundation + the teacher *protocol*)
    nfm.student         stage three: flow matching (foundation + the pair reader and cache lookup)
    nfm.pipeline        the top: the `nfm` command, `nfm run`, evaluation, reports (imports the stages)

The Python surface: nfm.Teacher, nfm.Student, nfm.PairCache (from_pretrained / save_pretrained / sample /
to_dataset) and nfm.run (the whole pipeline), from nfm.pipeline.api.
"""

__version__ = "0.1.0"

# the Python surface (nfm.pipeline.api), imported on first use so that `import nfm` stays light
__all__ = ["PairCache", "Student", "Teacher", "run", "__version__"]


def __getattr__(name: str):
    if name in ("PairCache", "Student", "Teacher", "run"):
        from nfm.pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'nfm' has no attribute {name!r}")
