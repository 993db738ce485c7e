"""Several embtierd hosts as one store: the shard plan (plan.py), its home in etcd (coord.py)
and the client that routes by it (client.py)."""
