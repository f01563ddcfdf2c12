"""The shared training core: hand-written engine, autograd comparison, Lightning glue."""
