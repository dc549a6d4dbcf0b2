"""The ``compiled`` backend: ``torch.compile`` per batch bucket, warmed from saved cache artifacts.

``make engines`` compiles every bucket once and saves ``torch.compiler.save_cache_artifacts()``
(Inductor FX-graph, AOTAutograd and autotuning caches) beside a manifest whose ``entries``
map model -> bucket -> artifacts file (one self-contained file per (model, bucket), so builds
can be resumed or split across runs) and whose ``artifacts`` map file -> sha256.  At start-up
``load_compiled_artifacts`` checks the manifest against this machine and config and hot-loads
the bytes; ``CompiledEngine`` then compiles its module per bucket, which now hits the caches
(seconds instead of minutes), and optionally captures one CUDA graph per bucket.

A cache miss during warm-up means Inductor compiled from scratch; that is logged as a
warning, never silent.

Why one file per bucket, each saved once: torch's mega-cache recorder appends a chunk per
artifact kind on every ``save_cache_artifacts()`` call, but ``load_cache_artifacts()`` folds
the chunks with ``dict()``, so from a blob saved N times only the LAST chunk of each kind is
loaded (torch 2.11 and 2.13).  The build therefore records each bucket in a fresh recorder
(``fresh_artifact_recording``) and saves it once, and the loader here merges every chunk
anyway (``read_cache_artifacts``), so older multi-save files load completely too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from talkrt.config import TalkrtConfig
from talkrt.engines.graphs import CallableEngine
from talkrt.engines.manifest import (
    check_manifest, config_dir, dtype_name, machine_info, read_manifest, rebuild_hint,
)
from talkrt.errors import EngineError
from talkrt.hashing import sha256_files
from talkrt.models.subpixel import REWRITE_NAME, rewrite_upsamplers

log = logging.getLogger(__name__)

# Inductor's default mode, not max-autotune: on an H200 (fp16, 2026-11-22) autotuning chose
# cuDNN over its Triton templates for the VAE decoder's large convolutions anyway, and did not
# finish one VAE bucket in 100 s, where the default mode compiles a bucket in 11-55 s.
# `make engines COMPILE_MODE=max-autotune-no-cudagraphs` still selects it.
DEFAULT_COMPILE_MODE = "default"
# Inductor freezing: weights become constants, so weight-only work (layout conversions, folded
# scales) is done once at compile time. H200, fp16, CUDA graphs: UNet 0.57 ms/frame at batch 16
# (0.64 without freezing). Frozen graphs are cached like any other in OSS torch, keyed on the
# weights' metadata; the values are read from the module when the cache is loaded.
DEFAULT_FREEZING = True
# Graph rewrites applied to a module before it is compiled (recorded in the manifest, applied
# again at load so the graphs match their caches). subpixel_upsample (talkrt.models.subpixel):
# nearest-2x + 3x3 conv as one stride-2 transposed conv. H100, fp16, freezing + CUDA graphs,
# 2026-11-22: VAE decoder 50.2 -> 46.5 ms at batch 32, 6.87 -> 6.39 ms at batch 4; max |diff|
# against eager fp16 (0-255 scale) 1.25 with and without it.
GRAPH_REWRITES = {REWRITE_NAME: rewrite_upsamplers}
DEFAULT_REWRITES = (REWRITE_NAME,)
MANIFEST_FILE = "manifest.json"
_loaded_artifacts: set[str] = set()   # sha256 of artifacts already hot-loaded in this process


def compiled_dir(cfg: TalkrtConfig, device: torch.device | str, dtype: torch.dtype,
                 engines_dir: str | Path | None = None) -> Path:
    return config_dir(cfg, engines_dir) / "compiled" / f"{torch.device(device).type}-{dtype_name(dtype)}"


def expected_manifest(cfg: TalkrtConfig, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Manifest fields that must match for saved artifacts to be usable here."""
    return {"kind": "compiled", "torch_version": torch.__version__, **machine_info(device),
            "dtype": dtype_name(dtype), "config_hash": cfg.model_hash()}


def raise_recompile_limit(needed: int) -> None:
    """Each bucket is one static-shape recompile of the same ``forward``; allow them all."""
    config = torch._dynamo.config
    for name, value in (("recompile_limit", needed), ("accumulated_recompile_limit", 4 * needed)):
        if not hasattr(config, name):                     # torch < 2.6 spelled it cache_size_limit
            name = name.replace("recompile_limit", "cache_size_limit")
        setattr(config, name, max(getattr(config, name), value))


@dataclass(frozen=True)
class CompileSettings:
    """How the ``compiled`` backend compiles a module; stored in (and read back from) the manifest."""

    mode: str = DEFAULT_COMPILE_MODE
    freezing: bool = DEFAULT_FREEZING
    rewrites: tuple[str, ...] = DEFAULT_REWRITES

    def __post_init__(self) -> None:
        unknown = [r for r in self.rewrites if r not in GRAPH_REWRITES]
        if unknown:
            raise EngineError(f"unknown graph rewrite(s) {unknown}; known: {sorted(GRAPH_REWRITES)}")

    def manifest_fields(self) -> dict[str, Any]:
        return {"compile_mode": self.mode, "freezing": self.freezing, "rewrites": list(self.rewrites)}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "CompileSettings":
        """Settings of a saved build (manifests older than a field get the value they were built with)."""
        return cls(manifest["compile_mode"], bool(manifest.get("freezing", False)),
                   tuple(manifest.get("rewrites", ())))

    def describe(self) -> str:
        return f"mode {self.mode}, freezing {self.freezing}, rewrites {list(self.rewrites) or 'none'}"


def add_compile_arguments(parser) -> None:
    """The ``--compile-mode / --no-freezing / --rewrites`` options of the CLIs that compile."""
    parser.add_argument("--compile-mode", default=DEFAULT_COMPILE_MODE, help="torch.compile mode for 'compiled'")
    parser.add_argument("--no-freezing", dest="freezing", action="store_false",
                        help="compile without Inductor freezing (weights stay parameters)")
    parser.add_argument("--rewrites", default=",".join(DEFAULT_REWRITES),
                        help=f"comma list of graph rewrites before compiling, or 'none' (known: "
                             f"{','.join(GRAPH_REWRITES)}; default: %(default)s)")


def settings_from_args(args) -> CompileSettings:
    """``CompileSettings`` from the options ``add_compile_arguments`` added."""
    names = [] if args.rewrites.strip().lower() == "none" else args.rewrites.split(",")
    return CompileSettings(args.compile_mode, args.freezing, tuple(n.strip() for n in names if n.strip()))


def apply_rewrites(module: torch.nn.Module, rewrites: Sequence[str], name: str = "module") -> torch.nn.Module:
    """``module`` with ``rewrites`` applied in order (the original is left unchanged)."""
    for rewrite in rewrites:
        module, count = GRAPH_REWRITES[rewrite](module)
        log.info("%s: rewrite %s applied to %d layer(s)", name, rewrite, count)
    return module


def compile_module(module: torch.nn.Module, settings: CompileSettings):
    """``torch.compile`` with static shapes: one specialised graph per batch bucket.

    ``mode`` and ``options`` exclude each other in ``torch.compile``, so the mode is expanded
    into its Inductor options and ``freezing`` added to them."""
    from torch._inductor import list_mode_options
    options = {**list_mode_options(settings.mode), "freezing": settings.freezing}
    return torch.compile(module, options=options, dynamic=False)


def cache_counters() -> dict[str, int]:
    """Inductor / AOTAutograd cache counters of this process (to tell hits from fresh compiles)."""
    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_hit": ind["fxgraph_cache_hit"], "fx_miss": ind["fxgraph_cache_miss"],
            "fx_bypass": ind["fxgraph_cache_bypass"], "aot_hit": aot["autograd_cache_hit"],
            "aot_miss": aot["autograd_cache_miss"]}


def cache_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Non-zero counter changes between two ``cache_counters()`` snapshots."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@contextlib.contextmanager
def fresh_artifact_recording() -> Iterator[None]:
    """Record compile-cache artifacts from scratch inside the block (for one self-contained save).

    Outside it torch keeps one process-wide recorder whose saves accumulate chunks that
    ``load_cache_artifacts`` partly drops (see the module docstring); inside it, artifacts
    already recorded earlier in the process (a kernel shared with another bucket, a graph this
    process hit in its local cache) are recorded again, so the block's save stands alone.
    """
    try:
        from torch.compiler._cache import CacheArtifactManager
    except ImportError:                      # layout changed: the loader still merges every chunk
        yield
        return
    if hasattr(CacheArtifactManager, "with_fresh_cache"):
        with CacheArtifactManager.with_fresh_cache():
            yield
    else:
        CacheArtifactManager.clear()
        yield


def read_cache_artifacts(blob: bytes) -> dict[str, list] | None:
    """The artifacts in a ``save_cache_artifacts()`` blob, every chunk merged per kind; None if unreadable.

    ``torch.compiler.load_cache_artifacts`` keeps only the last chunk of each kind, which
    loses all but the last save of a recorder that was saved several times.
    """
    from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer
    CacheArtifactManager._ensure_cache_artifacts_registered()     # private API: ImportError/AttributeError
    to_list = AppendingByteSerializer.to_list                       # propagate, see hot_load_artifacts
    try:
        chunks = to_list(blob, deserialize_fn=_deserialize_single_cache)
    except Exception:  # noqa: BLE001 - a corrupt blob fails in many ways (assert, struct, pickle)
        return None
    merged: dict[str, list] = defaultdict(list)
    for kind, artifacts in chunks:
        merged[kind].extend(artifacts)
    return dict(merged)


def hot_load_artifacts(blob: bytes) -> dict[str, int] | None:
    """Write every artifact of ``blob`` into this process's local caches; per kind counts, None if unreadable."""
    try:
        artifacts = read_cache_artifacts(blob)
    except (ImportError, AttributeError):    # private layout changed: torch's own (last-chunk) loader
        info = torch.compiler.load_cache_artifacts(blob)
        return None if info is None else {kind: len(keys) for kind, keys in info.artifacts.items()}
    if artifacts is None:
        return None
    from torch.compiler._cache import CacheArtifactManager
    info = CacheArtifactManager.populate_caches(artifacts)
    return {kind: len(keys) for kind, keys in info.artifacts.items()}


@dataclass(frozen=True)
class CompiledBuild:
    """A checked compiled build: its compile settings and, per model, the buckets to run."""

    folder: Path
    settings: CompileSettings
    buckets: dict[str, tuple[int, ...]]
    manifest: dict[str, Any]


def usable_buckets(built: Sequence[int], max_batch: int | None) -> tuple[int, ...] | None:
    """Built buckets up to the smallest one holding ``max_batch`` (all when None); None if none does."""
    built = sorted(built)
    if max_batch is None:
        return tuple(built) or None
    cover = next((b for b in built if b >= max_batch), None)
    return None if cover is None else tuple(b for b in built if b <= cover)


def load_compiled_artifacts(cfg: TalkrtConfig, *, device: torch.device | str, dtype: torch.dtype,
                            models: Sequence[str], max_batch: int | None,
                            engines_dir: str | Path | None = None) -> CompiledBuild:
    """Check the saved manifest, hot-load the cache artifacts ``models`` need, return what to run.

    Raises ``EngineError`` (saying to run ``make engines``) if they are missing, built on
    another GPU / torch / dtype / config, corrupt, or have no bucket holding ``max_batch``.
    """
    folder = compiled_dir(cfg, device, dtype, engines_dir)
    manifest = read_manifest(folder / MANIFEST_FILE, "compiled engines", cfg.source)
    check_manifest(manifest, expected_manifest(cfg, device, dtype), what="compiled engines",
                   path=folder, cfg_name=cfg.source)
    entries, digests = manifest.get("entries", {}), manifest.get("artifacts", {})
    buckets, files = {}, set()
    for name in models:
        built = [int(b) for b in entries.get(name, {})]
        usable = usable_buckets(built, max_batch)
        if usable is None:
            raise EngineError(f"compiled engines at {folder}: '{name}' has no build for batch {max_batch} "
                              f"(built: {sorted(built)}); {rebuild_hint(cfg.source)} with --max-batch {max_batch}")
        buckets[name] = usable
        files.update(entries[name][str(b)]["artifacts_file"] for b in usable)
    for file in sorted(files):
        _load_artifacts_file(folder / file, digests.get(file), cfg.source)
    return CompiledBuild(folder, CompileSettings.from_manifest(manifest), buckets, manifest)


def _load_artifacts_file(path: Path, expected_sha: str | None, cfg_name: str) -> None:
    if not path.is_file():
        raise EngineError(f"compiled engines: {path} is missing; {rebuild_hint(cfg_name)}")
    digest = sha256_files([path])
    if digest != expected_sha:
        raise EngineError(f"compiled engines: {path} does not match its manifest (corrupt or partly written); "
                          f"{rebuild_hint(cfg_name)}")
    if digest in _loaded_artifacts:
        return
    start = time.perf_counter()
    counts = hot_load_artifacts(path.read_bytes())
    if counts is None:
        raise EngineError(f"compiled engines: torch could not read {path}; {rebuild_hint(cfg_name)}")
    _loaded_artifacts.add(digest)
    log.info("loaded compile caches from %s (%.1f MB, %s) in %.1f s", path.name, path.stat().st_size / 1e6,
             counts, time.perf_counter() - start)


class CompiledEngine(CallableEngine):
    """``torch.compile``d module at fixed batch buckets (pads a smaller batch up to its bucket).

    Construct after ``load_compiled_artifacts`` (or in the build, which compiles from
    scratch on purpose: ``expect_cache_hits=False``).  Puts ``module`` in eval mode without
    gradients, as the build does, since graph cache keys depend on both.
    """

    backend = "compiled"

    def __init__(self, name: str, module: torch.nn.Module, inputs, outputs, buckets: Sequence[int], *,
                 device, dtype, settings: CompileSettings = CompileSettings(), cuda_graphs: bool = False,
                 expect_cache_hits: bool = True, warmup: bool = True, graph_fallback: bool = False):
        module.eval().requires_grad_(False)     # the state the build compiled in; else every graph misses
        self.module = module                    # as given (rewrites are applied to a shallow copy)
        self.settings = settings
        self.expect_cache_hits = expect_cache_hits
        self.bucket_cache: dict[int, dict[str, int]] = {}   # per bucket: cache counter deltas of its warm-up
        raise_recompile_limit(len(buckets) + 4)
        compiled = compile_module(apply_rewrites(module, settings.rewrites, name).eval(), settings)
        start = time.perf_counter()
        super().__init__(name, compiled, inputs, outputs, buckets, device=device, dtype=dtype,
                         cuda_graphs=cuda_graphs, warmup=warmup, graph_fallback=graph_fallback)
        if warmup:
            log.info("compiled engine %s: %d bucket(s) ready in %.1f s (%d cache hit(s), %d fresh compile(s))",
                     name, len(self.buckets), time.perf_counter() - start, self.cache_hits, self.fresh_compiles)

    @property
    def fresh_compiles(self) -> int:
        """Graphs compiled from scratch (cache miss or bypass) while preparing buckets so far."""
        return sum(d.get("fx_miss", 0) + d.get("fx_bypass", 0) for d in self.bucket_cache.values())

    @property
    def cache_hits(self) -> int:
        return sum(d.get("fx_hit", 0) + d.get("aot_hit", 0) for d in self.bucket_cache.values())

    def prepare(self, bucket: int) -> None:
        before = cache_counters()
        super().prepare(bucket)
        delta = cache_delta(before, cache_counters())
        if not delta:
            return
        stats = self.bucket_cache.setdefault(bucket, {})
        for key, value in delta.items():
            stats[key] = stats.get(key, 0) + value
        misses = delta.get("fx_miss", 0) + delta.get("fx_bypass", 0)
        log.info("compiled engine %s batch %d: cache %s", self.name, bucket, delta)
        if self.expect_cache_hits and misses:
            log.warning("compiled engine %s: %d graph(s) at batch %d were compiled from scratch (cache miss): "
                        "the saved artifacts do not match this torch/Inductor setup; %s", self.name, misses,
                        bucket, rebuild_hint())
