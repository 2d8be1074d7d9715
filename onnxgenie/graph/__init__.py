"""Graph front end: load and normalise, BN statistics, BN folding, swing rewrite, block partition."""
