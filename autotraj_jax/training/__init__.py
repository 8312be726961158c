"""Losses, optimizer, the generic train step and loop, and per-stage trainers."""
