"""Training: the Lightning module, the `testbed-train` CLI, checkpoints, callbacks and the run summary."""
