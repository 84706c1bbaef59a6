"""What the report of a failed test says about each instance the test used.

One section per instance: the last commands run through ``exec`` with their exit codes and
durations; for a systemd instance its failed units, their journal and the journal's tail; for a
VM the kernel's log (``dmesg``); and the tail of ``logs()`` (the console, or an app's output).
Then the sections that ``pytest_incus_failure_sections`` implementations add.

Nothing here may turn a failure report into an error of its own: what cannot be read (a
stopped instance, an app without a shell, a hook that raises) is said in the section instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from pytest_incus.errors import IncusError, tail
from pytest_incus.instance import Instance
from pytest_incus.values import ExecRequest, InstanceState, Kind

log = logging.getLogger("pytest_incus")

# What one look inside may take: a failure report waits on it, so a hung guest must not hang
# the report (the whole look is one command, so one deadline).
LOOK_TIMEOUT = 15.0
LOG_LINES = 25  # of the console log and the kernel log
JOURNAL_LINES = 30  # the journal's tail
UNIT_LINES = 15  # of each failed unit's own journal
UNITS = 5  # failed units whose journal is shown
MARK = "@@pytest-incus-report@@"

# One command gathers everything (one exec, whatever the kind): each part is headed by MARK.
# systemd's own tools only where systemd runs (/run/systemd/system is its sign, as
# sd_booted() says); dmesg only in a VM, where the kernel is the instance's own.
LOOK = f"""\
m={MARK}
if [ -d /run/systemd/system ]; then
  echo "$m failed units (systemctl --failed)"
  systemctl --failed --no-pager --no-legend --plain 2>&1
  systemctl --failed --no-pager --no-legend --plain 2>/dev/null | head -n {UNITS} |
  while read -r unit _; do
    echo "$m journal of $unit (last {UNIT_LINES} lines)"
    journalctl --no-pager -q -n {UNIT_LINES} -u "$unit" 2>&1
  done
  echo "$m journal (last {JOURNAL_LINES} lines)"
  journalctl --no-pager -q -n {JOURNAL_LINES} 2>&1
fi
if [ "$1" = vm ]; then
  echo "$m kernel log (dmesg, last {LOG_LINES} lines)"
  dmesg 2>&1 | tail -n {LOG_LINES}
fi
"""

Section = tuple[str, str]
SectionsHook = Callable[[Instance], Iterable[object]]


def failure_sections(instance: Instance, hook: SectionsHook) -> list[Section]:
    """The report sections of one instance a failed test used: ours, then the hook's."""
    title = f"pytest-incus: {instance.kind} {instance.name}"
    return [(title, instance_text(instance)), *_hook_sections(instance, hook)]


def instance_text(instance: Instance) -> str:
    """What happened in ``instance``, as far as it can be read now."""
    state = instance.state
    blocks = [f"{instance.kind} {instance.name}, image {instance.image}: {state.value}"]
    blocks.append(_commands(instance))
    if state is InstanceState.RUNNING:
        blocks.extend(_look_inside(instance))
    what = "output" if instance.kind is Kind.APP else "console log"
    # a console's lines end as a terminal's do ("\r\n", and a container's console log shows
    # each as a blank line after it): the tail is of the lines that say something
    said = [line for line in _logs(instance).replace("\r", "").splitlines() if line.strip()]
    logs = tail("\n".join(said), LOG_LINES)
    blocks.append(_block(f"{what} (last {LOG_LINES} lines)", logs or "(empty)"))
    return "\n\n".join(blocks)


def _commands(instance: Instance) -> str:
    history = instance.history
    if not history:
        return "no commands run through exec()"
    lines = [
        f"{record.outcome:<10} {record.duration:7.3f} s  {record.command}" for record in history
    ]
    return _block(f"last {len(lines)} commands (oldest first)", "\n".join(lines))


def _look_inside(instance: Instance) -> list[str]:
    request = ExecRequest(
        argv=("/bin/sh", "-c", LOOK, "look", str(instance.kind)),
        env={},
        cwd="/",
        user=None,
        input=None,
        timeout=LOOK_TIMEOUT,
    )
    try:
        result = instance.machine.exec(request)
    except (IncusError, OSError) as exc:
        log.debug("looking inside %s for its failure report: %s", instance.name, exc)
        return [f"(could not look inside: {exc})"]
    if result.exit_code == 127 and not result.stdout:
        return []  # no shell inside (an app image without /bin/sh)
    blocks = []
    for part in result.stdout.split(MARK + " ")[1:]:
        heading, _, body = part.partition("\n")
        blocks.append(_block(heading, body.rstrip("\n") or "(none)"))
    return blocks


def _logs(instance: Instance) -> str:
    try:
        return instance.machine.logs()
    except (IncusError, OSError) as exc:
        return f"(could not read it: {exc})"


def _block(heading: str, body: str) -> str:
    return heading + ":\n" + "\n".join("  " + line for line in body.splitlines())


def _hook_sections(instance: Instance, hook: SectionsHook) -> list[Section]:
    sections: list[Section] = []
    try:
        results = list(hook(instance))
    except Exception as exc:  # the user's code: say what it did, keep the report
        return [(f"{instance.name}: pytest_incus_failure_sections", f"the hook raised {exc!r}")]
    for result in results:
        for pair in result or ():  # type: ignore[attr-defined]
            if (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(isinstance(part, str) for part in pair)
            ):
                sections.append((f"{instance.name}: {pair[0]}", pair[1]))
            else:
                sections.append(
                    (
                        f"{instance.name}: pytest_incus_failure_sections",
                        f"a hook returned {pair!r}; return a list of (title, text) pairs of str",
                    )
                )
    return sections
