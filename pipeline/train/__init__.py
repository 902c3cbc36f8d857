"""The trainer: run config, state, one step, preemption, the loop."""
