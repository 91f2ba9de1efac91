"""A federated round's report: the new global model's evaluation, the institutions' table and the
progress line (written by the root)."""

from __future__ import annotations

import time

from ..federated.institutions import Federation
from .evaluate import evaluate
from .federated_site import Site


def report_round(reporter, record, site: Site, fed: Federation, rounds: int, xp,
                 model=None) -> None:
    """Evaluate the new global model where data.test is set; log the round (root)."""
    if fed.is_root and "reports" in record:
        record["institutions"] = institution_table(record.pop("reports"), site.site_samples,
                                                   record.pop("sent", None))
    elif fed.is_root and "participants" in record:  # who took part, nothing of any one of them
        chosen = record.pop("participants")
        record["institutions"] = [{"institution": k, "participated": k in chosen}
                                  for k in range(len(fed.sizes))]
    if site.test is not None:  # model: ZeRO-3's per-layer gatherer, else site.params
        result = evaluate(site.spec, site.params if model is None else model, site.test,
                          fed.world, xp)
        record.update(accuracy=result["accuracy"], test_loss=result["loss"],
                      test_samples=result["samples"])
    reporter.record(event="round", time=time.time(), **record)
    reporter.line(round_line(record, rounds))


def institution_table(reports: dict, site_samples: list[int], sent: dict | None = None
                      ) -> list[dict]:
    """Per-institution entries of a round record (idle institutions marked as such); sent:
    {institution: bytes its leader sent the root} (the root's own institution sends none)."""
    table = []
    for k, samples in enumerate(site_samples):
        entry = {"institution": k, "samples": int(samples), "participated": k in reports}
        if k in reports:
            r = reports[k]
            entry.update(steps=int(r.steps), loss=float(r.loss))
            if sent is not None:
                entry["bytes_sent"] = int(sent[k])
            if r.local_accuracy or r.local_loss:
                entry.update(local_loss=float(r.local_loss),
                             local_accuracy=float(r.local_accuracy))
        table.append(entry)
    return table


def round_line(record: dict, rounds: int) -> str:
    """The progress line of a round."""
    text = f"round {record['round']}/{rounds}"
    if "accuracy" in record:
        text += f" accuracy {record['accuracy']:.4f}"
    losses = [f"{e['loss']:.3f}" for e in record.get("institutions", []) if "loss" in e]
    if losses:
        text += f" local losses [{', '.join(losses)}]"
    elif "loss" in record:
        text += f" mean local loss {record['loss']:.3f}"
    if "local_accuracy_mean" in record:  # every institution on its own test split
        text += (f" local accuracy mean {record['local_accuracy_mean']:.4f} worst "
                 f"{record['local_accuracy_worst']:.4f}")
    if "epsilon" in record:
        text += f" epsilon {record['epsilon']:.3g}"
    if "round_seconds" in record:  # not under secret sampling
        text += f" {record['round_seconds']:.2f} s,"
    text += f" to root {record['bytes_to_root']:,} B"
    if "comm_fraction" in record:  # a plain run's: the root's own institution's figure
        text += f", comm {100 * record['comm_fraction']:.0f}%"
    return text

