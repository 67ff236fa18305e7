"""A running batch's key/value cache, for every layout transformers' DynamicCache builds.

Rows are left-padded so that each row's tokens end at the last column; a column is a position of
the batch's 2D attention mask, and padding columns are masked out. Full-attention layers
(`DynamicLayer`, or `GrowingLayer` in the caches the engine builds) hold every column.
Sliding-window layers (`DynamicSlidingWindowLayer`: Mistral, Phi-3, Qwen2's windowed layers,
Gemma-3's local layers) hold only the last `sliding_window - 1` columns and count every column in
`cumulative_length`, from which transformers places the mask. Since a row's tokens are contiguous
and end at the last column, a window over columns is a window over that row's own tokens: padded
rows of different lengths can share one sliding layer.

Other layouts (convolution, linear-attention or recurrent states, indexed or quantized layers,
shared-KV placeholders) cannot be left-padded after the fact: they are `Layout.DRAIN`, and the
engine starts a batch only when the previous one has finished, as `generate` batches.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


class GrowingLayer(DynamicLayer):
    """A full-attention layer that appends in place into spare room, growing by half when full.

    `DynamicLayer` concatenates, copying the whole cache at every decode step: at 1,800 tokens of
    history that copy was half of SmolLM2's step. Whoever replaces `keys`/`values` (selecting rows,
    joining, trimming) hands over a new tensor, which is adopted (copied once) at the next update;
    tensors it did not allocate are never written to.
    """

    _room: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (keys view, key buffer, value buffer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        total = held + key_states.shape[-2]
        room = self._room
        if room is None or room[0] is not self.keys or total > room[1].shape[-2]:
            shape = (*key_states.shape[:2], max(64, total * 3 // 2), key_states.shape[-1])
            room = (None, key_states.new_empty(shape), value_states.new_empty(shape))
            if held:
                room[1][:, :, :held] = self.keys
                room[2][:, :, :held] = self.values
        room[1][:, :, held:total] = key_states
        room[2][:, :, held:total] = value_states
        self.keys, self.values = room[1][:, :, :total], room[2][:, :, :total]
        self._room = (self.keys, room[1], room[2])
        return self.keys, self.values


def new_cache(config) -> DynamicCache:
    """The cache a model would build for itself, with growing full-attention layers."""
    cache = DynamicCache(config=config)
    if not cache.layers:  # built lazily, one plain layer per model layer
        cache.layer_class_to_replicate = GrowingLayer
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class Layout(enum.Enum):
    JOINABLE = "joinable"  # rows join and leave a running batch at any step
    DRAIN = "drain"  # rows may leave; new rows wait for the batch to finish


def layout_of(cache: Cache) -> Layout:
    if type(cache) is DynamicCache and all(_window(layer) != -1 for layer in cache.layers):
        return Layout.JOINABLE
    return Layout.DRAIN


def _window(layer: object) -> int | None:
    """None for a full layer, the window for a sliding one, -1 for anything this module cannot join."""
    if type(layer) in (DynamicLayer, GrowingLayer) and layer.is_initialized:
        return None
    if type(layer) is DynamicSlidingWindowLayer and layer.is_initialized and not layer.record_past:
        return layer.sliding_window
    return -1


def _held(window: int | None, width: int) -> int:
    """Columns a layer holds when the batch is `width` columns wide."""
    return width if window is None else min(width, window - 1)


def _left_pad(tensor: torch.Tensor, amount: int) -> torch.Tensor:
    """Pad a [batch, heads, columns, dim] tensor with `amount` empty columns in front."""
    return F.pad(tensor, (0, 0, amount, 0)) if amount else tensor


@dataclass
class RowState:
    """One row's keys and values for its first `length` tokens, detached from any batch.

    Full layers' tensors may hold spare room after `length` (capacity on dim -2), so that a request
    that takes the state over (a conversation's next turn) appends in place instead of copying.
    Sliding layers hold exactly their last columns.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    windows: list[int | None]
    length: int

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def reusable(self, common: int) -> int:
        """How many of the first `common` tokens (shared with a new prompt) can be reused: sliding
        layers keep only their window, so a shorter prefix is usable only while nothing has slid out."""
        smallest = min((w for w in self.windows if w is not None), default=None)
        if smallest is None or common >= self.length or self.length <= smallest - 1:
            return min(common, self.length)
        return 0

    def to_batch(self, length: int, owned: bool = False) -> "BatchCache":
        """A one-row batch holding this row's first `length` tokens. Shared tensors are only read
        (the first update copies them); an `owned` state, taken out of the prefix cache, is appended
        to in place."""
        layers = []
        for (keys, values), window in zip(self.layers, self.windows):
            if window is None:
                layer = GrowingLayer()
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys[:, :, :length], values[:, :, :length]
                if owned:
                    layer._room = (layer.keys, keys, values)
            else:
                held = _held(window, length)
                first = length - held - (self.length - keys.shape[-2])
                layer = DynamicSlidingWindowLayer(sliding_window=window)
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys[:, :, first:first + held], values[:, :, first:first + held]
                layer.cumulative_length = length
            layers.append(layer)
        cache = DynamicCache()
        cache.layers = layers
        return BatchCache(cache, torch.ones((1, length), dtype=torch.long, device=self.layers[0][0].device))


class BatchCache:
    """A batch's cache and its [rows, columns] attention mask; every operation keeps them aligned."""

    def __init__(self, cache: Cache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask
        self.layout = layout_of(cache)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def grow(self) -> None:
        """One more column for the token the next decode step feeds."""
        self.mask = F.pad(self.mask, (0, 1), value=1)

    def join(self, other: "BatchCache") -> None:
        """Append `other`'s rows, left-padding whichever side is narrower."""
        if self.layout is not Layout.JOINABLE or other.layout is not Layout.JOINABLE:
            raise ValueError(f"cannot join caches of layouts {self.layout.value} and {other.layout.value}")
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            window = _window(mine)
            held = _held(window, width)
            mine.keys = torch.cat([_left_pad(mine.keys, held - mine.keys.shape[-2]),
                                   _left_pad(theirs.keys, held - theirs.keys.shape[-2])])
            mine.values = torch.cat([_left_pad(mine.values, held - mine.values.shape[-2]),
                                     _left_pad(theirs.values, held - theirs.values.shape[-2])])
            if window is not None:
                mine.cumulative_length = width
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(other.mask, (width - other.width, 0))])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, then drop leading columns that no remaining row attends to."""
        index = torch.tensor(rows, device=self.mask.device)
        self.mask = self.mask[index]
        if self.layout is not Layout.JOINABLE:
            self.cache.reorder_cache(index)  # selects batch rows in every layer kind
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        start = int(self.mask.any(0).int().argmax())
        if start:
            width = self.width - start
            for layer in self.cache.layers:
                window = _window(layer)
                held = _held(window, width)
                layer.keys = layer.keys[:, :, layer.keys.shape[-2] - held:]
                layer.values = layer.values[:, :, layer.values.shape[-2] - held:]
                if window is not None:
                    layer.cumulative_length = width
            self.mask = self.mask[:, start:]

    def row_state(self, row: int, length: int, spare: int = 0, handover: bool = False) -> RowState:
        """One row's keys and values (its `length` tokens end at the last column), copied, full layers
        with room for `spare` more tokens. With `handover` (a one-row batch that is being dropped)
        the tensors themselves are handed over where they can be."""
        layers, windows = [], []
        for layer in self.cache.layers:
            window = _window(layer)
            held = layer.keys.shape[-2]
            take = min(length, held)
            room = getattr(layer, "_room", None)
            if handover and window is None and room is not None and room[0] is layer.keys and take == held:
                layers.append((room[1], room[2]))
            elif handover and window is not None:
                layers.append((layer.keys, layer.values))
            else:
                layers.append((_copy_row(layer.keys, row, take, 0 if window else spare),
                               _copy_row(layer.values, row, take, 0 if window else spare)))
            windows.append(window)
        return RowState(layers, windows, length)


def _copy_row(tensor: torch.Tensor, row: int, columns: int, spare: int) -> torch.Tensor:
    """A row's last `columns` columns, copied into a tensor with `spare` free columns after them."""
    out = tensor.new_empty((1, tensor.shape[1], columns + spare, tensor.shape[-1]))
    out[:, :, :columns] = tensor[row:row + 1, :, tensor.shape[-2] - columns:]
    return out
