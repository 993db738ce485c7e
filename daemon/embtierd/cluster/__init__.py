"""The daemon as a host of a cluster: its registration in etcd (member.py) and the plan version
fence every cluster request passes (fence.py)."""
