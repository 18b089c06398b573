"""Stage three: the flow-matching student (velocity networks, couplings, paths, ODE samplers)."""
