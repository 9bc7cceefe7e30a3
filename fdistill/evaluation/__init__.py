"""Evaluation: Inception port, FID, IS, precision/recall, KID, in-domain metrics."""
