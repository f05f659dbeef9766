"""Where the streamed fits' block tasks run: Ray tasks (:class:`RayExecutor`), beside the
in-process :class:`latentray.method.streaming.SerialExecutor` that the method ships."""

from __future__ import annotations

from ..method.streaming import one_blas_thread


class RayExecutor:
    """Block tasks as Ray tasks (1 CPU and one BLAS thread each); results tree-reduced in tasks.

    ``window``: in :meth:`map_reduce`, the most block results waiting for their merge
    (default: twice the cluster's CPUs, at least 32)."""

    def __init__(self, num_cpus: float = 1, window: int | None = None):
        import ray

        self._ray, self._num_cpus, self._window = ray, num_cpus, window

    def _remote(self, fn):
        return self._ray.remote(num_cpus=self._num_cpus)(one_blas_thread(fn))

    def put(self, obj):
        return self._ray.put(obj)

    def map(self, fn, arg_lists):
        remote = self._remote(fn)
        return [remote.remote(*args) for args in arg_lists]

    def get(self, handles):
        return self._ray.get(list(handles))

    def map_reduce(self, fn, arg_lists, merge, fan_in: int = 8):
        """:meth:`~latentray.method.streaming.SerialExecutor.reduce` of ``merge`` over ``fn``'s
        results: the same tree of merges (groups of ``fan_in`` consecutive results at every
        level), so the same result to the last bit,
        with the block tasks submitted as their merges end: at most ``window`` block results
        wait for a merge, whatever the number of blocks. (Submitted all at once, the block
        tasks of every pass run before the merges queued behind them, and the object store
        holds results in proportion to the blocks: the data's size.)"""
        ray, leaf, node = self._ray, self._remote(fn), self._remote(merge)
        window = self._window or max(4 * fan_in, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: list[list] = [[]]  # per level: the handles not yet in a merge
        pushed: list[int] = [0]  # per level: how many handles it got
        first_merges: list = []  # merges of block results, oldest first, not yet waited for
        waiting = 0  # block results submitted and not known merged

        def push(level: int, handle) -> None:
            if level == len(pending):
                pending.append([])
                pushed.append(0)
            pending[level].append(handle)
            pushed[level] += 1
            if len(pending[level]) == fan_in:
                group, pending[level] = pending[level], []
                merged = node.remote(*group)
                if level == 0:
                    first_merges.append(merged)
                push(level + 1, merged)

        for args in arg_lists:
            while waiting >= window and first_merges:
                ray.wait([first_merges.pop(0)], fetch_local=False)
                waiting -= fan_in
            push(0, leaf.remote(*args))
            waiting += 1
        level = 0
        while pushed[level] > 1:  # the last, partial group of each level
            if pending[level]:
                group, pending[level] = pending[level], []
                push(level + 1, node.remote(*group))
            level += 1
        return ray.get(pending[level][0])

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
