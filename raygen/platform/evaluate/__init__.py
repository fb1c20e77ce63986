"""Evaluation: exports and sampling, the eval job and report, metrics (FID, IS, PR, FD-digits), the digits classifier."""
