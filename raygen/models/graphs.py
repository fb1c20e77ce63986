"""Static-shape decode steps, captured as CUDA graphs: the `graphs` sampling option.

A token family's decode loop is launch-bound on a GPU: a step of a small batch runs hundreds of
short kernels whose CPU-side launch costs more than their GPU time. The static path gives each
step fixed shapes (a `StaticCaches` KV cache read whole under a mask, positions and cache slots
passed as tensors), so one step function serves every step of a size; `StepGraphs` then
captures it once per distinct input shape as a torch.cuda.CUDAGraph and replays it.

Only the transformer forward and the head run inside a graph; sampling (`opts.sample`, every
draw from the generator) stays eager outside it, so the random stream is the eager path's.

    mode "off"   today's dynamic path (caches read up to the current length)
    mode "on"    the static path; captured where possible (`decode_plan`), else run eagerly (CPU tests)
    mode "auto"  "on" where capture is possible: a CUDA device, no forward hooks (ZeRO-3), no
                 autocast; else "off"

The static path's logits equal the dynamic path's to float32 rounding (attention over the whole
cache sums in another order), so with a fixed seed both draw the same ids except where a draw
falls within that rounding of a boundary.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

GRAPH_MODES = ("auto", "on", "off")
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (lazy library init, allocator)

_T = TypeVar("_T")


def check_graphs_mode(mode: str) -> None:
    if mode not in GRAPH_MODES:
        raise ValueError(f"graphs must be one of {', '.join(GRAPH_MODES)}, got {mode!r}")


def decode_plan(mode: str, module: nn.Module) -> tuple[bool, bool]:
    """-> (static, capture): whether `module` decodes on the static path, and whether it captures graphs.

    Capture needs a CUDA device, no forward hooks on the module (ZeRO-3 gathers its partitioned
    weights in hooks, with collectives a graph cannot hold) and autocast off (its cast cache does
    not survive a capture). Where capture is not possible "auto" is "off" and "on" runs the
    static path eagerly.
    """
    check_graphs_mode(mode)
    if mode == "off":
        return False, False
    capturable = (next(module.parameters()).device.type == "cuda" and not torch.is_autocast_enabled("cuda")
                  and not _has_hooks(module))
    return (capturable, capturable) if mode == "auto" else (True, capturable)


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the static input buffers the graph reads
    outputs: Any  # what the step returned during capture: tensors the graph overwrites


class StepGraphs:
    """Run step functions of static-shape tensors, as one CUDA graph per distinct step when `capture`.

    `graphs(key, fn, *inputs)` returns fn(*inputs). Without capture it just calls fn. With
    capture, the first call of a (key, input shapes and dtypes) copies the inputs into static
    buffers, runs fn WARMUP_RUNS times on a side stream and captures it; every call then copies
    its inputs into those buffers and replays. So:

    - everything fn reads besides its inputs (weights, caches, tables) must keep its memory, and
      anything else fn depends on (Python numbers, flags) must be part of `key`;
    - fn must give the same result when run again on the same inputs (a step that writes its
      keys/values at given slots does), since the warm-up runs execute it for real;
    - the returned tensors are the graph's outputs: the next replay of that graph overwrites
      them, so use (or copy) them before the next call.

    `simulate` (tests) follows the capture path's bookkeeping on any device: static input
    buffers, one warm-up-and-record run per key, then every call copies its inputs in, runs fn
    on the buffers and copies the results into the recorded outputs.
    """

    def __init__(self, *, capture: bool, simulate: bool = False):
        self.capture = capture
        self.simulate = simulate
        self.graphs: dict[Hashable, _Graph] = {}
        self.pool: Any = None  # one memory pool for all graphs (they replay one at a time)

    def __len__(self) -> int:
        return len(self.graphs)

    def __call__(self, key: Hashable, fn: Callable[..., Any], *inputs: torch.Tensor) -> Any:
        if not (self.capture or self.simulate):
            return fn(*inputs)
        full_key = (key, tuple((tuple(x.shape), x.dtype, x.device) for x in inputs))
        entry = self.graphs.get(full_key)
        fresh = entry is None
        if fresh and not self.simulate:
            try:
                entry = self._capture(fn, inputs)
            except RuntimeError as e:  # an op that cannot be captured: this decode goes on eagerly, same ids
                self.capture = False
                warnings.warn(f"CUDA graph capture of a decode step failed ({str(e).splitlines()[0]}); decoding "
                              "without graphs (sample.graphs=off skips the attempt)", RuntimeWarning, stacklevel=2)
                return fn(*inputs)
            self.graphs[full_key] = entry
        elif fresh:
            entry = self.graphs[full_key] = self._record(fn, inputs)
        if self.simulate:
            if not fresh:
                for dst, src in zip(entry.inputs, inputs):
                    dst.copy_(src)
                _copy_tree(entry.outputs, fn(*entry.inputs))
            return entry.outputs
        for dst, src in zip(entry.inputs, inputs):
            dst.copy_(src)
        entry.graph.replay()
        return entry.outputs

    def _record(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> _Graph:
        static = tuple(x.clone() for x in inputs)
        return _Graph(graph=None, inputs=static, outputs=fn(*static))

    def _capture(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> _Graph:
        static = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(*static)
        self.pool = graph.pool()
        return _Graph(graph=graph, inputs=static, outputs=outputs)


def _copy_tree(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    else:
        for d, s in zip(dst, src):
            _copy_tree(d, s)


# --- decode state kept between calls (captured graphs point at its memory) ---------------------

_KEPT: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, tuple[int, ...], Any]] = weakref.WeakKeyDictionary()


def kept(module: nn.Module, key: Hashable, build: Callable[[], _T]) -> _T:
    """The object build() made for (module, key), kept between calls; one per module, the last key wins.

    Captured graphs read the module's weights and tables at fixed addresses, so the object is
    rebuilt when any parameter or buffer of the module has moved (`.to`, a cast, rebuilt tables);
    in-place weight updates (an optimizer step, load_state_dict) are seen by the graphs as they are.
    The state is held outside the module (a weak map), so copying or pickling the module ignores it.
    """
    stamp = tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))
    old = _KEPT.get(module)
    if old is not None and old[0] == key and old[1] == stamp:
        return old[2]
    _KEPT.pop(module, None)  # free the old state (and its graphs) before building the new one
    obj = build()
    _KEPT[module] = (key, stamp, obj)
    return obj


SIMULATE = False  # tests: run StepGraphs' capture bookkeeping (and keep state between calls) without CUDA


def step_runner(module: nn.Module, *, capture: bool, key: Hashable, build: Callable[[], _T]
                ) -> tuple[_T, StepGraphs]:
    """(build()'s decode state, the StepGraphs of its steps); kept between calls (`kept`) when capturing."""
    if capture or SIMULATE:
        return kept(module, key, lambda: (build(), StepGraphs(capture=capture, simulate=not capture)))
    return build(), StepGraphs(capture=False)


def release(module: nn.Module) -> None:
    """Drop the decode state (static caches, captured graphs) kept for `module`."""
    _KEPT.pop(module, None)
