"""The registry of model classes by name: filled as each model class is defined, read by ``load`` and by the
AnnData readers that tell a pathfactor result from another tool's."""

__all__ = ["REGISTRY"]

#: model class name -> class, filled by ``LatentModel.__init_subclass__``
REGISTRY: dict[str, type] = {}
