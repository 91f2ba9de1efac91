"""`mpifed demo` (`make demo`) trains the digits MLP on 2 ranks to at least 0.95 test accuracy,
the convnet to 0.98, and prints the federated table with its convnet column."""

import json

from mpifed.cli import demo


def test_demo_reaches_its_accuracy(tmp_path, capsys):
    assert demo.main(out=str(tmp_path / "demo"), ranks=2) == 0
    summary = json.loads((tmp_path / "demo" / "train" / "metrics.jsonl").read_text()
                         .splitlines()[-1])
    assert summary["accuracy"] >= 0.95
    convnet = json.loads((tmp_path / "demo" / "convnet" / "metrics.jsonl").read_text()
                         .splitlines()[-1])
    assert convnet["accuracy"] >= 0.98
    rounds = [json.loads(line) for line in (tmp_path / "demo" / "fedavg-convnet" /
                                            "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "round" for r in rounds) == 15
    out = capsys.readouterr().out
    assert "test accuracy" in out
    header = next(line for line in out.splitlines() if line.startswith("round"))
    assert header.split() == ["round", "centralised", "fedavg", "fedprox", "fedavg-convnet"]
    assert out.rstrip().splitlines()[-5:] == demo.next_steps(str(tmp_path / "demo" /
                                                                  "digits.toml"))


def test_next_steps_say_where_to_go():
    text = "\n".join(demo.next_steps("demo-out/digits.toml"))
    assert 3 <= len(demo.next_steps("c.toml")) - 1 <= 5
    for what in ("mpifed data from-numpy", "mpifed.train.run", "docs/reference/configuration.md",
                 "jobs/train.sbatch", "demo-out/digits.toml"):
        assert what in text
