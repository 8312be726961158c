"""AutoTraj-JAX: repairing and rewarding tool-use trajectories for tool-integrated reasoning."""
