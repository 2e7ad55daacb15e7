"""Boards over TVM RPC: reaching them, and the stages that run an artifact on them.

- :mod:`edgeq.boards.deploy`: ``edgeq deploy`` (upload, load, golden batch bit for bit against the host)
- :mod:`edgeq.boards.check`: ``edgeq check`` (on-board top-1 and agreement with the host library)
- :mod:`edgeq.boards.profile` and :mod:`edgeq.boards.profile_ops`: ``edgeq profile`` (latency per bit plan, per op)

- :mod:`edgeq.boards.session`: connect (``--rpc`` or tracker + key), upload, load, run in a Relax VM, board info
- :mod:`edgeq.boards.local`: RPC servers and trackers as local processes (loopback)
- :mod:`edgeq.boards.emulated`: the emulated aarch64 board (qemu-user + Debian arm64 sysroot)
- :mod:`edgeq.boards.background`: boards left running by ``edgeq board start``, found again by ``status``/``stop``

Nothing here imports TVM until a function needs it.
"""
