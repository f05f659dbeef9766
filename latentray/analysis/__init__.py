"""The analysis stage: cumulant files, fits between models, layers and orders, the tables."""
