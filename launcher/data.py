"""Training and evaluation records from the config, and the order in which prompts are drawn."""
from __future__ import annotations

import logging
import random

from medvqa.record import MedVQARecord

log = logging.getLogger(__name__)


def build_datasets(data_cfg) -> tuple[list[MedVQARecord], dict[str, list[MedVQARecord]]]:
    """(training records, {evaluation set name: records}); evaluation images never appear in training."""
    if data_cfg.source == "synthetic":
        from medvqa.synthetic import synthetic_dataset

        return synthetic_dataset(data_cfg)
    from medvqa.loaders import seeded_subset

    train_pool, test_pool = _public_pools(data_cfg)
    train = [r for r in train_pool if r.modality in data_cfg.train_modalities]
    if not train:
        raise ValueError(f"no training records of modalities {list(data_cfg.train_modalities)} in {data_cfg.path}")
    if data_cfg.num_train is not None:
        train = seeded_subset(train, data_cfg.num_train, data_cfg.seed)
    return train, _eval_sets(data_cfg, test_pool)


def build_eval_sets(data_cfg) -> dict[str, list[MedVQARecord]]:
    """The held-out sets alone (the same ones training evaluates on, for the same config)."""
    if data_cfg.source == "synthetic":
        return build_datasets(data_cfg)[1]
    return _eval_sets(data_cfg, _public_pools(data_cfg)[1])


def _public_pools(data_cfg) -> tuple[list[MedVQARecord], list[MedVQARecord]]:
    from medvqa.loaders import load_records, split_by_image

    if not data_cfg.path and not data_cfg.eval_path:
        raise ValueError(f"config key 'data.path' must name the data for data.source={data_cfg.source!r}")
    if data_cfg.eval_path:
        test_pool, _ = load_records(data_cfg.source, data_cfg.eval_path, seed=data_cfg.seed)
        train_pool = load_records(data_cfg.source, data_cfg.path, seed=data_cfg.seed)[0] if data_cfg.path else []
        return train_pool, test_pool
    records, report = load_records(data_cfg.source, data_cfg.path, seed=data_cfg.seed)
    log.info("loaded %d records from %s (%d skipped)", len(records), data_cfg.path, len(report.skipped))
    return split_by_image(records, data_cfg.test_fraction, data_cfg.seed)


def _eval_sets(data_cfg, test_pool: list[MedVQARecord]) -> dict[str, list[MedVQARecord]]:
    from medvqa.loaders import seeded_subset

    evals = {}
    for modality in data_cfg.eval_modalities:
        pool = [r for r in test_pool if r.modality == modality]
        if not pool:
            log.warning("no evaluation records of modality %s; that set is left out", modality)
            continue
        evals[modality] = seeded_subset(pool, min(len(pool), data_cfg.num_eval_per_modality), data_cfg.seed)
    return evals


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
