"""The top of the house: the `nfm` command (cli/), `nfm run`, evaluation and reports; it alone imports the
stages. pipeline/core/ beneath it is the foundation every stage builds on (it imports no stage)."""
