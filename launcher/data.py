"""Training and evaluation records from the config, what became of every record read, and the order in
which prompts are drawn.

Two ways to get evaluation sets from public data:
* `data.eval_path` given: every usable record of that file whose modality is in `data.eval_modalities`
  is evaluated, in file order (`num_eval_per_modality` does not apply); `data.path` is then read for
  training only.
* only `data.path`: its images are split (`data.test_fraction` held out, no image on both sides) and
  `num_eval_per_modality` records of each evaluation modality are drawn from the held-out side.
A record that is read but lands in no set is never dropped silently: `DataSets.usage_lines` counts, per
modality, what was read, skipped, trained on, evaluated and left out, and names the left-out modalities.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter

from launcher.config import DataConfig
from medvqa.record import MedVQARecord

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DataSets:
    train: list  # training records (after the seeded subset)
    evals: dict  # evaluation set name (a modality) -> records
    reports: dict = dataclasses.field(default_factory=dict)  # "path" / "eval_path" -> LoadReport of that file
    train_images_in_eval: int = 0  # training records whose image is also evaluated (eval_path only)

    def usage(self) -> dict:
        """Our modality label -> {spellings, read, skipped, train, eval, left_out} over every file read."""
        from medvqa.record_checks import normalize_modality

        rows: dict = {}
        if not self.reports:  # generated data: nothing was read
            return rows
        for report in self.reports.values():
            skipped = Counter(s.modality for s in report.skipped)
            for spelling, n in report.read.items():
                row = rows.setdefault(normalize_modality(spelling), dict(
                    spellings=[], read=0, skipped=0, train=0, eval=0, left_out=0))
                row["spellings"] += [spelling] if spelling not in row["spellings"] else []
                row["read"] += n
                row["skipped"] += skipped[spelling]
        for label, n in Counter(r.modality for r in self.train).items():
            rows[label]["train"] += n
        for records in self.evals.values():
            for label, n in Counter(r.modality for r in records).items():
                rows[label]["eval"] += n
        for row in rows.values():
            row["left_out"] = row["read"] - row["skipped"] - row["train"] - row["eval"]
        return rows

    def usage_lines(self) -> list:
        """The usage table as printable lines, then the modalities no set took and the skip reasons."""
        rows = self.usage()
        if not rows:
            return []
        spelt = {m: ", ".join(repr(s) for s in r["spellings"]) for m, r in rows.items()}
        w1, w2 = max(len("modality"), *map(len, rows)) + 2, max(len("spelt in the data"), *map(len, spelt.values())) + 2
        lines = [f"  {'modality':{w1}s}{'spelt in the data':{w2}s}{'read':>6s}{'skipped':>9s}{'train':>7s}"
                 f"{'eval':>6s}{'left out':>10s}"]
        for m, r in rows.items():
            lines.append(f"  {m:{w1}s}{spelt[m]:{w2}s}{r['read']:6d}{r['skipped']:9d}{r['train']:7d}"
                         f"{r['eval']:6d}{r['left_out']:10d}")
        unused = [f"{spelt[m]} ({r['left_out']})" for m, r in rows.items() if not r["train"] and not r["eval"]
                  and r["left_out"]]
        if unused:
            lines.append(f"  modalities in no training or evaluation set: {', '.join(unused)}")
        for role, report in self.reports.items():
            if report.skipped:
                lines.append(f"  skipped in {role} ({report.origin}): {len(report.skipped)} {report.counts()}")
        return lines

    def summary(self) -> dict:
        """For summary.json: per-modality usage, and per file every skipped record with its reason."""
        return {"usage_by_modality": self.usage(), "train_images_in_eval": self.train_images_in_eval,
                "files": {role: report.to_dict() for role, report in self.reports.items()}}

    def log_usage(self) -> None:
        lines = self.usage_lines()
        if lines:
            log.info("what became of every record read (left out: not skipped, yet in no set):\n%s", "\n".join(lines))


def build_datasets(data_cfg: DataConfig) -> tuple[list[MedVQARecord], dict[str, list[MedVQARecord]]]:
    """(training records, {evaluation set name: records}); held-out images never appear in training."""
    if data_cfg.source == "synthetic":
        from medvqa.synthetic import synthetic_dataset

        return synthetic_dataset(data_cfg)
    data = _public_sets(data_cfg, with_train=True)
    data.log_usage()
    return data.train, data.evals


def build_eval_sets(data_cfg: DataConfig) -> DataSets:
    """The evaluation sets alone (the same ones training evaluates on, for the same config); with
    `data.eval_path` only that file is read."""
    if data_cfg.source == "synthetic":
        return DataSets(train=[], evals=build_datasets(data_cfg)[1])
    data = _public_sets(data_cfg, with_train=False)
    data.log_usage()
    return data


def _public_sets(data_cfg: DataConfig, with_train: bool) -> DataSets:
    """The sets of a public source; without `with_train` the training side is read (the held-out split
    depends on every image read) but left empty, so its records count as left out."""
    from medvqa.loaders import load_records
    from medvqa.record_checks import normalize_modality
    from medvqa.splits import seeded_subset, split_by_image

    train_mods = [normalize_modality(m) for m in data_cfg.train_modalities]
    eval_mods = [normalize_modality(m) for m in data_cfg.eval_modalities]
    if not data_cfg.path and not data_cfg.eval_path:
        raise ValueError(f"config key 'data.path' must name the data for data.source={data_cfg.source!r}")
    if data_cfg.eval_path:
        eval_pool, eval_report = load_records(data_cfg.source, data_cfg.eval_path, eval_mods)
        data = DataSets(train=[], evals=_whole_sets(eval_pool, eval_mods), reports={"eval_path": eval_report})
        if with_train and data_cfg.path:
            data.train, data.reports["path"] = load_records(data_cfg.source, data_cfg.path, train_mods)
            data.train_images_in_eval = _shared_images(data.train, eval_pool)
    else:
        records, report = load_records(data_cfg.source, data_cfg.path, _union(train_mods, eval_mods))
        train_pool, test_pool = split_by_image(records, data_cfg.test_fraction, data_cfg.seed)
        data = DataSets(train=[r for r in train_pool if r.modality in train_mods], reports={"path": report},
                        evals=_drawn_sets(test_pool, eval_mods, data_cfg.num_eval_per_modality, data_cfg.seed))
    if not with_train:
        data.train = []
    else:
        if not data.train:
            raise ValueError(f"no training records of modalities {train_mods} in {data_cfg.path}")
        if data_cfg.num_train is not None:
            data.train = seeded_subset(data.train, data_cfg.num_train, data_cfg.seed)
    return data


def _union(*lists) -> list:
    return list(dict.fromkeys(m for lst in lists for m in lst))


def _whole_sets(pool: list, modalities: list) -> dict:
    """Every record of each modality, in file order."""
    evals = {m: [r for r in pool if r.modality == m] for m in modalities}
    for m in [m for m, records in evals.items() if not records]:
        log.warning("no evaluation records of modality %s; that set is left out", m)
        del evals[m]
    return evals


def _drawn_sets(pool: list, modalities: list, per_modality: int, seed: int) -> dict:
    from medvqa.splits import seeded_subset

    evals = {}
    for modality in modalities:
        of_modality = [r for r in pool if r.modality == modality]
        if not of_modality:
            log.warning("no evaluation records of modality %s; that set is left out", modality)
            continue
        evals[modality] = seeded_subset(of_modality, min(len(of_modality), per_modality), seed)
    return evals


def _shared_images(train: list, evals: list) -> int:
    """Training records that show an image also evaluated; reported, not removed (the paper's own
    training and test files come from one data set)."""
    from medvqa.splits import image_identity

    seen = {image_identity(r) for r in evals}
    shared = sum(image_identity(r) in seen for r in train)
    if shared:
        log.warning("%d of %d training records show an image that data.eval_path also evaluates", shared, len(train))
    return shared


class PromptSampler:
    """Draws prompts epoch by epoch, reshuffled with a seeded generator; state is two integers."""

    def __init__(self, records: list[MedVQARecord], seed: int):
        if not records:
            raise ValueError("the training set is empty")
        self.records = records
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def draw(self, n: int) -> list[MedVQARecord]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            out.append(self.records[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)
