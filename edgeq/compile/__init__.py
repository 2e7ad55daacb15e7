"""From a model to a board's files: the boards edgeq compiles for (:mod:`.targets`), the build of an artifact
(:mod:`.build`: quantize, export, lower, compile, golden batch), the artifact directory and its manifest
(:mod:`.artifact`), cross-compiling and linking a library (:mod:`.library`) and MetaSchedule tuning (:mod:`.tune`).

Nothing here imports TVM or torch until a function needs it.
"""
