"""The two exported graphs: an open_clip model's image and text towers, wrapped so their
inputs are what a server has at hand (uint8 NHWC pixels, int32 token ids) and their outputs
are L2-normalised embeddings."""

from __future__ import annotations

import torch


def normalize_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) NHWC -> float NCHW normalised with open_clip's mean/std."""
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class ImageTower(torch.nn.Module):
    """uint8 [N, S, S, 3] -> float32 [N, D], unit length."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(normalize_pixels(pixels, self.mean, self.std),
                                       normalize=True)


class TextTower(torch.nn.Module):
    """int32 [N, L] -> float32 [N, D], unit length. The ids stay int32 through the argmax that
    finds the end-of-text token (ORT's CUDA ArgMax has no int64 kernel)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=True)
