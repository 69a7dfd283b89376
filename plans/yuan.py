"""Yuan 2.0 with its localized filtering sharded: refused when the filter's convolutions are grouped.

With ``lf_conv2d_group`` G > 1 each convolution is block-diagonal: a group's output channels
read only that group's input channels. conv1 column-parallel and conv2 row-parallel would
need every rank to hold whole groups of both, with conv1 reading only its groups' input
channels and conv2 writing only its groups' outputs; the column and row styles shard a
convolution's channels as one dense block, so tp refuses rather than mix groups. The
``yuan_replicate`` family keeps the filter whole and works with any G.
"""

from tp.errors import PlanError


def plan(model):
    for path, module in model.named_modules():
        groups = getattr(module, "lf_conv2d_group", 1)
        if groups > 1:
            raise PlanError(
                f"{path}: its convolutions have lf_conv2d_group={groups} groups, and the column/row-parallel "
                "conv styles of family 'yuan' split channels as one dense block, which would mix the groups; "
                "shards holding whole groups need a style tp does not have yet. Keep the filter whole on every "
                "rank with tp.apply(model, mesh, family=\"yuan_replicate\")")
    return {}
