"""Stage one: the loss, the poly schedule, the loop, init weights, resumable state, the run folder."""
