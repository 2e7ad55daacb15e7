"""Boards over TVM RPC.

- :mod:`edgeq.remote.session`: connect (``--rpc`` or tracker + key), upload, load, run in a Relax VM, board info
- :mod:`edgeq.remote.local`: RPC servers and trackers as local processes (loopback)
- :mod:`edgeq.remote.emulated`: the emulated aarch64 board (qemu-user + Debian arm64 sysroot)
- :mod:`edgeq.remote.background`: boards left running by ``edgeq board start``, found again by ``status``/``stop``

Nothing here imports TVM until a function needs it.
"""
