"""Weight streaming: assigning a stage to a worker, its blobs in CHUNK_BYTES chunks, progress,
and the worker's ready.

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

from coordinator.records import LOCAL, Send, Stage, Worker
from protocol import wire
from protocol.blobs import CHUNK_BYTES, chunk, sha256


class WeightStreaming:
    def _holds_range(self, wid: str, key: tuple[int, int]) -> bool:
        """Whether some stage of the plan (any pipeline, retiring ones too) has `wid` holding layers `key`."""
        return any((s.layer_start, s.layer_end) == key and wid in s.holders for s in self.stages)

    def _loading_range(self, w: Worker, key: tuple[int, int]) -> bool:
        """Whether one of `w`'s assignments in flight loads layers `key` (for some pipeline): one
        load serves every pipeline it holds the range in."""
        return any(e[0] < len(self.stages) and (self.stages[e[0]].layer_start, self.stages[e[0]].layer_end) == key
                   for e in w.loading.values())

    def _serves_range(self, wid: str, key: tuple[int, int]) -> bool:
        """Whether worker `wid` has layers `key` loaded for some stage (of any pipeline): assigned
        them again, its backend would be replaced and the sessions it runs there lose their KV."""
        return any(wid in x.ready for x in self.stages if (x.layer_start, x.layer_end) == key)

    def _unload_unheld(self, w: Worker, key: tuple[int, int]) -> list:
        """A range the live worker held but no stage has it hold any more: unloaded, to free its
        memory (on the coordinator's own compute its verify state goes with it)."""
        if not w.alive or self._holds_range(w.worker_id, key):
            return []
        if w.worker_id == LOCAL:
            self._verify_ranges.pop(key, None)
            self._forget_verify_kv(lambda k: k[1] == key and k[2] == LOCAL)
        return [Send(w.conn, wire.make("unload", reason="re-plan", layer_start=key[0], layer_end=key[1]))]

    def _stage_blobs(self, st: Stage) -> list[str]:
        keys = [f"layer:{i}" for i in range(st.layer_start, st.layer_end)]
        return keys + (["head"] if st.include_head else [])

    def _assign(self, w: Worker, st: Stage, now: float) -> list:
        aid = next(self._ids)
        keys = self._stage_blobs(st)
        infos = [self.blob_info[k] for k in keys]
        w.loading[aid] = (st.index, [i.sha256 for i in infos])
        w.load_progress = {}  # this assignment's reports start afresh (the last one stays after ready)
        if w.state in ("idle", "ready") or w.remeasuring:
            w.move("assign")
        to_send = sum(i.size for i in infos if i.sha256 not in w.have_blobs)
        allowed = self.settings.load_timeout_min_s + to_send / self.settings.load_min_bytes_per_s
        w.load_deadline = max(w.load_deadline or now, now + allowed)
        out = [Send(w.conn, wire.make("assign", assignment_id=aid, layer_start=st.layer_start, layer_end=st.layer_end,
                                 include_head=st.include_head, model=self.config.to_dict(), max_ctx=self.settings.max_ctx,
                                 precision=self._precision(),
                                 chunks=[i.to_dict() for i in infos]))]
        chunks = self._weight_chunks(w, infos)
        sent = sum(len(c.msg["data"]) for c in chunks)
        w.bytes_sent += sent
        self.counters["weight_bytes_sent"] += sent
        return out + chunks

    def _weight_chunks(self, w: Worker, infos: list) -> list:
        """The weights_chunk messages of the blobs `w` does not hold yet, in layer order (the
        earliest layers first)."""
        out = []
        for info in infos:
            if info.sha256 in w.have_blobs:
                continue
            data = self.blob_bytes[info.key]
            # each chunk's digest is computed once: hashing the whole model again for every tab
            # that loads it held the event loop (and every running stream) for ~70 ms a tab here
            digests = self._chunk_digests.get(info.sha256)
            if digests is None:
                digests = self._chunk_digests[info.sha256] = [sha256(chunk(data, c)) for c in range(info.chunks)]
            for c in range(info.chunks):
                out.append(Send(w.conn, wire.make("weights_chunk", chunk_id=c, name=info.key, blob=info.sha256, offset=c * CHUNK_BYTES,
                                             total=info.size, data=chunk(data, c), sha256=digests[c])))
        return out

    def _precision(self) -> dict:
        p = {"compute": self.settings.compute_dtype}
        if self.settings.workgroup_size:
            p["workgroup_size"] = self.settings.workgroup_size
        return p

    def _on_weights_ack(self, w: Worker, m: dict, now: float) -> list:
        if not m["ok"]:
            return self._worker_lost(w, now, f"weights rejected: {m.get('error')}", quarantine=True)
        return []

    def _on_load_progress(self, w: Worker, m: dict, now: float) -> list:
        w.load_progress = {"layer": m["layer"], "received_bytes": m["received_bytes"], "total_bytes": m["total_bytes"]}
        return []

    def _on_ready(self, w: Worker, m: dict, now: float) -> list:
        key = self._verify_assign.pop(m.get("assignment_id"), None)
        if key is not None:  # LOCAL loaded a range only to verify others' steps
            self._verify_ranges[key] = "ready"
            return [Send(w.conn, c) for c in self._verify_parked.pop(key, [])]
        if self._trial_assign.get(m.get("assignment_id")) == w.worker_id:
            return self._on_trial_ready(w, m, now)
        entry = w.loading.pop(m.get("assignment_id"), None)
        if entry is None:
            return []
        stage_index, shas = entry
        if m["checksum"] != sha256("".join(shas).encode()):
            # the digest of the assignment's blob digests, as the tab computed it when it
            # assembled them: a tab that never had them answers anything ("x"). Only a weak
            # proof alone (the digests are public); its first steps are recomputed (probation)
            return self._worker_lost(w, now, "ready with a checksum that does not match its assignment", quarantine=True)
        w.have_blobs.update(shas)
        for c in m.get("corrections") or []:
            if c not in w.corrections:
                w.corrections.append(c)
                self.events.append({"t": now, "kind": "correction", "worker": w.worker_id, **c})
        # a tab on trial that a repair gave a stage may answer the stage's load before its trial's:
        # it stays loading, the trial's load deadline kept, until _on_trial_ready
        if not self._loads_out(w):
            w.move("loaded")
            w.load_deadline = None
        st = self.stages[stage_index] if stage_index < len(self.stages) else None
        layers = tuple(m.get("layers") or ())
        if st is None or w.worker_id not in st.holders or (layers and layers != (st.layer_start, st.layer_end)):
            # loaded for a plan replaced meanwhile (joins re-plan while others still load): the
            # index may now name other layers. Free the range, or tabs pile up orphan ranges
            # (seen with 32 tabs joining: 1 GB held each, for a 100 MB model)
            if layers and not self._holds_range(w.worker_id, layers):
                return [Send(w.conn, wire.make("unload", reason="re-plan", layer_start=layers[0], layer_end=layers[1]))]
            return []
        self.events.append({"t": now, "kind": "loaded", "worker": w.worker_id, "layers": [st.layer_start, st.layer_end]})
        out = []
        # one load serves every pipeline it holds this range in (a replica's standby duty too)
        for same in self.stages:
            if (same.layer_start, same.layer_end) == (st.layer_start, st.layer_end) and w.worker_id in same.holders:
                same.ready.add(w.worker_id)
                if same.needs_rebuild and same.primary == w.worker_id:
                    out += self._rebuild(same, now)
        return out + self._retire(now) + self._pump(now)
