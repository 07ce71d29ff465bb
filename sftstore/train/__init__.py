"""Training methods that produce SparseDeltas: LT-SFT and its variants, with their data and masks."""
