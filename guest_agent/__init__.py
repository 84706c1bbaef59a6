"""The pytest-incus guest agent: runs inside VMs and speaks QEMU's guest-agent protocol.

Standard library only, for the guest's Python 3.9 or later; it never imports pytest_incus.
Start it with ``python3 -m guest_agent`` (see ``__main__``).
"""

VERSION = "0.3.0"
