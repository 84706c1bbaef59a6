"""``InstanceFactory``: launches instances, tracks them, and deletes them at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from pytest_incus import claims, network, registry
from pytest_incus.errors import ConfigError, IncusError, InstanceStartError, UnavailableError
from pytest_incus.images.store import ImageStore
from pytest_incus.instance import Instance
from pytest_incus.ownership import Owner
from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.runtimes.protocol import Runtime
from pytest_incus.runtimes.table import RuntimeTable
from pytest_incus.settings import Settings
from pytest_incus.spec import InstanceSpec
from pytest_incus.summary import Tally
from pytest_incus.values import Keep

log = logging.getLogger("pytest_incus")


class InstanceFactory:
    """Launches instances of any kind; each lives until ``delete()`` or ``close()``.

    ``instance_factory.launch(kind=..., image=..., **options)`` takes the options of the
    ``instance`` marker. While a test runs (``running_test()``), the factory notes the instances
    it uses, so that ``--incus-keep`` can keep them: a kept instance stays running and
    registered after ``delete()`` and ``close()``, and only ``pytest-incus rm`` or
    ``reap --kept`` removes it.

    Instances run on the backend ``settings.backend`` names, made by the runtime that
    ``runtimes`` (by default every backend's, on ``images``) has for it and their kind.
    ``tally`` (by default the image store's) counts the launches, with their times, for the
    run's summary.
    """

    def __init__(
        self,
        settings: Settings,
        images: ImageStore,
        runtimes: RuntimeTable | None = None,
        *,
        on_ready: Callable[[Instance], None] | None = None,
        tally: Tally | None = None,
    ) -> None:
        self.settings = settings
        self.tally = tally if tally is not None else images.tally
        self.images = images
        self.runtimes = runtimes or RuntimeTable.default(
            RuntimeContext(settings, images, images.progress)
        )
        self._on_ready = on_ready
        self._owner = Owner.current()
        self._live: dict[str, Instance] = {}  # launched and not deleted; kept ones too
        self._used: dict[str, Instance] | None = None  # by the running test, or None
        self._runtimes_used: list[Runtime] = []  # whose networks close() sweeps

    def launch(self, kind: str | None = None, image: str | None = None, **options: Any) -> Instance:
        """Launch an instance and return it once ready (see the ``instance`` marker's options)."""
        spec = InstanceSpec.parse(
            kind or self.settings.default_kind,
            image or self.settings.default_image,
            options,
            where="launch()",
        )
        self.check(spec, where="launch()")
        return self.launch_spec(spec)

    def check(self, spec: InstanceSpec, *, where: str) -> None:
        """Everything knowable before launch (image name, the options of its kind, as this
        run's backend sees them); ConfigError naming ``where``."""
        try:
            self.runtime(spec.kind).check(spec)
            self.images.check(spec.image, spec.kind)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except UnavailableError:
            pass  # a kind this host or version cannot run errors (or skips) when the test runs

    def runtime(self, kind: str) -> Runtime:
        """The runtime that makes instances of ``kind`` on this run's backend."""
        return self.runtimes.get(self.settings.backend, kind)

    def launch_spec(self, spec: InstanceSpec) -> Instance:
        """Launch the instance ``spec`` describes (already checked)."""
        spec = spec.with_defaults(
            max_processes=self.settings.max_processes, network=self.settings.default_network
        )
        runtime = self.runtime(spec.kind)
        if runtime not in self._runtimes_used:
            self._runtimes_used.append(runtime)
        reason = runtime.unavailable()
        if reason:
            raise UnavailableError(f"cannot launch kind={spec.kind!r} here: {reason}")
        # what the runtime makes: the user's spec, on the derived image its packages need
        made = spec
        if spec.packages:
            derived = self.images.derive(spec.image, packages=spec.packages, kind=spec.kind)
            made = dataclasses.replace(spec, image=derived.ref, packages=())
        # the launch's time, from here to ready, leaves out the images it waited to be made
        started, building = time.monotonic(), self.tally.build_seconds
        name = spec.name or f"pti-{secrets.token_hex(4)}"
        directory = self.settings.instances_dir / name
        self.settings.instances_dir.mkdir(parents=True, exist_ok=True)
        claims.take(name, directory, self._owner)  # no instance of that name on this host
        try:
            directory.mkdir()
        except FileExistsError:
            claims.release(name, directory)
            raise ConfigError(
                f"an instance named {name!r} already exists ({directory}); choose "
                "another name, or remove it with: " + self.settings.command(f"rm {name}")
            ) from None
        except BaseException:
            claims.release(name, directory)
            raise
        machine = None
        try:
            registry.write_record(
                directory,
                kind=spec.kind,
                image=made.image,
                owner=self._owner,
                backend=runtime.backend,
            )
            attachment = None
            if spec.network and spec.network != "none":
                attachment = runtime.networks.attach(spec.network, name, directory, self._owner)
            machine = runtime.create(made, name, directory, attachment)
            instance = Instance(
                machine,
                spec,
                exec_timeout=self.settings.exec_timeout,
                on_delete=self._delete,
                on_use=self.use,
            )
            # live before it starts: whatever cuts the start short (a signal included),
            # close() still deletes what it made
            self._live[name] = instance
            machine.start()
        except BaseException as exc:
            if machine is not None:
                # the machine ends what it started itself (a container's exec server, our
                # child: left to the reap by name, it would stay our zombie in the container
                # and keep its stop waiting); the reap then removes the rest
                with contextlib.suppress(Exception):
                    machine.destroy()
            registry.remove_instance(
                self.settings, name, spec.kind, backend=runtime.backend, runtimes=self.runtimes
            )
            self._live.pop(name, None)
            if isinstance(exc, OSError):  # of the host's files: the instance's own are inside
                raise InstanceStartError(
                    f"{spec.kind} {name} (image {spec.image}): preparing it on the host failed: "
                    f"{exc}; check the free space and the permissions of {directory.parent}",
                    exc=exc,
                ) from exc
            raise
        launch_seconds = time.monotonic() - started - (self.tally.build_seconds - building)
        self.tally.launched(spec.kind, max(launch_seconds, 0.0))
        self.use(instance)
        if self._on_ready is not None:
            try:
                self._on_ready(instance)
            except BaseException:
                instance.delete()
                raise
        return instance

    @contextlib.contextmanager
    def running_test(self) -> Iterator[None]:
        """Around one test, setup to teardown: note the instances it uses (see ``use``)."""
        self._used = {}
        try:
            yield
        finally:
            self._used = None

    def use(self, instance: Instance) -> None:
        """Note that the running test uses ``instance``: it (or one of its fixtures) launched
        it, holds it as a fixture value, or called one of its methods. Under
        ``--incus-keep=always`` that keeps it at once, so that its fixture's ``delete()`` leaves
        it."""
        if self._used is None or self._live.get(instance.name) is not instance:
            return  # between tests, or deleted, or not ours
        self._used.setdefault(instance.name, instance)
        if self.settings.keep is Keep.ALWAYS:
            self.keep(instance)

    def used(self) -> list[Instance]:
        """The instances the running test used that still exist, in the order it first used
        them; none between tests."""
        if self._used is None:
            return []
        return [inst for inst in self._used.values() if self._live.get(inst.name) is inst]

    def keep_used(self) -> list[Instance]:
        """Call when the running test failed: under ``--incus-keep=failed`` or ``always``,
        keep every instance it used that still exists. Returns the kept ones, in the order
        the test first used them."""
        if self.settings.keep is Keep.NEVER:
            return []
        used = self.used()
        for inst in used:
            self.keep(inst)
        return used

    def keep(self, instance: Instance) -> None:
        """Leave ``instance`` running after the run (``--incus-keep``); never reaped.

        Its ``delete()`` and ``close()`` leave it too; ``pytest-incus rm NAME`` removes it.
        """
        if instance.kept or self._live.get(instance.name) is not instance:
            return
        instance.kept = True
        registry.mark_kept(instance.directory)
        instance.machine.keep()

    def _delete(self, instance: Instance) -> None:
        if instance.kept:
            return  # the user asked for it to stay, for a look inside after the run
        try:
            instance.machine.destroy()
            self.runtime(instance.kind).networks.detach(instance.name, instance.directory)
        except Exception:
            self._forget(instance)  # nothing more to try here; reap can
            raise
        # an interrupt (Ctrl-C, SIGTERM) in destroy() leaves it live, for close() to finish
        self._forget(instance)

    def _forget(self, instance: Instance) -> None:
        try:
            registry.forget(instance.directory)
        finally:
            self._live.pop(instance.name, None)

    def close(self) -> None:
        """Delete every instance launched here that is still alive (kept ones stay)."""
        errors = []
        for instance in list(self._live.values()):
            if instance.kept:
                continue
            try:
                instance.delete()
                if self._live.get(instance.name) is instance:  # a delete cut short
                    self._delete(instance)
            except (IncusError, OSError) as exc:
                errors.append(f"{instance.name}: {exc}")
        try:
            network.sweep(self.settings)  # the bridges nobody uses now, of any run
            for networks in {id(r.networks): r.networks for r in self._runtimes_used}.values():
                if not isinstance(networks, network.HostNetworks):  # swept just above
                    networks.sweep()
        except (IncusError, OSError) as exc:
            errors.append(f"networks: {exc}")
        if errors:
            raise IncusError(
                "could not delete every instance: " + "; ".join(errors) + "; run pytest-incus reap"
            )
