"""The ``compiled`` backend: ``torch.compile`` per batch bucket, warmed from saved cache artefacts.

``make engines`` compiles every bucket once and saves ``torch.compiler.save_cache_artifacts()``
(Inductor FX-graph, AOTAutograd and autotuning caches) beside a manifest.  At start-up
``load_compiled_artifacts`` checks the manifest against this machine and config and hot-loads
the bytes; ``CompiledEngine`` then compiles its module per bucket, which now hits the caches
(seconds instead of minutes), and optionally captures one CUDA graph per bucket.

A cache miss during warm-up means Inductor compiled from scratch; that is logged as a
warning, never silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from talkrt.config import TalkrtConfig
from talkrt.engines.graphs import BucketedEngine
from talkrt.engines.manifest import (
    check_manifest, config_dir, dtype_name, machine_info, read_manifest, rebuild_hint, sha256_files,
)
from talkrt.errors import EngineError

log = logging.getLogger(__name__)

DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
ARTIFACTS_FILE = "artifacts.bin"
MANIFEST_FILE = "manifest.json"
_loaded_artifacts: set[str] = set()   # sha256 of artefacts already hot-loaded in this process


def compiled_dir(cfg: TalkrtConfig, device: torch.device | str, dtype: torch.dtype,
                 engines_dir: str | Path | None = None) -> Path:
    return config_dir(cfg, engines_dir) / "compiled" / f"{torch.device(device).type}-{dtype_name(dtype)}"


def expected_manifest(cfg: TalkrtConfig, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Manifest fields that must match for saved artefacts to be usable here."""
    return {"kind": "compiled", "torch_version": torch.__version__, **machine_info(device),
            "dtype": dtype_name(dtype), "config_hash": cfg.model_hash()}


def raise_recompile_limit(needed: int) -> None:
    """Each bucket is one static-shape recompile of the same ``forward``; allow them all."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * needed)


def compile_module(module: torch.nn.Module, mode: str):
    """``torch.compile`` with static shapes: one specialised graph per batch bucket."""
    return torch.compile(module, mode=mode, dynamic=False)


def cache_counters() -> dict[str, int]:
    """Inductor / AOTAutograd cache counters of this process (to tell hits from fresh compiles)."""
    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_hit": ind["fxgraph_cache_hit"], "fx_miss": ind["fxgraph_cache_miss"],
            "fx_bypass": ind["fxgraph_cache_bypass"], "aot_hit": aot["autograd_cache_hit"],
            "aot_miss": aot["autograd_cache_miss"]}


def from_scratch_compiles(before: dict[str, int], after: dict[str, int]) -> int:
    """Graphs Inductor had to compile because no cache entry matched."""
    return (after["fx_miss"] - before["fx_miss"]) + (after["fx_bypass"] - before["fx_bypass"])


def load_compiled_artifacts(cfg: TalkrtConfig, *, device: torch.device | str, dtype: torch.dtype,
                            models: Sequence[str], buckets: Sequence[int],
                            engines_dir: str | Path | None = None) -> dict[str, Any]:
    """Check the saved manifest and hot-load the cache artefacts; return the manifest.

    Raises ``EngineError`` (saying to run ``make engines``) if they are missing, built on
    another GPU / torch / dtype / config, or do not cover ``models`` at ``buckets``.
    """
    folder = compiled_dir(cfg, device, dtype, engines_dir)
    manifest = read_manifest(folder / MANIFEST_FILE, "compiled engines", cfg.name)
    check_manifest(manifest, expected_manifest(cfg, device, dtype), what="compiled engines",
                   path=folder, cfg_name=cfg.name)
    built = manifest.get("buckets", {})
    for name in models:
        missing = sorted(set(buckets) - set(built.get(name, [])))
        if missing:
            raise EngineError(f"compiled engines at {folder}: '{name}' was not built for batch size(s) {missing} "
                              f"(built: {built.get(name, [])}); {rebuild_hint(cfg.name)} with --max-batch "
                              f"{max(buckets)}")
    artifacts = folder / manifest.get("artifacts_file", ARTIFACTS_FILE)
    if not artifacts.is_file():
        raise EngineError(f"compiled engines: {artifacts} is missing; {rebuild_hint(cfg.name)}")
    digest = sha256_files([artifacts])
    if digest != manifest.get("artifacts_sha256"):
        raise EngineError(f"compiled engines: {artifacts} does not match its manifest (corrupt or partly "
                          f"written); {rebuild_hint(cfg.name)}")
    if digest not in _loaded_artifacts:
        start = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(artifacts.read_bytes())
        if info is None:
            raise EngineError(f"compiled engines: torch could not read {artifacts}; {rebuild_hint(cfg.name)}")
        _loaded_artifacts.add(digest)
        log.info("loaded compile caches from %s (%.0f MB) in %.1f s", artifacts,
                 artifacts.stat().st_size / 1e6, time.perf_counter() - start)
    return manifest


class CompiledEngine(BucketedEngine):
    """``torch.compile``d module at fixed batch buckets (pads a smaller batch up to its bucket).

    Construct after ``load_compiled_artifacts`` (or in the build, which compiles from
    scratch on purpose: ``expect_cache_hits=False``).
    """

    backend = "compiled"

    def __init__(self, name: str, module: torch.nn.Module, inputs, outputs, buckets: Sequence[int], *,
                 device, dtype, mode: str = DEFAULT_COMPILE_MODE, cuda_graphs: bool = False,
                 expect_cache_hits: bool = True, warmup: bool = True, graph_fallback: bool = False):
        self.module = module
        self.mode = mode
        raise_recompile_limit(len(buckets) + 4)
        compiled = compile_module(module, mode)
        before = cache_counters()
        start = time.perf_counter()
        super().__init__(name, compiled, inputs, outputs, buckets, device=device, dtype=dtype,
                         cuda_graphs=cuda_graphs, warmup=warmup, graph_fallback=graph_fallback)
        after = cache_counters()
        self.fresh_compiles = from_scratch_compiles(before, after)
        self.cache_hits = (after["fx_hit"] - before["fx_hit"]) + (after["aot_hit"] - before["aot_hit"])
        if warmup:
            log.info("compiled engine %s: %d bucket(s) ready in %.1f s (%d cache hit(s), %d fresh compile(s))",
                     name, len(self.buckets), time.perf_counter() - start, self.cache_hits, self.fresh_compiles)
        if expect_cache_hits and self.fresh_compiles:
            log.warning("compiled engine %s: %d graph(s) were compiled from scratch (cache miss): the saved "
                        "artefacts do not match this torch/Inductor setup; %s", name, self.fresh_compiles,
                        rebuild_hint())
