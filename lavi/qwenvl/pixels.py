"""One item's uint8 frames -> the Qwen-VL vision tower's input: flattened patches and their grid.

The decode workers hand over frames already resized to the model's dynamic resolution (workers.dynamic: sides that
are multiples of patch * merge, every frame of an item the same size). What is left is transformers' arithmetic
after its resize: rescale and normalise, then cut into patches of temporal_patch_size frames x patch x patch pixels,
in the order the merger expects (each merge x merge block of patches contiguous):

    frames (T, H, W, 3) uint8 -> pixel_values (t * h * w, 3 * tp * p * p) float32, grid_thw (t, h, w)
    t = ceil(T / tp), h = H / p, w = W / p

An image is one frame repeated to the temporal patch size; a video whose frame count is not a multiple of it is
completed with copies of its last frame: both are the same rule, as in transformers. Normalisation goes through a
(3, 256) table of what each uint8 value of each channel becomes, computed with the processor's own float operations
(MediaProcessor.fused says which), so the values are transformers' to the bit and no float64 frame is ever made.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lavi.qwenvl.processor_config import MediaProcessor


def value_table(media: MediaProcessor, device: torch.device | str | None = None) -> torch.Tensor:
    """(3, 256) float32: channel c's value v once rescaled and normalised, by the processor's arithmetic."""
    v = torch.arange(256, dtype=torch.uint8)
    if media.fused:  # transformers' torchvision backend (rescale_and_normalize)
        if media.do_rescale and media.do_normalize:  # fused: mean and std scaled by 1 / rescale_factor
            mean = torch.tensor(media.image_mean) * (1.0 / media.rescale_factor)
            std = torch.tensor(media.image_std) * (1.0 / media.rescale_factor)
            table = (v.to(torch.float32)[None] - mean[:, None]) / std[:, None]
        elif media.do_normalize:
            table = (v.to(torch.float32)[None] - torch.tensor(media.image_mean)[:, None]) / torch.tensor(
                media.image_std)[:, None]
        else:
            table = (v * media.rescale_factor if media.do_rescale else v.to(torch.float32))[None].expand(3, 256)
    else:  # transformers' PIL backend: rescale in float64, cast to float32, then normalise in float32
        x = (v.to(torch.float64) * media.rescale_factor).to(torch.float32) if media.do_rescale else v.to(
            torch.float32)
        if media.do_normalize:
            mean = torch.tensor(media.image_mean, dtype=torch.float32)[:, None]
            std = torch.tensor(media.image_std, dtype=torch.float32)[:, None]
            table = (x[None] - mean) / std
        else:
            table = x[None].expand(3, 256)
    return table.to(torch.float32).contiguous().to(device)


def pixel_values(frames: np.ndarray | torch.Tensor, media: MediaProcessor,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One item's frames (T, H, W, 3) uint8 (an image: T = 1) -> (pixel_values (t*h*w, 3*tp*p*p) float32,
    grid_thw (t, h, w)) on `device` (default: the frames'). H and W must be multiples of patch * merge (the decode
    workers' resize makes them so); ValueError otherwise."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:  # torch warns on read-only buffers (PIL's)
        frames = frames.copy()
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} {tuple(frames.shape)}")
    p, m, tp = media.patch_size, media.merge_size, media.temporal_patch_size
    n, height, width, _ = frames.shape
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frames of {height}x{width} are not multiples of patch * merge = {p * m}: resize them with "
                         "the model's dynamic resolution first (workers.dynamic)")
    frames = frames.to(device) if device is not None else frames
    if pad := -n % tp:  # an image, or an odd clip: completed with its last frame (once per item, not in a loop)
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, h, w = frames.shape[0] // tp, height // p, width // p
    # the patch order first, on the uint8 frames (a quarter of the bytes a float copy moves)
    x = frames.view(t, tp, h // m, m, p, w // m, m, p, 3)  # (t, tp, h/m, mh, ph, w/m, mw, pw, C)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (t, h/m, w/m, mh, mw, C, tp, ph, pw)
    # then every value looked up in its channel's row of the table: index c * 256 + v of the flattened (3, 256)
    channel = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=frames.device).view(1, 1, 1, 1, 1, 3, 1, 1, 1)
    index = x.to(torch.int32, memory_format=torch.contiguous_format) + channel
    values = value_table(media, frames.device).flatten()[index]  # float32, in patch order
    return values.view(t * h * w, 3 * tp * p * p), (t, h, w)


def patch_timestamps(times_s: Sequence[float], temporal_patch_size: int) -> list[float]:
    """The time of each temporal patch of a clip whose frames are at `times_s` (Qwen3-VL writes them into the
    prompt): transformers' Qwen3VLProcessor._calculate_timestamps, on times rather than frame indices: completed
    to a multiple of the patch with the last time, each patch the mean of its first and last frame's."""
    times = list(times_s)
    if not times:
        return []
    times += [times[-1]] * (-len(times) % temporal_patch_size)
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]
