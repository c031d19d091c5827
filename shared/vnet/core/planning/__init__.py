"""The planner's parts (pure): op types (:mod:`.ops`), checks and validated views
(:mod:`.checks`), the generic planner (:mod:`.planner`). The public face is
:mod:`vnet.core.plan`; each driver's part is in :mod:`vnet.core.drivers`."""
