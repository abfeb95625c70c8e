import json

from lipverify.run.records import RecordWriter, read_records
from lipverify.run.summary import summarise


def test_partial_last_line_is_dropped_and_truncated(tmp_path):
    path = tmp_path / "r.jsonl"
    with RecordWriter(path) as w:
        w.write([{"index": 0, "eps_key": "0.1"}])
    with path.open("a") as fh:
        fh.write('{"index": 1, "eps_')  # a killed write
    assert [r["index"] for r in read_records(path)] == [0]
    with RecordWriter(path, resume=True) as w:
        w.write([{"index": 1, "eps_key": "0.1"}])
    lines = path.read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1]


def test_summary_counts():
    recs = [
        {"index": 0, "eps_key": "0.1", "label": 1, "predicted": 1, "status": "verified",
         "per_backend": {"a": {"status": "verified"}, "b": {"status": "unknown"}}},
        {"index": 1, "eps_key": "0.1", "label": 0, "predicted": 1, "status": "falsified",
         "per_backend": {"a": {"status": "unknown"}}},
    ]
    s = summarise(recs, [0.1], ["a", "b"])
    assert s["n"] == 2 and s["clean_accuracy"] == 0.5
    assert s["certified"]["0.1"] == {"a": 1, "b": 0, "best": 1}
    assert s["falsified"]["0.1"] == 1
