"""Stealing classifiers from their posteriors: Knockoff Nets, DFME and MAZE, and the clone's training.

The victim is any object with ``query(uint8 images [N, C, H, W], user) -> probabilities [N, K]`` and
``describe()`` (``victims.posterior_api.PosteriorAPI`` in process, or a client of it). Every posterior
the attack receives passes through :class:`PosteriorCache` and is paid for once, also across a SIGKILL.

Modules: :mod:`~stealer.classifier.config` (the settings), :mod:`~stealer.classifier.cache` (the
posterior cache), :mod:`~stealer.classifier.losses` (quantisation, soft cross-entropy, logit recovery,
KL), :mod:`~stealer.classifier.knockoff` (Knockoff random and adaptive), :mod:`~stealer.classifier.data_free`
(DFME and MAZE), :mod:`~stealer.classifier.clone` (the clone and its training),
:mod:`~stealer.classifier.run` (one whole steal: :func:`run_steal`).
"""
from stealer.classifier.cache import PosteriorCache, PosteriorTarget
from stealer.classifier.clone import CLONE_AUGMENT, build_clone, train_clone
from stealer.classifier.config import (CLASSIFIER_ATTACKS, CLONE_MAY_CHANGE, DATA_FREE_MAY_CHANGE, ClassifierAttackConfig,
                                       ClassifierStealConfig, CloneConfig, CloneTrainConfig, EvalSection, VictimSection)
from stealer.classifier.data_free import Generator, cost_per_iteration, data_free, zo_gradient
from stealer.classifier.knockoff import (GradientBandit, RewardNormalizer, kmeans, knockoff_adaptive, knockoff_random,
                                         load_pool, reward_certainty, reward_diversity, reward_loss)
from stealer.classifier.losses import LOG_FLOOR, kl_posteriors, logits_from_posteriors, quantize, soft_cross_entropy
from stealer.classifier.run import build_defense_chain, build_posterior_api, load_images, run_steal, write_json

__all__ = [
    "PosteriorTarget", "ClassifierAttackConfig", "CloneConfig", "CloneTrainConfig", "ClassifierStealConfig",
    "VictimSection", "EvalSection", "CLASSIFIER_ATTACKS", "CLONE_MAY_CHANGE", "DATA_FREE_MAY_CHANGE", "CLONE_AUGMENT",
    "LOG_FLOOR",
    "PosteriorCache", "load_pool", "quantize", "soft_cross_entropy", "logits_from_posteriors", "kl_posteriors",
    "reward_certainty", "reward_diversity", "reward_loss", "RewardNormalizer", "GradientBandit", "kmeans",
    "Generator", "zo_gradient", "build_clone", "knockoff_random", "knockoff_adaptive", "data_free",
    "train_clone", "cost_per_iteration", "build_posterior_api", "build_defense_chain", "load_images", "run_steal",
    "write_json",
]
