"""The extraction actor: (dataset shard, model) units run by Ray actors that hold the models.

The actor is the only place that imports a model package. For each unit it

1. converts every structure of the shard into the model's input (``adapter.prepare``:
   graph building, on CPU); a structure the model cannot process becomes a failure row
   with the reason. With graph builders (``extraction.graph_builders``: CPU actors beside a
   GPU actor) the graphs are built by them, a few batches ahead, while the GPU runs;
2. runs batched forward passes, each filled up to ``batch_atoms`` atoms (not a fixed
   number of structures); a batch that fails is retried structure by structure, so
   one bad structure costs only itself;
3. writes one latents Parquet file per layer and one failures file, each atomically.

The driver then records the unit in the manifest (:mod:`latentray.extraction.manifest`);
this module and the adapter's are the code a unit's latents depend on.
"""

from __future__ import annotations

import dataclasses
import gc
import posixpath
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..codehash import code_digests
from ..records import ModelDescription
from ..shards import StructureShard, read_shard
from ..store import FAILURE_SCHEMA, Store, latent_table

if TYPE_CHECKING:
    from ..config import ModelConfig


def unit_code(family: str) -> dict[str, str]:
    """The code a unit's latents depend on: this module, the family's adapter module, and
    the latentray modules they import (:func:`latentray.codehash.code_digests`)."""
    from ..models import adapter_module

    return code_digests(__name__, adapter_module(family))


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` where torch sees a GPU, else ``cpu``; any other value as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ExtractionWorker:
    """Holds loaded models (a small LRU cache) and runs units. Used as a Ray actor."""

    def __init__(self, torch_threads: int = 1, max_cached_models: int = 2):
        import torch

        torch.set_num_threads(max(1, torch_threads))
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._max_cached = max_cached_models

    def _adapter(self, model: ModelConfig):
        key = repr(model)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        from ..models import load_adapter

        adapter = load_adapter(model.family, model.checkpoint,
                               device=resolve_device(model.device), dtype=model.dtype,
                               modality=model.modality, options=model.options)
        self._models[key] = adapter
        while len(self._models) > self._max_cached:
            self._models.popitem(last=False)
        return adapter

    def describe(self, model: ModelConfig) -> ModelDescription:
        """What the driver needs to know about a model: widths, hashes, the family
        distribution's version and the code that computes its latents."""
        from ..models import distribution_version

        adapter = self._adapter(model)
        info = adapter.info
        cls = type(adapter)
        return ModelDescription(
            model=model.id, family=model.family, checkpoint=model.checkpoint,
            checkpoint_file=info.checkpoint_file, checkpoint_sha256=info.checkpoint_sha256,
            cutoff=float(info.cutoff), layer_widths=dict(info.layer_widths),
            supported_numbers=(tuple(sorted(info.supported_numbers))
                               if info.supported_numbers is not None else None),
            distribution=cls.distribution, version=distribution_version(cls.distribution),
            code=unit_code(model.family))

    def prepare_structures(self, model: ModelConfig, shard: StructureShard,
                           indices: list[int]) -> tuple[list, dict, float]:
        """Build the model's inputs for ``indices`` of ``shard`` on this CPU: the work of a
        graph builder (an actor that runs beside an extraction actor, ahead of it).

        Returns ``[(i, prepared)]``, ``{i: (stage, reason)}`` for the structures the model
        cannot take, and the seconds spent."""
        t = time.perf_counter()
        adapter = self._adapter(dataclasses.replace(model, device="cpu"))
        prepared, reasons = [], {}
        for i in indices:
            try:
                prepared.append((i, adapter.prepare(shard.atoms(i))))
            except Exception as exc:
                reasons[i] = ("prepare", _reason(exc))
        return prepared, reasons, time.perf_counter() - t

    def _prepared(self, adapter, model: ModelConfig, shard: StructureShard, shard_ref,
                  builders: list, batch_atoms: int, reasons: dict, timings: dict):
        """``(i, prepared)`` for every structure of the shard the model can take, in order;
        the others go to ``reasons``. Without builders the structures are prepared here;
        with builders, chunks of about ``batch_atoms`` atoms are prepared by them, a few
        chunks ahead of the forward passes that consume them."""
        if not builders:
            for i in range(len(shard)):
                t = time.perf_counter()
                try:
                    yield i, adapter.prepare(shard.atoms(i))
                except Exception as exc:  # a failure is only this structure's
                    reasons[i] = ("prepare", _reason(exc))
                finally:
                    timings["prepare"] += time.perf_counter() - t
            return
        import ray

        chunks = list(by_atoms(range(len(shard)), shard.n_atoms.__getitem__, batch_atoms))
        ahead = 2 * len(builders)
        futures = [builders[k % len(builders)].prepare_structures.remote(model, shard_ref, c)
                   for k, c in enumerate(chunks[:ahead])]
        for k in range(len(chunks)):
            t = time.perf_counter()
            prepared, failed, seconds = ray.get(futures[k])
            timings["wait_for_graphs"] += time.perf_counter() - t
            timings["prepare"] += seconds
            futures[k] = None
            if k + ahead < len(chunks):
                futures.append(builders[(k + ahead) % len(builders)].prepare_structures.remote(
                    model, shard_ref, chunks[k + ahead]))
            reasons.update(failed)
            yield from prepared

    def run_unit(self, model: ModelConfig, layers: list[str], dataset: str, number: int,
                 sha256: str, output: str, batch_atoms: int,
                 builders: list | None = None) -> dict:
        """Run one (shard, model) unit: shard ``number`` of ``dataset``, read from the run's
        ``structures/`` (it must still hold the content ``sha256``); its graph builders get
        it through the object store, for the time of this unit."""
        import ray

        t_unit = time.perf_counter()
        t0 = time.perf_counter()
        adapter = self._adapter(model)
        t_load = time.perf_counter() - t0
        store = Store(output)
        shard = read_shard(store, dataset, number, sha256)
        shard_ref = ray.put(shard) if builders else None
        n = len(shard)
        reasons: dict[int, tuple[str, str]] = {}
        outputs: dict[int, dict[str, np.ndarray]] = {}
        timings = {"load": t_load, "prepare": 0.0, "wait_for_graphs": 0.0, "forward": 0.0,
                   "write": 0.0}

        def run_batch(batch: list[tuple[int, Any]]) -> None:
            t = time.perf_counter()
            try:
                result = adapter.forward([p for _, p in batch], layers)
            except Exception as exc:
                timings["forward"] += time.perf_counter() - t
                if len(batch) == 1:
                    reasons[batch[0][0]] = ("forward", _reason(exc))
                    return
                for item in batch:  # isolate the structure(s) that fail
                    run_batch([item])
                return
            timings["forward"] += time.perf_counter() - t
            start = 0
            for i, _ in batch:
                stop = start + int(shard.n_atoms[i])
                outputs[i] = {layer: result[layer][start:stop] for layer in layers}
                start = stop
            counts = {layer: len(result[layer]) for layer in layers}
            if any(c != start for c in counts.values()):
                raise RuntimeError(f"{model.id}: forward returned {counts} rows for {start} atoms")

        prepared = self._prepared(adapter, model, shard, shard_ref, builders or [],
                                  batch_atoms, reasons, timings)
        for batch in by_atoms(prepared, lambda item: shard.n_atoms[item[0]], batch_atoms):
            run_batch(batch)

        t = time.perf_counter()
        done = np.array(sorted(outputs), dtype=np.int64)
        offsets = shard.offsets
        atom_rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in done]) \
            if len(done) else np.zeros(0, np.int64)
        widths = adapter.info.layer_widths
        files = {}
        for layer in layers:
            features = (np.concatenate([outputs[i][layer] for i in done]) if len(done)
                        else np.zeros((0, widths[layer]), np.float32))
            table = latent_table(shard.structure_id[done], shard.structure_index[done],
                                 shard.n_atoms[done], shard.numbers[atom_rows], features,
                                 {"dataset": shard.dataset, "model": model.id, "layer": layer,
                                  "family": model.family, "checkpoint": model.checkpoint})
            files[layer] = store.write_table(
                posixpath.join(store.latents_dir(shard.dataset, model.id, layer),
                               store.part(shard.shard)), table)
        failed = np.array(sorted(reasons), dtype=np.int64)
        failures = pa.table({
            "structure_id": pa.array(shard.structure_id[failed].tolist(), pa.string()),
            "structure_index": pa.array(shard.structure_index[failed], pa.int64()),
            "n_atoms": pa.array(shard.n_atoms[failed], pa.int64()),
            "stage": pa.array([reasons[i][0] for i in failed], pa.string()),
            "reason": pa.array([reasons[i][1] for i in failed], pa.string()),
        }, schema=FAILURE_SCHEMA)
        files["failures"] = store.write_table(
            posixpath.join(store.failures_dir(shard.dataset, model.id), store.part(shard.shard)),
            failures)
        timings["write"] = time.perf_counter() - t
        # A forward pass stopped by a hook leaves reference cycles (exception, traceback,
        # frames holding tensors and Arrow tables); Python's collector counts objects, not
        # bytes, and freed them late: an actor's memory grew by ~45 MB per CHGNet unit of
        # 2,000 structures (2 GB after 25 units). Collected once per unit, it stays flat.
        del outputs, prepared
        gc.collect()
        timings["wall"] = time.perf_counter() - t_unit
        if len(done) + len(failed) != n:
            raise RuntimeError(f"{model.id}: {n} structures in, {len(done)} out + "
                               f"{len(failed)} failed")
        return {
            "structures": n,
            "processed": len(done),
            "failed": len(failed),
            "atoms": int(shard.n_atoms[done].sum()),
            "files": files,
            "seconds": timings,
            "failure_examples": [f"{shard.structure_id[i]}: {reasons[i][1]}" for i in failed[:3]],
            "worker": _where(),
        }


def by_atoms(items: Iterable, n_atoms: Callable[[Any], int], budget: int) -> Iterator[list]:
    """``items`` in order, in lists filled until they hold ``budget`` atoms or more (the last
    list with what is left): the batches of the forward passes and the builders' chunks."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += int(n_atoms(item))
        if size >= budget:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _reason(exc: Exception) -> str:
    """A structure's failure reason: the message of a StructureError, else the type too."""
    from ..models import StructureError

    return str(exc) if isinstance(exc, StructureError) else f"{type(exc).__name__}: {exc}"


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB: ``VmHWM`` of ``/proc/self/status`` on
    Linux (the high-water mark of this program image only; ``ru_maxrss`` would include the
    parent's memory when it was forked), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024 / 1e9


def _where() -> dict:
    """The Ray node and process a unit ran in, and the process's peak memory so far (GB)."""
    import os
    import socket

    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"node": node, "host": socket.gethostname(), "pid": os.getpid(),
            "peak_rss_gb": round(peak_rss_gb(), 3)}


