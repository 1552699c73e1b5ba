"""Hand-built task graphs and moving blocks: the one module that touches Dask's
private API.

The passes build their graphs by hand (:mod:`dkm.engine.passes`) and name tasks and
their arguments through :func:`task`, :func:`data` and :class:`Ref`. With Dask's graph
nodes (``dask._task_spec``) a task keeps its keyword arguments as they are, and a graph
goes to a distributed client as an expression whose token is already known
(``dask._expr.LLGExpr``), which spares tokenising the whole graph again in every pass.
Without them (a Dask that has moved or dropped them, or :data:`TASK_SPEC` set to False),
the graph is the public format Dask documents: tuples ``(callable, *keys)`` whose keys
the scheduler replaces by their values; the literal arguments travel inside the callable
(a ``functools.partial``), so that none is mistaken for a key or a task. Either way a
task calls the same function on the same values: the results are the same bits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

_Task: Any
_TaskRef: Any
_DataNode: Any
_GraphNode: Any
_LLGExpr: Any
try:
    from dask._task_spec import DataNode as _DataNode
    from dask._task_spec import GraphNode as _GraphNode
    from dask._task_spec import Task as _Task
    from dask._task_spec import TaskRef as _TaskRef
except ImportError:  # pragma: no cover - a Dask without graph nodes: the public format
    _Task = _TaskRef = _DataNode = _GraphNode = None
try:
    from dask._expr import LLGExpr as _LLGExpr
except ImportError:  # pragma: no cover - the client tokenises the dict itself
    _LLGExpr = None

#: Whether graphs are built of Dask's graph nodes (else the public tuple format). Read
#: when a graph is built, so that a test can compare both on the same Dask.
TASK_SPEC: bool = _Task is not None


@dataclass(frozen=True)
class Ref:
    """A task argument that is the value of another key of the graph."""

    key: Hashable


def base(graph: Mapping[Any, Any], futures: Callable[[], Mapping[Any, Any]]) -> dict[Any, Any]:
    """A graph to add tasks to: ``graph`` and, in the public format, ``futures()`` (the
    futures of inputs persisted on a cluster, by key): graph nodes refer to such keys
    without them, the public format only to keys in the graph."""
    out = dict(graph)
    if not TASK_SPEC:
        out.update(futures())
    return out


def task(key: Hashable, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The graph node of ``func(*args, **kwargs)`` under ``key``; arguments that are
    :class:`Ref` (at the top level, positional or keyword) take their key's value."""
    if TASK_SPEC:
        return _Task(
            key,
            func,
            *(_TaskRef(a.key) if isinstance(a, Ref) else a for a in args),
            **{n: _TaskRef(v.key) if isinstance(v, Ref) else v for n, v in kwargs.items()},
        )
    refs = [a.key for a in (*args, *kwargs.values()) if isinstance(a, Ref)]
    return (partial(_call, func, args, kwargs), *refs)


def data(key: Hashable, value: Any) -> Any:
    """The graph node holding ``value`` under ``key`` (a literal, never run)."""
    if TASK_SPEC:
        return _DataNode(key, value)
    return (partial(_value, value),)


def dependencies(node: Any) -> frozenset[Any] | None:
    """The keys a node of a collection's graph depends on; None when it is not a graph
    node (a Dask without them: such a node is left to the scheduler, never run by
    :func:`run_node`)."""
    if _GraphNode is None or not isinstance(node, _GraphNode):
        return None
    deps: frozenset[Any] = node.dependencies
    return deps


def run_node(node: Any, values: Mapping[Any, Any]) -> Any:
    """The value of a graph node (:func:`dependencies` not None) given its
    dependencies' ``values`` by key."""
    return node(values)


def submit(client: Any, graph: dict[Any, Any], keys: list[Any], token: str) -> Any:
    """``client.get(graph, keys, sync=False)``: the futures of ``keys``. ``token`` must
    name the graph (it stands for the graph's own token)."""
    expr: Any = graph
    if TASK_SPEC and _LLGExpr is not None:
        expr = _LLGExpr(graph, _determ_token=token)
    return client.get(expr, keys, sync=False)


def move_blocks(client: Any, moves: list[tuple[Hashable, str, str]]) -> bool:
    """Move each ``(key, sender, recipient)``'s data from the worker ``sender`` to the
    worker ``recipient``: copied, then dropped by the sender, as the scheduler's own
    ``rebalance`` does (``Scheduler._rebalance_move_data``, run on the scheduler). A
    move whose key or workers are gone, or whose recipient holds the key already, is
    left out; one that fails leaves the key where it was. Whether every move was made:
    False (with a warning in the log) when the scheduler could not be asked, e.g. a
    distributed without that method, which costs transfers, never a result.
    """

    async def move(dask_scheduler: Any, moves: list[tuple[Any, str, str]]) -> bool:
        # defined here, so that it travels by value: the scheduler needs no dkm
        import time as _time

        msgs = []
        for key, sender, recipient in moves:
            ts = dask_scheduler.tasks.get(key)
            snd = dask_scheduler.workers.get(sender)
            rec = dask_scheduler.workers.get(recipient)
            if ts is None or snd is None or rec is None or ts.who_has is None:
                continue
            if snd in ts.who_has and rec not in ts.who_has:
                msgs.append((snd, rec, ts))
        if not msgs:
            return True
        result = await dask_scheduler._rebalance_move_data(
            msgs, stimulus_id=f"dkm-move-blocks-{_time.time()}"
        )
        return bool(result.get("status") == "OK")

    try:
        done: bool = client.run_on_scheduler(move, moves=moves)
    except Exception as e:  # an optimisation: never fail the pass over it
        _log.warning("could not move %d blocks to the workers that run them: %r", len(moves), e)
        return False
    if not done:
        _log.warning("some of %d blocks were not moved to the workers that run them", len(moves))
    return done


_log = logging.getLogger("dkm.engine")


def _call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *values: Any
) -> Any:
    """``func`` with the :class:`Ref` arguments replaced, in order, by ``values``."""
    it = iter(values)
    positional = [next(it) if isinstance(a, Ref) else a for a in args]  # first: refs' order
    keywords = {n: next(it) if isinstance(v, Ref) else v for n, v in kwargs.items()}
    return func(*positional, **keywords)


def _value(value: Any) -> Any:
    return value
