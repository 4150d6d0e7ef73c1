"""What crosses process boundaries, defined once: the rollout batch, the weight-update wire format,
and the names both ends of a hop must agree on (answer letters, precisions, sync backends).

The bottom layer of the project: it imports torch at most and no other package of the project,
and every other package may import it.
"""
