"""The machinery of a run: settings, the loop, checkpoints, sharding, preemption (README, "Where things are")."""
