"""Training methods, each a prepare/run pair registered by name."""
