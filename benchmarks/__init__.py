"""Allspark's benchmark harness: ``python -m benchmarks`` (see ``__main__``).

Modules: ``procs`` (the processes it starts and what /proc says about them),
``runner`` (one load against one target), ``suite`` (the scenarios),
``report`` (JSON, markdown, targets, PNG), ``loadgen`` (the Python load
generator), ``relay_autobahn`` (the bare Autobahn relay), and ``node/`` (the
Node load generator and the Node ws / Socket.IO relays).
"""
