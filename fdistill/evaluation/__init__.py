"""Evaluation: FID Inception port, Frechet distance, IS, precision/recall, KID, in-domain classifier metrics."""
