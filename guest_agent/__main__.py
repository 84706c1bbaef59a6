"""``python3 -m guest_agent [--path DEV | --unix-listen PATH] [--block-rpcs a,b] [--init]``

Serves QEMU guest-agent requests on the virtio-serial port ``org.qemu.guest_agent.0`` (found
through sysfs unless ``--path`` names it) or, for tests, on a listening unix socket. ``--init``
makes it the guest's first process (see ``init``). Messages are limited to 64 MiB each.

Imports are kept few and late: under TCG every module costs tens of milliseconds of boot.
"""

from __future__ import annotations

import os
import signal
import sys

from guest_agent import commands, init, network, protocol

USAGE = (
    "usage: python3 -m guest_agent [--path DEV | --unix-listen PATH] [--block-rpcs a,b] [--init]"
)


def parse(argv: list[str]) -> dict[str, str | bool]:
    """The options in ``argv`` (no argparse: it is slow to import under TCG)."""
    options: dict[str, str | bool] = {"init": False}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, _, value = arg.partition("=")
        if name == "--init":
            options["init"] = True
        elif name in ("--path", "--unix-listen", "--block-rpcs"):
            if not value:
                if not args:
                    raise SystemExit(f"{USAGE}\nguest_agent: {name} needs a value")
                value = args.pop(0)
            options[name[2:]] = value
        elif name in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        else:
            raise SystemExit(f"{USAGE}\nguest_agent: unknown argument {arg!r}")
    if "path" in options and "unix-listen" in options:
        raise SystemExit(f"{USAGE}\nguest_agent: --path and --unix-listen exclude each other")
    return options


def main(argv: list[str] | None = None) -> int:
    """Serve requests until killed."""
    options = parse(sys.argv[1:] if argv is None else argv)
    init_mode = bool(options["init"])
    if init_mode:
        init.setup()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a vanished host must not kill us
    blocked = [n.strip() for n in str(options.get("block-rpcs", "")).split(",") if n.strip()]
    agent = commands.Agent(blocked, init_mode=init_mode)
    network.prepare()  # before any boot snapshot is saved: see guest_agent/network.py
    channel: protocol.Channel
    if options.get("unix-listen"):
        channel = protocol.UnixChannel(str(options["unix-listen"]))
    else:
        channel = protocol.SerialChannel(str(options.get("path") or protocol.find_port()))
    serve(channel, agent)
    return 0


def serve(channel: protocol.Channel, agent: commands.Agent) -> None:
    """Answer every request from ``channel``, forever. Nothing a host sends may end this
    loop (in init mode it is PID 1, and the guest powers off when it returns): the agent
    turns every request into a reply, and an exception in the loop itself (a bug, a channel
    that fails) is written to stderr, the half-read message dropped, and serving goes on."""
    last_failure = 0.0
    while True:
        try:
            for request in protocol.requests(channel, protocol.Decoder()):
                data = agent.answer(request)
                if data is not None:
                    channel.write(data)
                if agent.init_mode:
                    init.reap_orphans(commands.running_pids)
        except Exception:
            import contextlib
            import time
            import traceback

            with contextlib.suppress(Exception):  # a closed stderr must not end the loop
                traceback.print_exc()
            if time.monotonic() - last_failure < 1.0:
                time.sleep(0.1)  # failing again at once: do not spin the guest's CPU
            last_failure = time.monotonic()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if os.getpid() == 1:  # PID 1 must never exit: the kernel would panic
            from guest_agent import init

            init.power("powerdown")
