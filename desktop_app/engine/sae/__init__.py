"""Sparse autoencoders: model (SAELens semantics), file formats, training, metrics, use on a loaded model."""
