"""kefu's dialog engine: bots, knowledge, intent classification and the plugin API.

Plugin authors import from here only::

    from engine import hookimpl, BotSpec, Reply, Answer, paths

The engine imports nothing of ``server``, ``plugins`` or ``models``, nor torch.
"""
from . import paths
from .config import Config, load_config
from .dialog import Engine
from .errors import (ConfigError, InputError, KefuError, KnowledgeError, ModelError, PluginError,
                     Problem, UnknownBotError)
from .intent import IntentClassifier
from .knowledge import Knowledge, load_knowledge
from .memory import InMemoryStore, MemoryStore, SessionContext
from .plugins import hookimpl
from .types import Answer, BotSpec, Classification, Handoff, IntentScore, Message, Reply, Turn

__all__ = [
    "Answer", "BotSpec", "Classification", "Config", "ConfigError", "Engine", "Handoff", "InMemoryStore",
    "InputError", "IntentClassifier", "IntentScore", "KefuError", "Knowledge", "KnowledgeError",
    "MemoryStore", "Message", "ModelError", "PluginError", "Problem", "Reply", "SessionContext", "Turn",
    "UnknownBotError", "hookimpl", "load_config", "load_knowledge", "paths",
]
