"""Per-request activation statistics from the instrumented graph's packed output, in numpy.

``summarize_requests`` turns the (N, width) ``stats/packed`` output of one merged batch into
each request's per-layer summary (the JSON it is sent as); ``per_sample_active`` gives the
per-sample channel activity the live monitor adds up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NotRequired, TypedDict

import numpy as np

from service.runtime.activations import ActivationNode
from service.runtime.instrument import STATS_OUTPUT, StatsLayout


class LayerSummary(TypedDict):
    """Statistics of one activation layer over one request's samples (see SPEC "Activation
    statistics"): a plain dict, the request's JSON as it is sent. Built in bulk by
    ``summarize_requests``: a dataclass per layer cost ~10 us more per ResNet-20 request to
    build and ~5 us more to turn into JSON (medians of 30 timed calls, 32 requests)."""

    name: str
    kind: str
    channels: int
    inactive_fraction: float  # share of elements with y <= 0
    dead_units: int  # channels with no active element in any sample and position
    dead_channels: list[int]
    mean: float
    std: float | None  # None if y*y overflowed float32 in the graph (|y| > 1.8e19)
    min: float | None  # None only if neither structural nor measurable (see LoadedModel)
    max: float
    saturated_fraction: float | None  # sigmoid and tanh only
    samples: int
    channel_activity: NotRequired[list[float]]  # per channel active share; "channels" only


class LayerActivity(Mapping[str, np.ndarray]):
    """Per-sample per-channel active rates of every layer: one (N, sum C) array, read as
    layer name -> its (N, C) columns (views, made on access)."""

    def __init__(self, array: np.ndarray, columns: Mapping[str, slice]) -> None:
        self.array = array
        self.columns = columns

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array[:, self.columns[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    def rows(self, part: slice) -> LayerActivity:
        """The same layers for the samples ``part``."""
        return LayerActivity(self.array[part], self.columns)


def per_sample_active(layout: StatsLayout, outputs: Mapping[str, np.ndarray]) -> LayerActivity:
    """Layer name -> (N, C) active rates of the layout's layers."""
    if not layout.width:
        return LayerActivity(np.zeros((0, 0), np.float32), {})
    active = outputs[STATS_OUTPUT][:, layout.index["active"]]  # (N, sum C)
    return LayerActivity(active, layout.columns["active"])


MinimumProbe = Callable[[int, list[ActivationNode]], Mapping[str, float] | None]


def summarize_layers(
    layers: Sequence[ActivationNode],
    layout: StatsLayout,
    outputs: Mapping[str, np.ndarray],
    *,
    channels: bool = False,
    batch_mins: Mapping[str, float] | None = None,
) -> list[LayerSummary]:
    """``summarize_requests`` for one request: the whole batch in ``outputs``; the minimum of
    relu/relu6 layers without a zero comes from ``batch_mins`` (the caller measured it)."""
    packed = outputs[STATS_OUTPUT]
    (summary,) = summarize_requests(
        layers, layout, packed, [packed.shape[0]], [channels], lambda _, __: batch_mins
    )
    return summary


def summarize_requests(
    layers: Sequence[ActivationNode],
    layout: StatsLayout,
    packed: np.ndarray,
    sizes: Sequence[int],
    channels: Sequence[bool],
    measure_min: MinimumProbe | None = None,
) -> list[list[LayerSummary]]:
    """Per request, the statistics of every layer over that request's own samples: request
    i owns the next ``sizes[i]`` rows of ``packed`` (N, width), the batch's ``stats/packed``
    output, and gets per-channel activity when ``channels[i]``.

    Aggregated in float64, with one numpy call per quantity for the whole batch (a batch of
    32 one-sample ResNet-20 requests: ~100 us per request one request at a time, ~20 now).
    Every (sample, channel) pools the same number of positions within a layer, so plain
    means over (N, C) are means over all elements. Mean and variance: see ``_moments``.
    The minimum of relu/relu6 layers is 0 when any element is inactive
    (exact); for the rare request in which such a layer has no inactive element at all,
    ``measure_min(i, layers)`` gives those layers' minima (None or missing: unknown).
    """
    if not layers:
        return [[] for _ in sizes]
    # Over each request's samples for all columns (R, width), then per layer with reduceat
    # over each layer's first column (R, layers).
    col_mean, col_max, col_min = _per_request(packed, sizes)
    index, starts, widths = layout.index, layout.starts["active"], layout.sizes["active"]
    col_active = col_mean[:, index["active"]]  # (R, sum C) per channel active share
    dead_mask = col_max[:, index["max"]] <= 0  # exact: no y > 0 anywhere in the request
    inactive = (1.0 - np.add.reduceat(col_active, starts, axis=1) / widths).tolist()
    means, variances = _moments(packed, layout, sizes)
    with np.errstate(invalid="ignore"):
        stds = np.sqrt(np.maximum(variances, 0.0))
    stds_list = np.where(np.isfinite(variances), stds, np.nan).tolist()
    maxima = np.maximum.reduceat(col_max[:, index["max"]], starts, axis=1).tolist()
    dead_counts = np.add.reduceat(dead_mask, starts, axis=1, dtype=np.int64).tolist()
    zero_seen = np.minimum.reduceat(col_min[:, index["active"]], starts, axis=1) < 1.0
    structural_min = [not layer.needs_min_output for layer in layers]
    structural_layers = [i for i, structural in enumerate(structural_min) if structural]
    # relu/relu6: 0 when the request saw a zero, else unknown (NaN) until measured below
    zero_or_unknown = np.where(zero_seen, 0.0, np.nan)
    graph_minima = _per_layer(np.minimum, col_min, layout, "min")
    minima = np.where(structural_min, zero_or_unknown, graph_minima).tolist()
    saturated = _per_layer(np.add, col_mean, layout, "saturated").tolist()
    means_list = means.tolist()
    dead_channels = _dead_channels(dead_mask, starts)
    static = [(i, layer.name, layer.kind, layer.channels) for i, layer in enumerate(layers)]
    active_columns = layout.columns["active"]
    results = []
    for r, n in enumerate(sizes):
        mins = minima[r]
        unknown = [i for i in structural_layers if mins[i] != mins[i]]  # saw no zero
        if unknown:
            measured = (measure_min(r, [layers[i] for i in unknown]) if measure_min else None) or {}
            for i in unknown:
                mins[i] = measured.get(layers[i].name)
        dead = dead_channels.get(r, {})
        summary: list[LayerSummary] = [
            {
                "name": name,
                "kind": kind,
                "channels": channels_,
                "inactive_fraction": inactive_,
                "dead_units": dead_units,
                "dead_channels": dead.get(i, []),
                "mean": mean,
                "std": None if std != std else std,  # NaN: y*y overflowed float32
                "min": minimum,
                "max": maximum,
                "saturated_fraction": None if sat != sat else sat,  # NaN: not sigmoid/tanh
                "samples": n,
            }
            for (i, name, kind, channels_), inactive_, dead_units, mean, std, minimum, maximum, sat
            in zip(
                static, inactive[r], dead_counts[r], means_list[r], stds_list[r], mins,
                maxima[r], saturated[r], strict=True,
            )
        ]  # fmt: skip
        if channels[r]:
            for entry in summary:
                entry["channel_activity"] = col_active[r, active_columns[entry["name"]]].tolist()
        results.append(summary)
    return results


def request_rows(sizes: Sequence[int]) -> list[slice]:
    """The rows of a merged batch that belong to each request, ``sizes[i]`` rows each."""
    bounds = np.cumsum([0, *sizes]).tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _per_request(packed: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Column means (float64), maxima and minima of each request's rows: (R, width) each.
    One-sample requests (the usual case under load) are their own rows; numpy's reduceat
    over rows is slow (~300 us for 32 groups of a ResNet-20's columns), one call per request
    is not."""
    if len(sizes) == packed.shape[0]:
        return packed.astype(np.float64), packed, packed
    if len(sizes) == 1:
        return (
            packed.sum(axis=0, dtype=np.float64, keepdims=True) / packed.shape[0],
            packed.max(axis=0, keepdims=True),
            packed.min(axis=0, keepdims=True),
        )
    parts = [packed[rows] for rows in request_rows(sizes)]
    return (
        np.stack([p.sum(axis=0, dtype=np.float64) / p.shape[0] for p in parts]),
        np.stack([p.max(axis=0) for p in parts]),
        np.stack([p.min(axis=0) for p in parts]),
    )


def _moments(
    packed: np.ndarray, layout: StatsLayout, sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per request and layer (R, layers): the mean and the variance, in float64.

    The graph gives, per sample and channel (a group g of P positions), its float32 mean m_g
    and the mean d_g and mean square q_g of the deviations y - m_g (``instrument``). Then the
    group's mean is m_g + d_g (d_g is m_g's rounding error) and its variance q_g - d_g^2;
    the layer's variance over a request's groups is the mean of the group variances plus the
    variance of the group means (Chan, Golub and LeVeque's pairwise combination, here with
    the request's layer mean subtracted before squaring: two-pass, float64). Nothing is
    computed as E[y^2] - E[y]^2 in float32, whose cancellation made near-constant layers'
    std wrong by 100x (issue 16): the error now scales with the std, not with the mean.
    An infinite deviation square (|y - m| > 1.8e19 overflowed float32) gives NaN.
    """
    index, starts, widths = layout.index, layout.starts["active"], layout.sizes["active"]
    dmean = packed[:, index["dmean"]].astype(np.float64)  # (N, sum C)
    group_means = packed[:, index["mean"]] + dmean
    with np.errstate(invalid="ignore", over="ignore"):
        within = packed[:, index["dmeansq"]] - dmean * dmean
    if len(sizes) == packed.shape[0]:
        owner = np.arange(len(sizes))
        req_means, req_within = group_means, within
    else:
        owner = np.repeat(np.arange(len(sizes)), sizes)  # row -> request
        parts = request_rows(sizes)
        req_means = np.stack([group_means[p].mean(axis=0) for p in parts])  # (R, sum C)
        req_within = np.stack([within[p].mean(axis=0) for p in parts])
    means = np.add.reduceat(req_means, starts, axis=1) / widths  # (R, layers)
    spread = group_means - np.repeat(means, widths, axis=1)[owner]  # (N, sum C)
    spread *= spread
    if len(sizes) != packed.shape[0]:
        spread = np.stack([spread[p].mean(axis=0) for p in request_rows(sizes)])
    with np.errstate(invalid="ignore"):
        variances = (np.add.reduceat(req_within + spread, starts, axis=1)) / widths
    return means, variances


def _dead_channels(dead: np.ndarray, starts: np.ndarray) -> dict[int, dict[int, list[int]]]:
    """request -> layer -> that layer's dead channel indices, for the pairs that have any,
    from the (R, sum C) dead mask and each layer's first column."""
    rows, cols = np.nonzero(dead)  # row-major: by request, then column (so by layer)
    if not rows.size:
        return {}
    layer = np.searchsorted(starts, cols, side="right") - 1
    local = (cols - starts[layer]).tolist()
    key = rows * len(starts) + layer  # one run of equal keys per (request, layer)
    cuts = [0, *(np.flatnonzero(np.diff(key)) + 1).tolist(), len(local)]
    keys = key.tolist()
    found: dict[int, dict[int, list[int]]] = {}
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        request, layer_index = divmod(keys[a], len(starts))
        found.setdefault(request, {})[layer_index] = local[a:b]
    return found


def _per_layer(ufunc: np.ufunc, columns: np.ndarray, layout: StatsLayout, stat: str) -> np.ndarray:
    """(R, layers): per request and layer, the reduction (``np.minimum``, or the mean for
    ``np.add``) of ``stat``; NaN for layers without it."""
    found = np.full((columns.shape[0], len(layout.columns["active"])), np.nan)
    if stat not in layout.index:
        return found
    values = ufunc.reduceat(columns[:, layout.index[stat]], layout.starts[stat], axis=1)
    if ufunc is np.add:
        values = values / layout.sizes[stat]
    found[:, layout.layer_positions[stat]] = values
    return found
