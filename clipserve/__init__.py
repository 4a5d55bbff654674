"""clipserve: CLIP image/text embeddings served at a precision chosen per request."""

__version__ = "0.1.0"
