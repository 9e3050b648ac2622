"""How a config field enters a stage's content hash (precompute.config.StudyConfig.section).

Set as dataclass field metadata: `field(..., metadata={"cache_key": False})` leaves the field out
(where a model is placed changes no result); `UNLESS_DEFAULT` leaves it out while it has its
default, so adding an option does not invalidate every study built before it.
"""

UNLESS_DEFAULT = "unless_default"
