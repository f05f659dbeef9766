"""Where the streamed fits' block tasks run: Ray tasks (:class:`RayExecutor`), beside the
in-process :class:`latentray.method.streaming.SerialExecutor` that the method ships."""

from __future__ import annotations

from typing import Callable


def _one_blas_thread(fn: Callable) -> Callable:
    def run(*args):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args)

    run.__name__ = fn.__name__
    return run


class RayExecutor:
    """Block tasks as Ray tasks (1 CPU and one BLAS thread each); results tree-reduced in tasks."""

    def __init__(self, num_cpus: float = 1):
        import ray

        self._ray, self._num_cpus = ray, num_cpus

    def _remote(self, fn):
        return self._ray.remote(num_cpus=self._num_cpus)(_one_blas_thread(fn))

    def put(self, obj):
        return self._ray.put(obj)

    def map(self, fn, arg_lists):
        remote = self._remote(fn)
        return [remote.remote(*args) for args in arg_lists]

    def get(self, handles):
        return self._ray.get(list(handles))

    def reduce(self, fn, handles, fan_in: int = 8):
        remote = self._remote(fn)
        while len(handles) > 1:
            handles = [remote.remote(*handles[i: i + fan_in])
                       for i in range(0, len(handles), fan_in)]
        return self._ray.get(handles[0])

    def map_parts(self, fn, arg_lists, n_parts):
        """Tasks that yield ``n_parts`` results each (``fn`` a generator), every part its
        own object, stored as it is yielded (a shuffle: the object store holds the parts,
        spilling to disk when full): ``handles[task][part]``."""
        if n_parts == 0:
            return [[] for _ in arg_lists]

        def parts(*args):
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1, user_api="blas"):
                yield from fn(*args)

        def one(*args):
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1, user_api="blas"):
                (part,) = fn(*args)
            return part

        task = parts if n_parts > 1 else one
        task.__name__ = fn.__name__
        remote = self._ray.remote(num_cpus=self._num_cpus, num_returns=n_parts)(task)
        return [list(refs) if n_parts > 1 else [refs]
                for refs in (remote.remote(*args) for args in arg_lists)]
