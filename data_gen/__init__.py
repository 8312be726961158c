"""Stage 1 of AutoTraj: candidate generation, multi-dimensional scoring, repair, datasets."""
