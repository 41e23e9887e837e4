"""The classifier-stealing attack's settings: which attack and its parameters, the clone, its training.

Sources of every default are in :mod:`stealer.classifier.knockoff` and :mod:`stealer.classifier.data_free`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from stealer.config import (BackboneConfig, ConfigError, JobHeader, Momentum, NonNegFloat, NonNegInt, PositiveFloat,
                            PositiveInt, choice, own_default)

__all__ = ["CLASSIFIER_ATTACKS", "ClassifierAttackConfig", "CloneConfig", "CloneTrainConfig", "CLONE_MAY_CHANGE",
           "DATA_FREE_MAY_CHANGE", "START_OVER", "VictimSection", "EvalSection", "ClassifierStealConfig"]

CLASSIFIER_ATTACKS = ("knockoff_random", "knockoff_adaptive", "dfme", "maze")


@dataclass
class ClassifierAttackConfig:
    """The classifier attack (``attack.name``, one of :data:`CLASSIFIER_ATTACKS`) and its parameters (sources in the
    module docstring); the encoder attacks have :class:`stealer.attacks.EncoderAttackConfig`."""

    name: str = "knockoff_random"  # knockoff_random | knockoff_adaptive | dfme | maze
    # Knockoff: the attacker's transfer set (shard folders); add runs/demo/data/digits/probe_train for an OOD source
    query_sets: list[str] = field(default_factory=lambda: ["runs/demo/data/animal_mnist/query"])
    batch_size: PositiveInt = 128  # images per victim call (knockoff random)
    # Knockoff adaptive
    actions: str = "classes"  # classes (labels of the query sets) | kmeans (clusters of 8x8 thumbnails)
    num_clusters: PositiveInt = 10
    reward: str = "all"  # certainty | diversity | loss | all
    bandit_lr: PositiveFloat = 0.1  # α of the gradient bandit
    step_images: PositiveInt = 16  # images per bandit step (one action per step)
    diversity_window: PositiveInt = 25  # Δ, bandit steps in the diversity reward's running mean
    online_lr: PositiveFloat = 0.01  # SGD lr of the online clone that scores the loss reward
    # DFME / MAZE (None = the paper's value for the chosen attack)
    df_batch_size: PositiveInt = 64
    nz: PositiveInt | None = None  # latent size (DFME 256, MAZE 100)
    gen_width: PositiveInt = 32  # generator base width
    directions: PositiveInt | None = None  # m random directions per image (DFME 1, MAZE 10)
    fd_epsilon: PositiveFloat = 0.5  # forward-difference step on [0, 1] pixels (see the module docstring)
    gen_iters: PositiveInt = 1  # n_G
    clone_iters: PositiveInt = 5  # n_S / n_C
    replay_iters: NonNegInt | None = None  # MAZE experience replay steps per iteration (MAZE 10; DFME 0)
    lr_gen: PositiveFloat = 1e-4
    lr_clone: PositiveFloat = 0.1
    weight_decay: NonNegFloat = 5e-4

    def validate(self) -> None:
        choice("attack.name", self.name, CLASSIFIER_ATTACKS)
        choice("attack.actions", self.actions, ["classes", "kmeans"])
        choice("attack.reward", self.reward, ["certainty", "diversity", "loss", "all"])
        for k in ("batch_size", "step_images", "df_batch_size", "gen_iters", "clone_iters", "num_clusters", "gen_width",
                  "diversity_window"):
            if getattr(self, k) < 1:
                raise ConfigError(f"attack.{k}={getattr(self, k)} must be >= 1")
        if self.directions is not None and self.directions < 1:
            raise ConfigError(f"attack.directions={self.directions} must be >= 1 (or null for the paper's value)")
        if not self.fd_epsilon > 0:
            raise ConfigError(f"attack.fd_epsilon={self.fd_epsilon} must be > 0")

    def resolved(self) -> dict[str, Any]:
        """The data-free parameters with the paper's defaults filled in."""
        maze = self.name == "maze"
        return {"nz": self.nz or (100 if maze else 256), "m": self.directions or (10 if maze else 1),
                "replay": (10 if maze else 0) if self.replay_iters is None else self.replay_iters}


@dataclass
class CloneConfig(BackboneConfig):
    """The clone's architecture (the shared backbone keys under ``clone.``; a linear head is added)."""

    SECTION: ClassVar[str] = "clone"
    width: PositiveInt = own_default("width", 16, BackboneConfig)


@dataclass
class CloneTrainConfig:
    """Training of the clone on the cached posteriors (Knockoff; soft cross-entropy)."""

    epochs: NonNegInt = 10
    batch_size: PositiveInt = 64  # per rank
    optimizer: str = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Momentum = 0.9
    weight_decay: NonNegFloat = 5e-4
    warmup_epochs: NonNegFloat = 0.5
    augment: bool = True  # mild crop/flip/jitter of the query images (Knockoff trains with augmentation)
    # auto (the newest checkpoint of this run's clone training, or of DFME/MAZE's loop) | none | a ckpt path
    resume: str = "auto"
    resume_force: bool = False  # resume even from a checkpoint written with other settings (they are listed)
    # also checkpoint every N clone steps (Knockoff; always at epoch ends) or N DFME/MAZE iterations;
    # 0: Knockoff at epoch ends only, DFME/MAZE at the end only; both also on preemption
    ckpt_every: NonNegInt = 0

    def validate(self) -> None:
        from stealer.optim import OPTIMIZERS

        choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"train.epochs must be >= 0 and train.batch_size >= 1 (got {self.epochs}, {self.batch_size})")
        if self.ckpt_every < 0:
            raise ConfigError(f"train.ckpt_every={self.ckpt_every} must be >= 0 (0: checkpoint at epoch ends only)")


# the keys a clone / data-free checkpoint may differ in from the run resuming it
CLONE_MAY_CHANGE = frozenset({"train.resume", "train.resume_force", "train.ckpt_every"})
DATA_FREE_MAY_CHANGE = frozenset({"attack.query_sets", "attack.batch_size"})  # Knockoff's keys: DFME/MAZE ignore them
START_OVER = "use a new run name (name=...), train.resume=none to start over, or train.resume_force=true to resume anyway"


# ---------------------------------------------------- the whole job (launch/steal_classifier.py's keys)
@dataclass
class VictimSection:
    checkpoint: str = "runs/demo/victim_clf/classifier.pt"  # a victims.classifier checkpoint (train_victim.py --task classify)
    user: str = "attacker"
    state_dir: str = ""  # where the victim keeps its ledger ('' = <run>/victim_state)
    top_k: PositiveInt | None = None  # the API returns only the top-k posteriors (renormalised)
    rounding: NonNegInt | None = None  # ... rounded to this many decimals
    fit_data: str = "runs/demo/data/animal_mnist/victim_train"  # the defender's images for defenses that fit a model
    fit_limit: PositiveInt = 2000


@dataclass
class EvalSection:
    test: str = "runs/demo/data/animal_mnist/probe_test"  # labelled test split
    limit: PositiveInt | None = 1000  # first N test images (None = all)
    user: str = "defender_eval"  # the defender's own evaluation queries are charged to this user


@dataclass
class ClassifierStealConfig(JobHeader):
    """The whole job: the shared header (``name``, ``out_dir``, ``seed``, ``cpu``: :class:`stealer.config.JobHeader`)
    and the attack's sections."""

    name: str = own_default("name", "steal_classifier")
    phases: list[str] = field(default_factory=lambda: ["query", "train", "eval"])
    budget: PositiveInt = 1000  # images the victim may see for this attack (finite-difference probes included)
    attack: ClassifierAttackConfig = field(default_factory=ClassifierAttackConfig)
    victim: VictimSection = field(default_factory=VictimSection)
    defenses: list[Any] = field(default_factory=list)  # the defender's chain, e.g. [{name: mad, epsilon: 0.5}]
    clone: CloneConfig = field(default_factory=CloneConfig)
    train: CloneTrainConfig = field(default_factory=CloneTrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self) -> None:
        for p in self.phases:
            choice("phases", p, ["query", "train", "eval"])
        if self.budget < 1:
            raise ConfigError(f"budget={self.budget} must be >= 1 (images the victim may see)")
        for d in self.defenses:
            if not isinstance(d, dict) or "name" not in d:
                raise ConfigError(f"defenses entry {d!r} is not a mapping with a name (e.g. {{name: mad, epsilon: 0.5}})")
