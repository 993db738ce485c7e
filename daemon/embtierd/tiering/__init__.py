"""Tiering: tracker -> policy -> mover, once per interval (engine.py), the
policies (policy_lfu, policy_lru), their settings, and the offline simulator."""
