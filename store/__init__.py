"""The on-disk contract of an MCN workspace: the one owner of every path, format and rule on disk.

Every other package (``pipeline``, ``model``, ``evaluation``, ``extractors``, ``synthetic``) asks this
package where things are and how they are written or read; none re-derives a path, a shard name, a
field list, a rate or a record schema. It imports none of them.

Modules (import them directly; this file imports nothing so that ``mcn --help`` stays light):

- :mod:`store.layout`  -- :class:`~store.layout.Workspace`: every path, shard and checkpoint names,
  listings of the workspace (the only globbing of it).
- :mod:`store.fields`  -- the feature fields, their members, per-video statuses, the usable-video rule.
- :mod:`store.identity` -- who a process is (host, machine, pid, start time): its owner token.
- :mod:`store.owner`   -- whether an owner is alive: the per-workspace registry with its heartbeat.
- :mod:`store.atomic`  -- the one atomic writer (temporary names unique across hosts and containers),
  and the sweep that removes only the temporary files of owners that are gone.
- :mod:`store.claims`  -- advisory locks on units of work that name their owner.
- :mod:`store.lineage` -- fingerprints, lineage (config, code, inputs) and unit records with reasons
  for staleness.
- :mod:`store.shards`  -- feature shards: the writer, the done record, the done / stale / missing check.
- :mod:`store.reader`  -- the one safe shard reader (npy / json / txt only, bounded), the zip of the
  four fields and the feature rates taken from the done records.
- :mod:`store.manifest` -- the manifest and caption files written by ``scan``.
"""
