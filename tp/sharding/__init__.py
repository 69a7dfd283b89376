"""How a sharded parameter is held: layouts of its rows, the tags that say so, lending local
shards to a module's forward, tied weights, the autograd collectives, and gathering it back.

Nothing here knows about styles or plans; styles and checkpoints build on it.
"""
