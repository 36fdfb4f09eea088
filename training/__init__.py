"""The machinery of a run: settings, the loop, checkpoints, sharding, preemption (docs/design.md, "Where things are")."""
