"""Decode steps of ``model.generate()`` replayed from a CUDA graph (``SeerState.cuda_graphs``).

An eager sparse decode step is bound by the host: per layer, the decode gate, the key-cache update, the
selection and the kernel are ~40 small launches, and transformers' layer around them as many again (116 ms
a step for 32 layers at batch 16, of which a replayed seer step is 0.2 ms a layer). Engines capture their
decode step once and replay it; this module does that for transformers' ``generate``.

How (one :class:`DecodeGraphs` per model, installed as the model's ``forward`` by
:func:`~seerattn.hf.apply_seer_attention` when the config has a decode section):

- ``SeerState.cuda_graphs``: None (default) captures the steps that can be (below) and runs the others
  eagerly, True raises on a step that cannot be, False never captures.
- A *step* is a forward of one token per sequence that continues a cache with fixed shapes (transformers'
  ``StaticCache``: ``cache.is_compileable``); with sparse decode on, every layer's decode-gate key cache must
  belong to that cache (the prompt's forward made them). Every other forward (the prompt, chunks, anything
  on a ``DynamicCache``) runs the model's own forward, unchanged.
- The first step of a *shape* (the key below) runs eagerly, on the stream the graph will use (kernel tuning,
  Triton compilation, cuBLAS workspaces happen here); the second is captured and replayed; every later step
  copies its input tensors (input ids, positions, the 4-D mask transformers builds for a static cache) into
  the graph's buffers and replays.
- The key: the cache object, the tensors' shapes / dtypes, the other arguments, the addresses of the KV
  cache's and the key caches' tensors (a beam reorder or a new generate gives new ones) and the
  :class:`~seerattn.hf.SeerConfig` object (``state.set`` replaces it). A new key drops the old graph (its
  memory pool) and starts again with an eager step.
- What a replay cannot do, the host does around it: before, check that the cache has room (the eager step's
  ``_DecodeCache.check_handover``); after, advance the host counters a step advances (the layers' token
  counts), and give ``state.stats`` the captured step's per-layer entries again (the device scalars a replay
  rewrites; reading ``stats`` turns them into numbers).

What a captured step needs (``_obstacles``; ``cuda_graphs=None``, the default, runs a step that lacks one
eagerly, ``True`` raises and says which): CUDA, a cache of fixed shapes, no host synchronisation in the model's
forward (dynamic-NTK and LongRoPE rotary embeddings read the positions to the host: those models run eagerly),
no ``decode_observer`` / ``decode_select_fn`` / ``capture`` on the state (Python called per step would run once,
at capture), arguments that are tensors or plain values. Not checked: the model's parameters must stay where
they were at capture during one generate (no ``.to()`` between its steps).
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..gate.decode_gate import length_free_rotary

if TYPE_CHECKING:
    from .integration import SeerState, _DecodeCache

__all__ = ["DecodeGraphs"]

_CACHE_ARGS = ("past_key_values", "cache")
# argument values a key may hold as they are (hashable, compared by value)
_PLAIN = (bool, int, float, str, type(None))


@dataclass
class _Captured:
    key: tuple
    cache: weakref.ref
    config: object  # the SeerConfig the step was captured with (compared by identity)
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph's input buffers, by flattened argument name
    output: type  # the forward's ModelOutput class
    fields: dict[str, Any]  # its fields (tensors in the graph's pool), the cache left out (held weakly above)
    cache_fields: tuple[str, ...]  # the fields that held the cache
    entries: list  # the layers' _DecodeCache entries the step advances (empty when decode is off)
    stats: dict[int, dict]  # state._stats as the captured step left it


def _flatten(kwargs: dict) -> tuple[dict[str, torch.Tensor], tuple, list[str]]:
    """The step's tensor arguments by name (a dict argument, e.g. a hybrid model's masks by layer type,
    flattened to ``name.key``), the other arguments as a hashable tuple of (name, value), and the names of
    arguments a captured step cannot take (neither a tensor nor a plain bool / int / float / str / None)."""
    tensors, plain, odd = {}, [], []
    for name, value in sorted(kwargs.items()):
        if name in _CACHE_ARGS:
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            full = name if sub is None else f"{name}.{sub}"
            if isinstance(v, torch.Tensor):
                tensors[full] = v
            elif isinstance(v, _PLAIN):
                plain.append((full, v))
            else:
                odd.append(f"{full} ({type(v).__name__})")
    return tensors, tuple(plain), odd


def _unflatten(kwargs: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """``kwargs`` with its tensors replaced by ``tensors`` (named as :func:`_flatten` names them)."""
    out = dict(kwargs)
    for full, t in tensors.items():
        name, _, sub = full.partition(".")
        if not sub:
            out[name] = t
            continue
        if out[name] is kwargs[name]:
            out[name] = dict(kwargs[name])  # the caller's dict is not changed
        out[name][sub] = t
    return out


def _copied(value):
    """A copy of a step output's tensors (tensors, and tuples / lists of them), other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    return value


class DecodeGraphs:
    """The model's ``forward`` with decode steps replayed from a CUDA graph (module docstring).

    Attributes:
        captures: graphs captured so far (one per generate and batch shape).
        replays: steps replayed so far.
    """

    def __init__(self, forward: Callable, state: SeerState):
        self._forward = forward
        self._signature = inspect.signature(forward)
        # transformers reads the forward's parameters (logits_to_keep, position_ids, ...) to decide what to pass
        functools.update_wrapper(self, forward)
        self._state = weakref.ref(state)  # the state holds this object: no cycle through it
        self._captured: _Captured | None = None
        self._warm: tuple | None = None  # the key of the last eager step (the next one with it is captured)
        self._stream: torch.cuda.Stream | None = None
        self.captures = 0
        self.replays = 0

    def __deepcopy__(self, memo: dict) -> DecodeGraphs:
        # a copied model's forward: its own bound forward and state (the weak reference alone would still name ours)
        return DecodeGraphs(copy.deepcopy(self._forward, memo), copy.deepcopy(self._state(), memo))

    def __call__(self, *args, **kwargs):
        state = self._state()
        if state is None or state.cuda_graphs is False:
            return self._forward(*args, **kwargs)
        step = self._step_arguments(state, args, kwargs)
        if step is None:  # not a decode step: the prompt, a chunk, no cache, a cache the state does not follow
            return self._forward(*args, **kwargs)
        named, cache, ids, entries = step
        tensors, plain, odd = _flatten(named)
        why = self._obstacles(state, cache, ids)
        if odd:
            why.append(f"arguments neither tensors nor plain values: {', '.join(odd)}")
        if why and state.cuda_graphs is None:  # automatic: the steps that can be captured are
            return self._forward(*args, **kwargs)
        if why:
            raise ValueError(
                "SeerState.cuda_graphs=True but this decode step cannot be replayed from a CUDA graph: "
                f"{'; '.join(why)}. Set cuda_graphs=None (capture where possible) or False"
            )
        key = self._key(state, cache, tensors, plain, entries)
        cap = self._captured
        if cap is not None and cap.key == key and cap.cache() is cache and cap.config is state.config:
            return self._replay(state, cap, tensors, cache)
        self._captured = None  # a new shape: the old graph and its memory pool go
        if self._warm != key:
            self._warm = key
            return self._eager(named)
        return self._capture(state, key, cache, named, tensors, entries)

    # ------------------------------------------------------------------------------------- what a step is
    def _step_arguments(self, state: SeerState, args: tuple, kwargs: dict) -> tuple | None:
        """For a decode step: its arguments by name, the cache, the input ids (or embeddings) and the layers'
        key-cache entries; None for any other forward."""
        bound = self._signature.bind(*args, **kwargs).arguments
        named = {}
        for name, value in bound.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    return None  # extra positional arguments: nothing a generate step passes
            elif kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        cache = next((named[n] for n in _CACHE_ARGS if named.get(n) is not None), None)
        ids = named.get("input_ids")
        ids = named.get("inputs_embeds") if ids is None else ids
        if cache is None or not isinstance(ids, torch.Tensor) or ids.dim() < 2 or ids.shape[1] != 1:
            return None
        entries = self._entries(state, cache)
        if entries is None:  # a prompt forward of one token (an empty cache), or a cache without the prompt's keys
            return None
        return named, cache, ids, entries

    @staticmethod
    def _entries(state: SeerState, cache) -> list[_DecodeCache] | None:
        """The layers' decode-gate key caches this step advances ([] with sparse decode off), or None when
        ``cache`` is not one the state's sparse decode follows (its prompt forward has not run)."""
        if not state.decoding:
            return []
        entries = [state._decode.get(i) for i in range(len(state._attn_modules))]
        if any(e is None or e.owner() is not cache for e in entries):
            return None
        return entries

    @staticmethod
    def _obstacles(state: SeerState, cache, ids: torch.Tensor) -> list[str]:
        """Why this decode step cannot be captured (empty: it can)."""
        why = []
        if ids.device.type != "cuda":
            why.append(f"the step runs on {ids.device.type}, not CUDA")
        if not getattr(cache, "is_compileable", False):
            why.append(
                f"the cache is a {type(cache).__name__}, whose tensors grow every step (generate(..., "
                "cache_implementation='static') has fixed shapes)"
            )
        if state._rotary is not None and not length_free_rotary(state._rotary):
            why.append(f"the model's RoPE ({state._rotary.rope_type!r}) reads the positions to the host in every step")
        hooks = [n for n in ("decode_observer", "decode_select_fn") if getattr(state, n) is not None]
        hooks += ["capture"] if state.capture else []
        if hooks:
            why.append(
                f"{', '.join(hooks)} is set (Python called in the step would run once, at capture: a replay runs "
                "kernels only)"
            )
        return why

    @staticmethod
    def _key(state: SeerState, cache, tensors: dict, plain: tuple, entries: list) -> tuple:
        shapes = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in tensors.items())
        kv = tuple((layer.keys.data_ptr(), layer.values.data_ptr()) for layer in getattr(cache, "layers", ()))
        seer = tuple(
            (e.keys.keys.data_ptr(), e.keys.lengths.data_ptr(), e.keys.num_blocks.data_ptr(), e.keys._pools.data_ptr())
            + (None if e.starts is None else e.starts.data_ptr(),)
            + (None if e.bounds is None else (e.bounds.kmin.data_ptr(), e.bounds.kmax.data_ptr()),)
            for e in entries
        )
        return (id(cache), id(state.config), state.record_densities, shapes, plain, kv, seer)

    # ------------------------------------------------------------------------------------- running it
    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _eager(self, kwargs: dict):
        """The shape's first step, eagerly on the capture's stream (what a capture needs is set up there)."""
        stream, current = self._side_stream(), torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            out = self._forward(**kwargs)
        current.wait_stream(stream)
        return out

    def _capture(self, state: SeerState, key: tuple, cache, kwargs: dict, tensors: dict, entries: list):
        inputs = {n: t.clone() for n, t in tensors.items()}
        graph = torch.cuda.CUDAGraph()
        stream = self._side_stream()
        try:
            with torch.cuda.graph(graph, stream=stream):
                output = self._forward(**_unflatten(kwargs, inputs))
        except RuntimeError as e:
            raise RuntimeError(
                "SeerState.cuda_graphs: capturing the decode step failed, most likely on a host synchronisation in "
                "the model's forward (e.g. dynamic NTK RoPE, which reads the positions to the host). The step's "
                "state is undefined now: start a new generate() with cuda_graphs=False"
            ) from e
        stats = {layer: dict(entry) for layer, entry in state._stats.items()}
        fields = {k: v for k, v in output.items() if v is not cache}
        cache_fields = tuple(k for k, v in output.items() if v is cache)
        cap = _Captured(
            key, weakref.ref(cache), state.config, graph, inputs, type(output), fields, cache_fields, entries, stats
        )
        self._captured = cap
        self.captures += 1
        # The capture ran the step's host side (each layer's token count +1) but no kernel: this replay does the
        # step's work, and its host side is not counted again.
        graph.replay()  # state._stats holds the captured step's entries, ``stats`` copies of them
        return self._result(cap, cache)

    def _replay(self, state: SeerState, cap: _Captured, tensors: dict, cache):
        for layer, e in enumerate(cap.entries):  # the eager step's check: a static cache hands over its capacity
            e.check_handover(layer, e.capacity, 1)
        for name, buf in cap.inputs.items():
            buf.copy_(tensors[name])
        cap.graph.replay()
        for e in cap.entries:  # what the eager step's host side does (_decode_step, GateKeyCache.append)
            e.length += 1
            e.keys.count_replayed_append()
        state._stats = {layer: dict(entry) for layer, entry in cap.stats.items()}
        self.replays += 1
        return self._result(cap, cache)

    @staticmethod
    def _result(cap: _Captured, cache):
        """The step's output: the graph's tensors copied (the next replay overwrites them; inside tuples too, e.g.
        hidden states), the cache as is."""
        fields = {k: _copied(v) for k, v in cap.fields.items()}
        return cap.output(**fields, **dict.fromkeys(cap.cache_fields, cache))
