"""What a touch-point module declares: which SGLang function, how, and with what."""

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Patch:
    target: str  # dotted path of the SGLang function or method wrapped
    hook_type: str  # HookType name: BEFORE, AFTER or AROUND
    hook: Callable
