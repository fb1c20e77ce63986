"""Clusters: connecting to (or starting) Ray, and Ray Jobs submission."""
