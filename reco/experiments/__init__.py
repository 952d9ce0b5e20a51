"""Both papers' experiments end to end on real data that ships in packages (`reco demo`)."""

from .demo import Demo, DemoConfig
from .longtail import LongTailParams
from .zeroshot import ZeroShotParams

__all__ = ["Demo", "DemoConfig", "LongTailParams", "ZeroShotParams"]
