"""Several appliances behind HAProxy, sharing tenants through etcd (docs/cluster.md).

``policy`` is pure (key layout, record checks, the haproxy.cfg text);
``etcd`` talks to etcd's v3 JSON gateway with the standard library;
``node`` is this node's membership and tenant copy; ``cli`` and ``web`` are
the command line and the node-to-node routes. Without ``SYNAPSE_CLUSTER_ETCD``
none of it runs and a node is standalone.
"""
