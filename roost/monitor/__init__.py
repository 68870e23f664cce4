"""Watching the served model: payload events, the receiver, drift statistics, the watch loop.

- :mod:`roost.monitor.events`: KServe's InferenceLogger wire format (CloudEvents over HTTP);
- :mod:`roost.monitor.payload`: the predictor's logger (bounded queue, background sender);
- :mod:`roost.monitor.receiver` + :mod:`roost.monitor.journal`: ``roost monitor serve``,
  a durable store of events and feedback (fsync'd journal -> Parquet);
- :mod:`roost.monitor.local`: ``roost monitor up|down`` (the receiver in the background);
- :mod:`roost.monitor.profile`: the reference profile ``roost train`` logs;
- :mod:`roost.monitor.stats` (pure) and :mod:`roost.monitor.report`: ``roost monitor report``;
- :mod:`roost.monitor.watch`: ``roost monitor watch`` (policy, state, lease, actions);
- :mod:`roost.monitor.deploy`: ``roost deploy --log-url/--log-mode``;
- :mod:`roost.monitor.bench`: the receiver's throughput (``python -m roost.monitor.bench``).

See docs/monitoring.md.
"""
