"""The live event stream (``GET /experiments/{id}/events``) of a real run: a real API and worker process, a real
search (simulated annealing on the digits task, with an evaluator slowed down so the run is observed live)."""

from __future__ import annotations

import pytest

from server.client import ApiError, PrunehubClient, _parse_sse
from tests.conftest import LiveService, wait_terminal
from tests.server.conftest import SLOW_ANNEALING

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_parse_sse_handles_comments_multiline_data_and_retry() -> None:
    lines = ["retry: 1500", "", ": keepalive", "", "id: 7", "event: trial", "data: {\"a\":", "data: 1}", "", "id: 8"]
    assert list(_parse_sse(iter(lines))) == [
        {"retry": 1500},
        {"id": "7", "event": "trial", "data": '{"a":\n1}'},
        {"id": "8"},
    ]


def test_stream_delivers_a_real_run_in_order_and_resumes_with_last_event_id(live_slow: LiveService) -> None:
    with PrunehubClient(live_slow.url, api_key=live_slow.api_key) as client, live_slow.http() as http:
        assert http.get("/experiments/424242/events").status_code == 404
        with pytest.raises(ApiError) as missing:
            next(client.events(424242))
        assert missing.value.status_code == 404

        experiment = client.submit(SLOW_ANNEALING)
        live_events: list[dict] = []
        seen_running_trial = False
        for event in client.events(experiment["id"]):
            live_events.append(event)
            if event["kind"] == "trial" and not seen_running_trial:
                # Delivered while the search runs, not replayed after it ended.
                seen_running_trial = client.get(experiment["id"])["status"] == "running"
            if len([e for e in live_events if e["kind"] == "trial"]) == 3:
                break  # drop the connection mid-run ...
        assert seen_running_trial, live_events
        # ... and reconnect with the last id received: exactly what was missed, nothing twice.
        resumed = list(client.events(experiment["id"], last_event_id=live_events[-1]["id"]))
        final = wait_terminal(http, experiment["id"])
        assert final["status"] == "succeeded", live_slow.logs()

        everything = list(client.events(experiment["id"]))  # a finished experiment replays and ends
        assert [e["id"] for e in live_events + resumed] == [e["id"] for e in everything]
        ids = [e["id"] for e in everything]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)

        statuses = [e["status"] for e in everything if e["kind"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        trials = [e for e in everything if e["kind"] == "trial"]
        stored = http.get(f"/experiments/{experiment['id']}/trials").json()["items"]
        assert [t["seq"] for t in trials] == [t["seq"] for t in stored] == list(range(1, len(stored) + 1))
        assert [t["trial_id"] for t in trials] == [t["id"] for t in stored]
        assert [t["score"] for t in trials] == pytest.approx([t["score"] for t in stored])
        assert all("temperature" in t["context"] for t in trials)
        # Every trial comes after "running" and before "succeeded"; progress counts up to the budget.
        kinds = [e["kind"] for e in everything]
        running_at = next(i for i, e in enumerate(everything) if e.get("status") == "running")
        assert running_at < kinds.index("trial") and kinds[-1] == "status"
        progress = [e["done"] for e in everything if e["kind"] == "progress"]
        assert progress == sorted(progress) and progress[-1] == len(stored)
        best = [e for e in everything if e["kind"] == "best"][-1]
        assert best["trial_id"] == final["best"]["trial_id"]

        # The raw protocol: SSE framing, the Last-Event-ID header, and ?after= for clients that cannot set it.
        middle = ids[len(ids) // 2]
        raw = http.get(f"/experiments/{experiment['id']}/events", headers={"Last-Event-ID": str(middle)})
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.text.startswith("retry: ")
        assert f"id: {ids[-1]}\nevent: status\n" in raw.text
        header_ids = [int(line[4:]) for line in raw.text.splitlines() if line.startswith("id: ")]
        assert header_ids == [i for i in ids if i > middle]
        query = http.get(f"/experiments/{experiment['id']}/events", params={"after": middle})
        assert [int(line[4:]) for line in query.text.splitlines() if line.startswith("id: ")] == header_ids
