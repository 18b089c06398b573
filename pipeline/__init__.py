"""The top of the house: the `nfm` command (cli/), `nfm run`, evaluation and reports; it alone imports the
stages. core/ (nfm.core) is the foundation every stage builds on (it imports no stage and not the top)."""
