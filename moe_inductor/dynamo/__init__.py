"""Dynamo-facing capture: settings scoped to sonic frames, loop and host-count capture, trace-time answers."""
