"""Plans: the registry of model families, the ALLREDUCE/KEEP overrides, module-name patterns,
the model structure tp reads (blocks, norms), and the resolved plan that apply executes."""
