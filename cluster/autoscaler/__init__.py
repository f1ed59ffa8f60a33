"""The autoscaler: sizes the prefill and decode pools apart from the routers' and workers' metrics.

planner.py (the policy, pure), metrics.py (a `Sample` from the routers), actuators.py (the controller through
Ray), kubernetes.py (the RayCluster's worker groups), loop.py (collect, plan, act).
"""
