"""Zero-shot video editors built on an inversion (stemref.inversion): FateZero (fatezero.py, with p2p.py)."""
