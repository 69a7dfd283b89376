"""Checks on a resolved plan before and after sharding: the sizes that must divide, the report
of what is sharded and what it costs, and the comparison with the unsharded model."""
