"""The numpy core: parameter sets, aggregation, strategies and the round engine.

Nothing here imports torch or any HTTP library, so the same round logic runs in
simulation and in deployment.
"""
