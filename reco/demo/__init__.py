"""Both papers' experiments end to end on real data that ships in packages (`reco demo`)."""

from .longtail import LongTailParams
from .run import Demo, DemoConfig, demo_config
from .zeroshot import ZeroShotParams

__all__ = ["Demo", "DemoConfig", "LongTailParams", "ZeroShotParams", "demo_config"]
