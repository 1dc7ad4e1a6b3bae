"""metta-serve: mean image embeddings over S test-time augmentations, as a library and a service."""
