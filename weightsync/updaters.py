"""Legacy weight updaters: TorchRL's ``WeightUpdaterBase`` family, on the weightsync engine.

A weight updater pushes the trainer's weights into one or more local copies of the policy
(``push_weights``); a collector calls it from ``update_policy_weights_``. TorchRL now prefers
weight-sync schemes, but updaters remain the simplest way to keep a local policy in step.

- :class:`WeightUpdaterBase`: the push lifecycle (resolve the weights, pick the workers, sync
  each, count the version, run the post-hooks). Subclasses implement
  ``_sync_weights_with_worker`` and, optionally, ``_get_server_weights``,
  ``_maybe_map_weights``, ``all_worker_ids``, ``_skip_update`` and ``_check_workers``.
- :class:`VanillaWeightUpdater`: one local policy (a TensorDict of its weights).
- :class:`MultiProcessedWeightUpdater`: one policy copy per device or worker.

Differences from TorchRL, on purpose: copies run through a cached engine copy plan under
``torch.no_grad()`` (TorchRL's ``update_`` is quadratic in the number of tensors and fails
outside ``no_grad`` on parameters that require grad); a push with no weights and no getter
raises instead of doing nothing; weights that do not fit raise a typed error naming the key
before anything is written, for every worker of the push; a second collector is refused at
registration.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from weightsync._torchrl_compat import register_with_torchrl
from weightsync.errors import InvalidArgumentError, SchemeStateError
from weightsync.schemes.base import UnknownWorkerError, _ref
from weightsync.strategy import UnsupportedWeightsError, WeightStrategy

__all__ = ["WeightUpdaterBase", "VanillaWeightUpdater", "MultiProcessedWeightUpdater"]

WorkerId = int | torch.device


class WeightUpdaterBase(abc.ABC):
    """Pushes weights into local or remote copies of a policy.

    Subclasses implement :meth:`_sync_weights_with_worker`; see the module documentation for
    the optional hooks. Calling the updater is :meth:`push_weights`.

    ``version`` counts completed pushes (and :meth:`increment_version` calls).
    """

    # State is created in __new__, not __init__: TorchRL's updaters (and many written for
    # them) never call super().__init__(), and the base must work for them all the same.
    def __new__(cls, *args: Any, **kwargs: Any) -> WeightUpdaterBase:
        self = super().__new__(cls)
        self._collector_ref: Any = None
        self._post_hooks: list[Callable[[], Any]] = []
        self._version = 0
        self._strategy = WeightStrategy("tensordict")
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_collector_ref"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- collector -----------------------------------------------------------------------------

    def register_collector(self, collector: Any) -> None:
        """Attach the collector (or any container) this updater serves; held weakly.

        An updater serves a single collector: registering the same one again is a no-op, a
        different one is refused while the first is alive.

        Args:
            collector: the collector to attach.

        Raises:
            SchemeStateError: another collector, still alive, is already registered.
        """
        current = self.collector
        if current is collector:
            return
        if current is not None:
            raise SchemeStateError(
                f"{type(self).__name__} is already registered with a {type(current).__name__} "
                f"(at {id(current):#x}); cannot register a {type(collector).__name__} (at "
                f"{id(collector):#x}): an updater serves one collector"
            )
        self._collector_ref = _ref(collector)

    @property
    def collector(self) -> Any | None:
        """The registered collector, or ``None`` when none was registered or it was collected."""
        return self._collector_ref() if self._collector_ref is not None else None

    @property
    def collectors(self) -> list[Any] | None:
        """``[collector]`` when one is registered and alive, else ``None`` (TorchRL's API)."""
        collector = self.collector
        return None if collector is None else [collector]

    # -- hooks and versions --------------------------------------------------------------------

    @property
    def post_hooks(self) -> list[Callable[[], None]]:
        """The hooks run after each push, in order (the live list: appending registers)."""
        return self._post_hooks

    def register_post_hook(self, hook: Callable[[], None]) -> None:
        """Add ``hook`` (called with no argument) to run after every successful push.

        Hooks run in registration order, after the weights are written and ``version`` is
        bumped; a failed push runs none.
        """
        if not callable(hook):
            raise InvalidArgumentError(f"a post-hook must be callable, got {type(hook).__name__}")
        self._post_hooks.append(hook)

    @property
    def version(self) -> int:
        """Completed pushes plus :meth:`increment_version` calls."""
        return self._version

    def increment_version(self) -> None:
        """Bump :attr:`version` by one, and the registered collector's policy version too
        when it keeps one (has ``increment_version``)."""
        self._version += 1
        collector = self.collector
        bump = getattr(collector, "increment_version", None) if collector is not None else None
        if bump is not None:
            bump()

    # -- construction and initialisation -------------------------------------------------------

    @classmethod
    def from_policy(cls, policy: nn.Module) -> WeightUpdaterBase | None:
        """An updater for ``policy``, or ``None`` when this class cannot build one from a policy
        (the default; collectors then fall back to the constructor)."""
        return None

    def init(self, *args: Any, **kwargs: Any) -> None:
        """Late set-up hook a collector calls with its own arguments; does nothing here.

        Subclasses that need resources only available once the collector runs override it.
        """

    def all_worker_ids(self) -> list[int] | list[torch.device] | None:
        """The ids of the workers a push reaches, or ``None`` for an updater with a single,
        unnamed target (the default)."""
        return None

    # -- pushing -------------------------------------------------------------------------------

    def push_weights(
        self,
        policy_or_weights: nn.Module | TensorDictBase | dict | None = None,
        worker_ids: torch.device | int | list[int] | list[torch.device] | None = None,
    ) -> None:
        """Write new weights into the policy copies of all workers, or of ``worker_ids``.

        Args:
            policy_or_weights: where the weights come from: an ``nn.Module`` (e.g. a
                ``TensorDictModuleBase``; its parameters and buffers), a TensorDict, a dict
                (flat dotted keys or nested), or ``None`` to ask ``_get_server_weights()``
                (the weight getter).
            worker_ids: one worker id or a list of them; ``None`` for every worker.

        Raises:
            SchemeStateError: ``None`` was passed and there is no weight getter (or it
                returned ``None``).
            UnknownWorkerError: a worker id this updater does not have.
            KeyMismatchError / ShapeMismatchError / DTypeMismatchError: the weights do not fit;
                no worker was changed.
        """
        self._push_weights(policy_or_weights=policy_or_weights, worker_ids=worker_ids)
        self._version += 1
        for hook in self._post_hooks:
            hook()

    def __call__(
        self,
        policy_or_weights: nn.Module | TensorDictBase | dict | None = None,
        worker_ids: torch.device | int | list[int] | list[torch.device] | None = None,
    ) -> None:
        """Same as :meth:`push_weights` (collectors call the updater)."""
        self.push_weights(policy_or_weights=policy_or_weights, worker_ids=worker_ids)

    def _push_weights(
        self,
        *,
        policy_or_weights: nn.Module | TensorDictBase | dict | None = None,
        worker_ids: torch.device | int | list[int] | list[torch.device] | None = None,
    ) -> None:
        if policy_or_weights is None:
            weights = self._get_server_weights()
            if weights is None:
                raise SchemeStateError(
                    f"{type(self).__name__}.push_weights: no weights were given and there is "
                    "no weight getter to ask (or it returned None); pass policy_or_weights= or "
                    "construct the updater with a weight getter"
                )
        else:
            weights = policy_or_weights
        weights = self._maybe_map_weights(weights)
        targets = self._targets(worker_ids)
        self._check_workers(targets, weights)
        if targets is None:
            self._sync_weights_with_worker(server_weights=weights)
            return
        for worker in targets:
            if not self._skip_update(worker):
                self._sync_weights_with_worker(worker_id=worker, server_weights=weights)

    def _targets(self, worker_ids: Any) -> list[WorkerId] | None:
        known = self.all_worker_ids()
        if worker_ids is None:
            return None if known is None else list(known)
        # A list or tuple names several workers; anything else is one worker id (TorchRL uses
        # ints and devices; subclasses may key their workers otherwise).
        ids = list(worker_ids) if isinstance(worker_ids, (list, tuple)) else [worker_ids]
        if known is not None:
            unknown = [w for w in ids if w not in known]
            if unknown:
                raise UnknownWorkerError(
                    f"{type(self).__name__}: worker {unknown[0]!r} is not one of its workers "
                    f"{list(known)!r}"
                )
        return ids

    def _check_workers(self, worker_ids: list[WorkerId] | None, server_weights: Any) -> None:
        """Validate the push for every target before any is written; default: nothing."""

    def _skip_update(self, worker_id: WorkerId) -> bool:
        """Whether to leave ``worker_id`` out of this push; default: never."""
        return False

    def _get_server_weights(self) -> Any | None:
        """The weights to push when none are given; default: ``None``."""
        return None

    def _maybe_map_weights(self, server_weights: Any) -> Any:
        """The weights to distribute: a module's are extracted; a TensorDict or dict passes."""
        if type(server_weights) is TensorDict:  # the common case, without two ABC checks
            return server_weights
        if isinstance(server_weights, nn.Module):
            # The strategy's cached tree, not a fresh copy: the copy plan of the next push is
            # keyed on it, and nothing outside the push sees it.
            return self._strategy._extract(server_weights)
        if isinstance(server_weights, (TensorDictBase, Mapping)):
            return server_weights
        raise UnsupportedWeightsError(
            f"policy_or_weights must be None, an nn.Module, a TensorDict or a dict, got "
            f"{type(server_weights).__name__}"
        )

    @abc.abstractmethod
    def _sync_weights_with_worker(self, *, worker_id: WorkerId | None = None,
                                  server_weights: Any) -> None:
        """Write ``server_weights`` into worker ``worker_id`` (``None``: the only one)."""


# The id of a VanillaWeightUpdater's one local policy (TorchRL's single-worker index).
_ONLY_WORKER = 0


class VanillaWeightUpdater(WeightUpdaterBase):
    """Keeps one local policy's weights up to date, in place.

    Keyword Args:
        weight_getter (Callable[[], TensorDictBase], optional): returns the weights to push
            when :meth:`push_weights` is called without any.
        policy_weights (TensorDictBase): the policy's weights, updated in place (a
            TensorDict of the policy's live parameters, as built by :meth:`from_policy`; an
            ``nn.Module`` or a dict of its tensors also work).

    Its one policy is worker 0: ``push_weights(..., worker_ids=0)`` (or ``[0]``) is a push
    like ``worker_ids=None``; any other id raises :class:`UnknownWorkerError`.
    """

    def __init__(
        self,
        *,
        weight_getter: Callable[[], TensorDictBase] | None = None,
        policy_weights: TensorDictBase,
    ) -> None:
        if weight_getter is not None and not callable(weight_getter):
            raise InvalidArgumentError(
                f"weight_getter must be callable or None, got {type(weight_getter).__name__}"
            )
        if not isinstance(policy_weights, (TensorDictBase, nn.Module, Mapping)):
            raise UnsupportedWeightsError(
                f"policy_weights must be a TensorDict (or an nn.Module / dict of tensors), got "
                f"{type(policy_weights).__name__}"
            )
        self.weight_getter = weight_getter
        self.policy_weights = policy_weights

    @classmethod
    def from_policy(cls, policy: nn.Module) -> VanillaWeightUpdater:
        """An updater that writes into ``policy``'s own parameters and buffers.

        Its ``policy_weights`` is a locked TensorDict of the policy's live tensors.
        """
        if not isinstance(policy, nn.Module):
            raise UnsupportedWeightsError(
                f"from_policy needs an nn.Module, got {type(policy).__name__}"
            )
        return cls(policy_weights=TensorDict.from_module(policy).lock_())

    def _get_server_weights(self) -> Any | None:
        return self.weight_getter() if self.weight_getter is not None else None

    def _targets(self, worker_ids: Any) -> list[WorkerId] | None:
        """``None`` (the one local policy, pushed once) for ``None`` or ids that all name it.

        TorchRL's collectors pass the user's ``worker_ids`` straight through, and TorchRL's
        ``VanillaWeightUpdater`` accepts them; its only worker is 0 (or whatever
        :meth:`all_worker_ids` names, for subclasses). An empty list names no worker and
        writes nothing, as in the base.
        """
        if worker_ids is None:
            return None
        ids = list(worker_ids) if isinstance(worker_ids, (list, tuple)) else [worker_ids]
        known = self.all_worker_ids()
        accepted = [_ONLY_WORKER, *(known or ())]
        for worker in ids:
            # bool is an int: True would pass as worker 1 elsewhere and False as 0 here.
            if isinstance(worker, bool) or worker not in accepted:
                raise UnknownWorkerError(
                    f"{type(self).__name__} updates one local policy, worker {_ONLY_WORKER}; "
                    f"worker_ids={worker_ids!r} names worker {worker!r}; expected None or "
                    f"worker ids among {accepted!r}"
                )
        return None if ids else []

    def _sync_weights_with_worker(self, *, worker_id: None = None, server_weights: Any) -> None:
        self._strategy.apply_weights(self.policy_weights, server_weights, inplace=True)


class MultiProcessedWeightUpdater(WeightUpdaterBase):
    """Keeps several copies of a policy up to date, one per device or worker.

    Keyword Args:
        get_server_weights (Callable[[], TensorDictBase] | None): returns the weights to push
            when :meth:`push_weights` is called without any.
        policy_weights (dict[torch.device | int, TensorDictBase]): each device's (or
            worker's) policy weights, updated in place. The dict is kept, not copied: entries
            added later become workers too.

    Every target of a push is checked before the first is written, so weights that fit one
    copy but not another change none of them.
    """

    def __init__(
        self,
        *,
        get_server_weights: Callable[[], TensorDictBase] | None,
        policy_weights: dict[torch.device, TensorDictBase],
    ) -> None:
        if get_server_weights is not None and not callable(get_server_weights):
            raise InvalidArgumentError(
                f"get_server_weights must be callable or None, got "
                f"{type(get_server_weights).__name__}"
            )
        if not isinstance(policy_weights, Mapping):
            raise InvalidArgumentError(
                f"policy_weights must map devices or worker ids to weights, got "
                f"{type(policy_weights).__name__}"
            )
        for worker, weights in policy_weights.items():
            if not isinstance(weights, (TensorDictBase, nn.Module, Mapping)):
                raise UnsupportedWeightsError(
                    f"policy_weights[{worker!r}] must be a TensorDict, got {type(weights).__name__}"
                )
        self.weights_getter = get_server_weights
        self._policy_weights = policy_weights

    @property
    def policy_weights(self) -> Mapping[WorkerId, TensorDictBase]:
        """The policy weights of each device or worker."""
        return self._policy_weights

    def all_worker_ids(self) -> list[int] | list[torch.device]:
        """The devices / worker ids of ``policy_weights``."""
        return list(self._policy_weights)

    def _get_server_weights(self) -> Any | None:
        return self.weights_getter() if self.weights_getter is not None else None

    def _check_workers(self, worker_ids: list[WorkerId] | None, server_weights: Any) -> None:
        for worker in worker_ids or ():
            if not self._skip_update(worker):
                self._strategy.validate(self._destination(worker), server_weights)

    def _destination(self, worker_id: WorkerId) -> Any:
        try:
            return self._policy_weights[worker_id]
        except KeyError:
            raise UnknownWorkerError(
                f"MultiProcessedWeightUpdater: worker {worker_id!r} is not one of its workers "
                f"{list(self._policy_weights)!r}"
            ) from None

    def _sync_weights_with_worker(self, *, worker_id: WorkerId | None = None,
                                  server_weights: Any) -> None:
        self._strategy.apply_weights(self._destination(worker_id), server_weights, inplace=True)


# Our updaters must pass TorchRL's ``isinstance(updater, WeightUpdaterBase)`` check: a
# collector otherwise takes a callable updater for a factory and calls it. Registered now if
# TorchRL's module is loaded, else as soon as it is (TorchRL is never imported from here).
register_with_torchrl("torchrl.collectors.weight_update", "WeightUpdaterBase", WeightUpdaterBase)
