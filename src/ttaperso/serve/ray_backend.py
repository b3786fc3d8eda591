"""Scale-out on Ray Serve: replicas that each hold the model once, routed by subject id.

Each replica of the ``PersonalizerReplica`` deployment builds one
:class:`~ttaperso.serve.service.SubjectService` (the frozen model once, its Personalizer,
a client of the shared store). Requests carry the subject id as Ray Serve's
*multiplexed model id* (``handle.options(multiplexed_model_id=subject)``): Serve routes a
subject to a replica that already holds it, and each replica keeps at most
``max_resident`` subjects hot (LRU; an evicted subject is only dropped from memory, its
state is in the store). Correctness never depends on the routing: a replica checks the
store's version of a subject before every use and saves with compare-and-set (see
:mod:`.service`), so a subject served by two replicas in turn, or moved after a replica
died, is always computed from its newest stored state.

The HTTP front (:func:`~ttaperso.serve.app.create_app`) runs in the ``ttaperso serve
--ray`` process and calls the replicas through a :class:`RayBackend`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .. import errors as _errors
from ..errors import TTAPersoError
from .service import NotEnabledError, ServiceSpec, SubjectService, UnknownSubjectError

__all__ = ["RayBackend", "build_deployment", "loopback_ray_env", "start_ray"]

APP_NAME = "ttaperso"


def loopback_ray_env() -> None:
    """Environment for a local Ray cluster that uses only 127.0.0.1 and reports nothing.

    Must run before ``import ray`` (Ray reads these at import): usage statistics off, and
    the node address resolved to the loopback address instead of the machine's outward IP.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def start_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to the Ray cluster at ``address``, or start a local one on loopback.

    Returns True when this call started (and so should stop) the cluster.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "", "local"):
        loopback_ray_env()
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        return True
    ray.init(address=address, log_to_driver=False)
    return False


_KNOWN: dict[str, type[TTAPersoError]] = {
    name: cls
    for name, cls in vars(_errors).items()
    if isinstance(cls, type) and issubclass(cls, TTAPersoError)
}


def _error_classes() -> dict[str, type[TTAPersoError]]:
    from ..stores.redis import StoreUnavailableError
    from .app import BackendUnavailableError
    from .decode import PayloadTooLargeError

    return {
        **_KNOWN,
        "PayloadTooLargeError": PayloadTooLargeError,
        "UnknownSubjectError": UnknownSubjectError,
        "NotEnabledError": NotEnabledError,
        "StoreUnavailableError": StoreUnavailableError,
        "BackendUnavailableError": BackendUnavailableError,
    }


class _Resident:
    """What the multiplexer caches per subject: a handle whose unload evicts it.

    Ray Serve calls an evicted model's ``__del__`` attribute; it is set per instance (not
    on the class) so that garbage collection of an old handle never evicts a subject that
    was loaded again since.
    """

    def __init__(self, service: SubjectService, subject: str) -> None:
        self.subject = subject
        self.__del__ = lambda: service.evict(subject)


def build_deployment(
    spec: ServiceSpec,
    *,
    replicas: int = 2,
    max_resident: int = 4096,
    max_ongoing_requests: int = 16,
    replica_cpus: float = 1.0,
) -> Any:
    """The bound Ray Serve application: ``replicas`` x ``PersonalizerReplica(spec)``."""
    from ray import serve

    if spec.save_every > 0:
        raise _errors.ConfigError(
            "Ray replicas save before answering (write-through); --save-every applies to the "
            "single-process server only"
        )

    @serve.deployment(
        name="PersonalizerReplica",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": replica_cpus},
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    class PersonalizerReplica:
        def __init__(self, spec: ServiceSpec) -> None:
            self.service = SubjectService.from_spec(spec)
            self.pid = os.getpid()

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def resident(self, subject: str) -> _Resident:
            return _Resident(self.service, subject)

        async def call(
            self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            subject = serve.get_multiplexed_model_id()
            if subject:
                await self.resident(subject)
            # The step runs in a thread: the replica's event loop stays free for health
            # checks and the multiplexer while a subject adapts.
            return await asyncio.to_thread(self._run, op, args, kwargs)

        def _run(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
            if op not in _OPS:
                return {"error": "InputError", "detail": f"unknown operation {op!r}"}
            try:
                result = getattr(self.service, op)(*args, **kwargs)
            except TTAPersoError as exc:
                return {"error": type(exc).__name__, "detail": str(exc)}
            if isinstance(result, dict) and op in ("predict", "predict_many"):
                result = {**result, "replica": self.pid}
            return {"ok": result}

        def replica_pid(self) -> int:
            return self.pid

    return PersonalizerReplica.bind(spec)  # type: ignore[attr-defined]


_OPS = frozenset(
    {
        "predict",
        "predict_many",
        "calibrate",
        "reset",
        "versions",
        "rollback",
        "export",
        "delete",
        "audit_trail",
        "subjects",
        "health",
    }
)


class RayBackend:
    """The HTTP front's side of the replicas: the calls of :class:`SubjectService`.

    Args:
        handle: the deployment handle (from :meth:`start`).
        timeout: seconds a call may take before it is reported unavailable.
        owns_cluster: stop Serve and Ray on :meth:`close`.
    """

    def __init__(self, handle: Any, *, timeout: float = 120.0, owns_cluster: bool = False) -> None:
        self._handle = handle
        self.timeout = timeout
        self._owns = owns_cluster
        self._errors = _error_classes()

    @classmethod
    def start(
        cls,
        spec: ServiceSpec,
        *,
        address: str | None = None,
        replicas: int = 2,
        max_resident: int = 4096,
        replica_cpus: float = 1.0,
        num_cpus: int | None = None,
    ) -> RayBackend:
        """Start (or join) a Ray cluster, deploy the replicas, return the backend."""
        owns = start_ray(address, num_cpus=num_cpus)
        from ray import serve

        serve.start(proxy_location="Disabled")
        app = build_deployment(
            spec, replicas=replicas, max_resident=max_resident, replica_cpus=replica_cpus
        )
        handle = serve.run(app, name=APP_NAME, route_prefix=None)
        return cls(handle, owns_cluster=owns)

    # ---------------------------------------------------------- plumbing
    def _submit(self, subject: str | None, op: str, *args: Any, **kwargs: Any) -> Any:
        handle = self._handle.options(multiplexed_model_id=subject) if subject else self._handle
        return handle.call.remote(op, args, kwargs)

    def _result(self, response: Any, subject: str | None) -> Any:
        from ray.exceptions import RayError

        from .app import BackendUnavailableError

        try:
            out = response.result(timeout_s=self.timeout)
        except (RayError, TimeoutError) as exc:
            raise BackendUnavailableError(
                f"The replica serving {'subject ' + repr(subject) if subject else 'this request'} "
                f"failed ({type(exc).__name__}); the request was not acknowledged, retry it"
            ) from exc
        if "error" in out:
            cls = self._errors.get(out["error"], TTAPersoError)
            raise cls(out["detail"])
        return out["ok"]

    def _call(self, subject: str | None, op: str, *args: Any, **kwargs: Any) -> Any:
        return self._result(self._submit(subject, op, *args, **kwargs), subject)

    # ------------------------------------------------------------ calls
    def predict(self, subject: str, frames: Tensor) -> dict[str, Any]:
        return self._call(subject, "predict", subject, frames)

    def predict_many(self, frames: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
        """One call per subject, each to the replica that holds it, all in flight at once.

        The front validated every subject's input before this; a failure on a replica
        fails the request, naming the subjects that were applied (and stored) anyway.
        """
        pending = {s: self._submit(s, "predict", s, x) for s, x in frames.items()}
        out: dict[str, dict[str, Any]] = {}
        failed: list[tuple[str, TTAPersoError]] = []
        for subject, response in pending.items():
            try:
                out[subject] = self._result(response, subject)
            except TTAPersoError as exc:
                failed.append((subject, exc))
        if failed:
            subject, first = failed[0]
            applied = {s: a["version"] for s, a in out.items()}
            raise type(first)(
                f"subject {subject!r}: {first} (subjects applied and stored anyway: {applied})"
            )
        return out

    def calibrate(
        self, subject: str, frames: Tensor, *, neutral_label: str | None, margin: float | None
    ) -> dict[str, Any]:
        return self._call(
            subject, "calibrate", subject, frames, neutral_label=neutral_label, margin=margin
        )

    def reset(self, subject: str) -> dict[str, Any]:
        return self._call(subject, "reset", subject)

    def versions(self, subject: str) -> dict[str, Any]:
        return self._call(subject, "versions", subject)

    def rollback(self, subject: str, version: int) -> dict[str, Any]:
        return self._call(subject, "rollback", subject, version)

    def export(self, subject: str) -> tuple[bytes, int, str]:
        data, version, digest = self._call(subject, "export", subject)
        return data, version, digest

    def delete(self, subject: str) -> dict[str, Any]:
        return self._call(subject, "delete", subject)

    def audit_trail(self, subject: str) -> dict[str, Any]:
        return self._call(subject, "audit_trail", subject)

    def subjects(self) -> list[str]:
        return self._call(None, "subjects")

    def health(self) -> dict[str, Any]:
        return self._call(None, "health")

    def close(self) -> None:
        """Remove the deployment (and stop the cluster this backend started)."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            serve.delete(APP_NAME)
        finally:
            if self._owns:
                serve.shutdown()
                ray.shutdown()
