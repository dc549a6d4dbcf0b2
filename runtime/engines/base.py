"""One ``Engine`` interface for every backend (eager, compiled, TensorRT).

An engine owns its executable (module, compiled artifact or TensorRT plan), named inputs
and outputs, and runs on the caller's CUDA stream::

    outputs = engine.run({"latent_input": x, "audio_features": a}, stream)

Outputs may alias buffers the engine reuses on the next call; copy them if they must live on.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from talkrt.streams import on_stream


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of an engine; ``"batch"`` in ``shape`` marks the dynamic batch axis."""

    name: str
    shape: tuple[int | str, ...]

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """``shape`` with its ``"batch"`` axis replaced by ``batch`` (every other axis is an int)."""
        return tuple(batch if d == "batch" else int(d) for d in self.shape)


class Engine(abc.ABC):
    """A compiled model with named tensors. Subclasses allocate in ``__init__``."""

    backend: str = "abstract"

    def __init__(self, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], max_batch: int):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self.max_batch = max_batch

    def check_inputs(self, feeds: dict[str, torch.Tensor]) -> int:
        """Validate names and the batch size; return the batch size."""
        expected = {s.name for s in self.inputs}
        if set(feeds) != expected:
            raise ValueError(f"engine '{self.name}' takes inputs {sorted(expected)}, got {sorted(feeds)}")
        batches = {name: int(t.shape[0]) for name, t in feeds.items()}
        batch = batches[self.inputs[0].name]
        if len(set(batches.values())) != 1:
            raise ValueError(f"engine '{self.name}': inputs disagree on the batch size: {batches}")
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"engine '{self.name}': batch {batch} outside 1..{self.max_batch}")
        return batch

    @abc.abstractmethod
    def run(self, feeds: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        """Run on ``stream`` (the current stream when None); returns named outputs."""


class EagerEngine(Engine):
    """PyTorch eager execution of an ``nn.Module`` whose forward takes the inputs positionally."""

    backend = "eager"

    def __init__(self, name: str, module: torch.nn.Module, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], max_batch: int):
        super().__init__(name, inputs, outputs, max_batch)
        self.module = module

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        self.check_inputs(feeds)
        with on_stream(stream):
            result = self.module(*(feeds[s.name] for s in self.inputs))
        if not isinstance(result, (tuple, list)):
            result = (result,)
        return {spec.name: value for spec, value in zip(self.outputs, result)}
