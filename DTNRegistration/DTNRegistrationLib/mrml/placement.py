"""Showing a moving-space node through a registration's transform without losing its own linear transforms.

The engine registers the moving volume as it appears in the scene: any linear transform L it sits under is part of
its input. The result transform maps the fixed space to that appearance. So the chain that shows the volume
registered is ``volume -> L -> result``. Putting the volume directly under the result would drop L and misalign it.
"""

from __future__ import annotations


def place_under_transform(node, transform_node) -> str:
    """Put ``node`` under ``transform_node`` keeping its linear transforms; returns what was done, in one line.

    * No parent transform: ``node`` goes under ``transform_node``.
    * Under linear transforms ``L`` (one, or a chain): the top of the chain goes under ``transform_node``; ``node``
      stays under ``L``, whose matrix is unchanged. Whatever else is under ``L`` follows (it shares the space).
    * Already shown through ``transform_node``: nothing changes.
    * Under a non-linear transform: ``ValueError`` (the registration refused such an input too).
    """
    if node is None or transform_node is None:
        raise ValueError("nothing to place: a node and a transform are needed")
    if node.GetID() == transform_node.GetID():
        raise ValueError("a transform cannot be placed under itself")
    top = node
    parent = node.GetParentTransformNode()
    while parent is not None:
        if parent.GetID() == transform_node.GetID():
            return f"'{node.GetName()}' is already shown through '{transform_node.GetName()}'"
        if not parent.IsLinear():
            raise ValueError(
                f"'{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; harden it first"
            )
        top, parent = parent, parent.GetParentTransformNode()
    top.SetAndObserveTransformNodeID(transform_node.GetID())
    if top is node:
        return f"'{node.GetName()}' is now under '{transform_node.GetName()}'"
    return (
        f"'{top.GetName()}' (the linear transform '{node.GetName()}' is under) is now under "
        f"'{transform_node.GetName()}'; '{node.GetName()}' keeps it"
    )


__all__ = ["place_under_transform"]
