"""diffusers integration (optional extra ``piflow[diffusers]``): import the submodules you need.

* `piflow.integrations.diffusers.scheduler`: `FlowMapSDEScheduler` as a diffusers scheduler.
* `piflow.integrations.diffusers.solvers`: diffusers' multistep solvers as teacher baselines.
"""
