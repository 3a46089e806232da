"""Scale-out on Ray: engine replicas as Ray actors behind the same Engine protocol.

The API process keeps one `ReplicaSet` per model. It owns the model's waiting queue (so
fairness and priorities act across all replicas, not within each), routes each admitted
request to a replica, survives replica deaths, and scales between min and max replicas.
"""
