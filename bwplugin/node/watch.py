"""The annotation watch: the agent follows the pods of its own node through the
Kubernetes API and applies changed `kubernetes.io/ingress-bandwidth` and
`kubernetes.io/egress-bandwidth` annotations to the running pods, as a live
change (the same one `bwplugin set` makes), within a second or two.

The official `kubernetes` client does the API work: in-cluster config (or a
kubeconfig), list with fieldSelector=spec.nodeName, then watch from the list's
resourceVersion; a 410 Gone means the watch fell too far behind, so it lists
again; any other failure backs off (0.5 s doubling to 30 s) and lists again.

With the watch on, the annotations are the truth for pods whose rates came
from them: an annotation removed lifts that direction (as a new pod would get),
one back at its ADD-time value ends the override, and a manual `bwplugin set`
lasts until the pod's annotations next change. Pods shaped by the conflist's
static keys are left alone, as ADD leaves their annotations alone."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

ANNOTATIONS = {"ingress": "kubernetes.io/ingress-bandwidth", "egress": "kubernetes.io/egress-bandwidth"}
WATCH_SECONDS = 300  # one watch request; then it resumes from the last resourceVersion
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0

Apply = Callable[[bytes], tuple[int, dict[str, Any]]]  # cli.run_set
Log = Callable[[str], None]
Count = Callable[[str, str], None]  # (metric, label): events by type, errors by reason, applied


def desired(pod: dict[str, Any]) -> dict[str, Any]:
    """The live change a pod's annotations ask for (origin "watch")."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    doc: dict[str, Any] = {"pod": f"{meta.get('namespace', '')}/{meta.get('name', '')}", "origin": "watch"}
    for direction, key in ANNOTATIONS.items():
        doc[direction] = annotations.get(key, "none")
    return doc


class PodWatcher:
    def __init__(self, node: str, apply: Apply, log: Log, count: Count, kubeconfig: str | None = None) -> None:
        self.node = node
        self.apply = apply
        self.log = log
        self.count = count
        self.kubeconfig = kubeconfig
        self.applied: dict[str, str] = {}  # pod uid -> the change last applied (its JSON)
        self.stop = threading.Event()

    def _api(self) -> Any:
        from kubernetes import client, config  # only with --watch-pods: it is large

        if self.kubeconfig:
            config.load_kube_config(config_file=self.kubeconfig)
        else:
            config.load_incluster_config()
        return client.CoreV1Api()

    def run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        backoff = BACKOFF_FIRST
        selector = f"spec.nodeName={self.node}"
        while not self.stop.is_set():
            try:
                api = self._api()
                listed = api.list_pod_for_all_namespaces(field_selector=selector, _preload_content=False)
                pods = json.loads(listed.data)
                self.count("lists", "")
                self._reconcile_all(pods.get("items") or [])
                version = pods["metadata"]["resourceVersion"]
                backoff = BACKOFF_FIRST
                while not self.stop.is_set():
                    started, seen = time.monotonic(), 0
                    stream = watch.Watch()
                    for event in stream.stream(
                        api.list_pod_for_all_namespaces,
                        field_selector=selector,
                        resource_version=version,
                        timeout_seconds=WATCH_SECONDS,
                    ):  # (the client decodes ERROR events, a 410 among them, only when it deserializes)
                        raw = event.get("raw_object") or {}
                        seen += 1
                        self._event(str(event.get("type", "")), raw)
                        version = (raw.get("metadata") or {}).get("resourceVersion", version)
                        if self.stop.is_set():
                            stream.stop()
                            return
                    if not seen and time.monotonic() - started < 1:
                        self.stop.wait(1)  # a watch that ends at once, again and again, must not spin
            except ApiException as exc:
                if exc.status == 410:  # the watch fell behind the API server's history: list again
                    self.count("errors", "gone")
                    self.log("watch: 410 Gone, listing the node's pods again")
                    continue
                self._failed("api", f"API error {exc.status} {exc.reason}", backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as exc:  # connection refused or dropped, bad config, bad JSON
                self._failed("connection", f"{exc.__class__.__name__}: {exc}", backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _failed(self, reason: str, what: str, backoff: float) -> None:
        self.count("errors", reason)
        self.log(f"watch: {what}; listing again in {backoff:g} s")
        self.stop.wait(backoff)

    def _reconcile_all(self, pods: list[dict[str, Any]]) -> None:
        uids = set()
        for pod in pods:
            uids.add(str((pod.get("metadata") or {}).get("uid", "")))
            self.reconcile(pod)
        for gone in set(self.applied) - uids:
            del self.applied[gone]

    def _event(self, kind: str, pod: dict[str, Any]) -> None:
        self.count("events", kind.lower())
        if kind in ("ADDED", "MODIFIED"):
            self.reconcile(pod)
        elif kind == "DELETED":  # its sandbox's DEL removes the attachment
            self.applied.pop(str((pod.get("metadata") or {}).get("uid", "")), None)

    def reconcile(self, pod: dict[str, Any]) -> None:
        """Apply the pod's annotations if they differ from what was last applied
        for it (status updates, which are most events, then cost nothing)."""
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        doc = desired(pod)
        text = json.dumps(doc, sort_keys=True)
        if self.applied.get(uid) == text:
            return
        code, out = self.apply(text.encode())
        if code == 0:
            self.applied[uid] = text
            if out.get("changed"):
                self.count("applied", "")
                self.log(f"watch: {doc['pod']}: ingress {doc['ingress']}, egress {doc['egress']} applied")
        elif out.get("code") == 3:
            self.applied[uid] = text  # not shaped by bwplugin on this node (or not started yet): nothing to do
        else:
            self.applied[uid] = text  # the same annotations would fail again: wait for them to change
            self.count("errors", "annotation" if out.get("code") == 7 else "apply")
            self.log(f"watch: {doc['pod']}: {out.get('msg')}")
