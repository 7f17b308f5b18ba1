"""A loaded bot: its knowledge, its classifier, and the file it reloads from."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KnowledgeError, Problem
from .intent import IntentClassifier
from .knowledge import Knowledge, load_knowledge
from .knowledge_classifier import KnowledgeClassifier
from .types import BotSpec

log = logging.getLogger("kefu.engine")


@dataclass
class Bot:
    spec: BotSpec
    knowledge: Knowledge
    classifier: IntentClassifier
    rng: random.Random = field(default_factory=random.Random)
    delays_enabled: bool = True
    #: The last reload's error while the previous knowledge stays live; None when healthy.
    last_error: KnowledgeError | None = None
    _mtime: float = 0.0
    _uses_model: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def uses_model(self) -> bool:
        return self._uses_model

    @classmethod
    def load(cls, spec: BotSpec, model_dir: Path | None, use_model: bool = True,
             model_threads: int = 1, seed: int | None = None) -> "Bot":
        knowledge = load_bot_knowledge(spec)
        classifier: IntentClassifier
        uses_model = False
        if use_model and model_dir is not None and (model_dir / "model.onnx").exists():
            # Imported here so a bot without a model never loads ONNX Runtime.
            from .onnx_intent import OnnxIntentClassifier

            classifier = OnnxIntentClassifier.load(model_dir, threads=model_threads)
            uses_model = True
            log.info("bot %s: intent model %s", spec.name, model_dir)
        else:
            classifier = knowledge_classifier(knowledge)
        bot = cls(spec=spec, knowledge=knowledge, classifier=classifier,
                  rng=random.Random(seed), _uses_model=uses_model)
        bot._mtime = _mtime(spec.knowledge)
        return bot

    def changed_on_disk(self) -> bool:
        return _mtime(self.spec.knowledge) != self._mtime

    def reload(self) -> KnowledgeError | None:
        """Reload the knowledge file; a broken file keeps the current knowledge live."""
        self._mtime = _mtime(self.spec.knowledge)
        try:
            knowledge = load_bot_knowledge(self.spec)
        except KnowledgeError as exc:
            log.error("bot %s: knowledge not reloaded, the previous version stays live:\n%s", self.name, exc)
            self.last_error = exc
            return exc
        if not self._uses_model:
            self.classifier = knowledge_classifier(knowledge)
        self.knowledge = knowledge
        self.last_error = None
        log.info("bot %s: knowledge reloaded from %s", self.name, self.spec.knowledge)
        return None


def load_bot_knowledge(spec: BotSpec) -> Knowledge:
    """The bot's knowledge file, which must declare the name the bot is registered under."""
    knowledge = load_knowledge(spec.knowledge)
    if knowledge.bot != spec.name:
        raise KnowledgeError([Problem(spec.knowledge, 1, f"bot is {knowledge.bot!r} but the file is "
                                                         f"registered for bot {spec.name!r}")])
    for warning in knowledge.warnings():
        log.warning("%s", warning)
    return knowledge


def knowledge_classifier(knowledge: Knowledge) -> KnowledgeClassifier:
    pairs = [(knowledge.prepare(text), intent) for text, intent in knowledge.examples()]
    pairs = [(t, i) for t, i in pairs if t]
    return KnowledgeClassifier([t for t, _ in pairs], [i for _, i in pairs], cjk=knowledge.cjk)


def _mtime(path: Path) -> float:
    try:
        return Path(path).stat().st_mtime_ns / 1e9
    except OSError:
        return -1.0
