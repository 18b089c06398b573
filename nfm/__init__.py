"""NFM — Normalized Flow Matching. The namespace root of the installed package.

The code lives in the four stage folders at the top of the repository, installed beneath this
namespace (pyproject.toml maps them):

    nfm.pipeline.core   the foundation: errors, I/O, config, data, seeding, batches, the training loop
    nfm.teacher         stage one: the TarFlow teacher (imports the foundation only)
    nfm.pairs           stage two: the pair cache (foundation + the teacher *protocol*)
    nfm.student         stage three: flow matching (foundation + the pair reader and cache lookup)
    nfm.pipeline        the top: the `nfm` command, `nfm run`, evaluation, reports (imports the stages)
"""

__version__ = "0.1.0"
